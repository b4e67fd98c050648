"""ImageNet data layer: ImageFolder layout, transforms, the validation hold-out, synthetic JPEG data."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2
from typer.testing import CliRunner

from micronet.config import AugmentConfig, DataConfig, ResizedCropConfig
from micronet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_imagenet_transform,
    build_splits,
    build_test,
    ensure_dataset,
    num_classes,
    synthetic_imagenet_manifest,
    write_synthetic_imagenet,
)
from micronet.errors import MicronetError
from stages.data import synth_imagenet_command

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 4, 12, 3, 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_synthetic_imagenet(root, CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagenet", "root": str(root), "val_size": 8, "image_size": 32,
                         "eval_resize": 36, **kw})


def _digest(root: Path) -> str:
    h = hashlib.md5()
    for f in sorted(root.rglob("*.JPEG")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


# --- synthetic data ------------------------------------------------------------------------------------


def test_synthetic_imagenet_is_jpeg_files_in_imagefolder_layout(synth):
    wnids = [f"n{c:08d}" for c in range(CLASSES)]
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        assert sorted(p.name for p in (synth / split).iterdir()) == wnids
        files = sorted((synth / split / wnids[1]).iterdir())
        assert len(files) == per_class and all(f.suffix == ".JPEG" for f in files)
        with Image.open(files[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == SIZE
            assert SIZE <= max(im.size) <= SIZE * 4 // 3
    assert synthetic_imagenet_manifest(synth) == {"synthetic": True, "seed": 0, "classes": CLASSES,
                                                  "train_per_class": TRAIN_PER_CLASS,
                                                  "val_per_class": VAL_PER_CLASS, "size": SIZE}


def test_synthetic_imagenet_is_deterministic_for_a_seed(synth, tmp_path):
    write_synthetic_imagenet(tmp_path / "a", CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0)
    write_synthetic_imagenet(tmp_path / "b", CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=1)
    assert _digest(tmp_path / "a") == _digest(synth) != _digest(tmp_path / "b")
    # rewriting with fewer classes leaves no stale class folders behind
    write_synthetic_imagenet(tmp_path / "b", 2, 1, 1, SIZE, seed=1)
    assert sorted(p.name for p in (tmp_path / "b" / "train").iterdir()) == ["n00000000", "n00000001"]


def test_synthetic_imagenet_will_not_overwrite_real_data(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(MicronetError, match="not synthetic"):
        write_synthetic_imagenet(tmp_path, 2, 1, 1, 16, seed=0)


def test_synthetic_classes_are_separable_after_random_resized_crop(synth):
    """The class cue (mean colour) survives the training crop: nearest class mean classifies the val folder."""
    splits = build_splits(_cfg(synth, augment=AugmentConfig(normalize=False), val_size=0))
    torch.manual_seed(0)
    feats = torch.stack([splits.train[i][0].mean((1, 2)) for i in range(len(splits.train))])
    labels = torch.tensor([splits.train[i][1] for i in range(len(splits.train))])
    centres = torch.stack([feats[labels == c].mean(0) for c in range(CLASSES)])
    test = [splits.test[i] for i in range(len(splits.test))]
    predicted = torch.cdist(torch.stack([x.mean((1, 2)) for x, _ in test]), centres).argmin(1)
    assert torch.equal(predicted, torch.tensor([y for _, y in test]))


def test_synth_imagenet_command(tmp_path):
    app = typer.Typer()
    app.command()(synth_imagenet_command)
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--classes", "3", "--train-per-class", "2",
                                      "--val-per-class", "1", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert "3 classes" in result.output
    assert len(list((tmp_path / "train").rglob("*.JPEG"))) == 6 and len(list((tmp_path / "val").rglob("*.JPEG"))) == 3


# --- layout checks -------------------------------------------------------------------------------------


def test_missing_folders_fail_in_one_line_naming_path_and_layout(tmp_path):
    for missing in ("train", "val"):
        root = tmp_path / missing
        (root / ({"train", "val"} - {missing}).pop() / "n00000000").mkdir(parents=True)
        with pytest.raises(MicronetError) as info:
            ensure_dataset(_cfg(root))
        message = str(info.value)
        assert "\n" not in message and str((root / missing).resolve()) in message
        assert "root/train/<wnid>/*.JPEG" in message
    with pytest.raises(MicronetError, match="cannot be downloaded"):
        ensure_dataset(_cfg(tmp_path, download=True))


def test_train_and_val_must_hold_the_same_classes(synth, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    shutil.rmtree(root / "val" / "n00000002")
    with pytest.raises(MicronetError, match=r"only in train: \['n00000002'\]"):
        build_splits(_cfg(root))


def test_the_score_stage_reads_the_val_folder_without_listing_train(synth, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    expected = build_splits(_cfg(root)).test
    for image in (root / "train").rglob("*.JPEG"):
        image.unlink()  # train/ unreadable as a data set: only its class folders are left
    with pytest.raises(MicronetError, match="ImageNet not usable"):
        build_splits(_cfg(root))
    test = build_test(_cfg(root))
    assert test.samples == expected.samples
    assert torch.equal(test[0][0], expected[0][0])
    shutil.rmtree(root / "train" / "n00000001")
    with pytest.raises(MicronetError, match=r"only in val: \['n00000001'\]"):
        build_test(_cfg(root))  # one index mapping for train and val still checked


# --- splits and transforms -----------------------------------------------------------------------------


def test_splits_hold_out_a_seeded_validation_set_and_test_is_the_val_folder(synth):
    cfg = _cfg(synth)
    splits = build_splits(cfg)
    n_train = CLASSES * TRAIN_PER_CLASS
    assert len(splits.train) + len(splits.val) == n_train and len(splits.val) == 8
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert splits.train_eval.indices == splits.train.indices
    assert len(splits.test) == CLASSES * VAL_PER_CLASS and Path(splits.test.root).name == "val"
    assert splits.test.class_to_idx == splits.train.dataset.class_to_idx == {f"n{c:08d}": c for c in range(CLASSES)}
    assert num_classes(cfg) == CLASSES
    assert build_splits(cfg).val.indices == splits.val.indices
    assert build_splits(_cfg(synth, split_seed=1)).val.indices != splits.val.indices
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert splits.val[0][0].shape == (3, 32, 32)


def test_eval_transform_matches_torchvisions_pil_resize_and_centre_crop(synth):
    """Shorter side to eval_resize (aspect kept), centre crop - as the PIL pipeline, up to uint8 rounding."""
    splits = build_splits(_cfg(synth, augment=AugmentConfig(normalize=False)))
    path, label = splits.test.samples[5]
    reference = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor()])
    with Image.open(path) as im:
        assert im.size[0] != im.size[1]  # a squashing resize would differ
        expected = reference(im.convert("RGB"))
    x, y = splits.test[5]
    assert y == label and x.shape == expected.shape
    assert (x - expected).abs().max() <= 1 / 255 + 1e-6 and (x - expected).abs().mean() < 0.05 / 255
    normalized = build_splits(_cfg(synth)).test[5][0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(normalized, (x - mean) / std, atol=1e-6)


def test_transform_defaults_sizes_normalization_and_augment_options():
    train = build_imagenet_transform(DataConfig(dataset="imagenet"), AugmentConfig(), train=True)
    crop, flip = train.transforms[0], train.transforms[1]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, v2.RandomHorizontalFlip)
    assert train.transforms[-1].mean == list(IMAGENET_MEAN) and train.transforms[-1].std == list(IMAGENET_STD)
    evaluation = build_imagenet_transform(DataConfig(dataset="imagenet"), AugmentConfig(), train=False)
    assert evaluation.transforms[0].size == [256] and evaluation.transforms[1].size == (224, 224)
    # a toy crop alone keeps the 256/224 ratio; explicit mean/std and crop range are used
    toy = DataConfig(dataset="imagenet", image_size=56, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert build_imagenet_transform(toy, AugmentConfig(), train=False).transforms[0].size == [64]
    narrow = AugmentConfig(random_resized_crop=ResizedCropConfig(scale=(0.35, 1.0)), hflip=False)
    custom = build_imagenet_transform(toy, narrow, train=True)
    assert custom.transforms[0].scale == (0.35, 1.0) and len(custom.transforms) == 3
    assert custom.transforms[-1].mean == [0.5] * 3 and custom.transforms[-1].std == [0.25] * 3
    image = torch.full((3, 70, 80), 255, dtype=torch.uint8)
    assert torch.allclose(custom(image), torch.full((3, 56, 56), 2.0))  # (1 - 0.5) / 0.25
    plain = build_imagenet_transform(toy, None, train=True)  # no augmentation: the eval transform
    assert [type(t) for t in plain.transforms] == [v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize]
    with pytest.raises(MicronetError, match=r"data.augment.cutout = 16 is not applied by the imagenet"):
        build_imagenet_transform(toy, AugmentConfig(cutout=16), train=True)
    with pytest.raises(MicronetError, match="eval_resize"):
        build_imagenet_transform(DataConfig(dataset="imagenet", image_size=64, eval_resize=48), None, train=False)
    with pytest.raises(MicronetError, match="copies"):
        build_splits(DataConfig(dataset="imagenet", copies=[AugmentConfig()]))


def test_cifar_path_is_unchanged(tmp_path):
    from micronet.data import write_synthetic_cifar100

    write_synthetic_cifar100(tmp_path, 200, 100, seed=0)
    cfg = DataConfig(root=str(tmp_path), val_size=20)
    splits = build_splits(cfg)
    assert num_classes(cfg) == 100 and len(splits.train) == 180 and splits.train[0][0].shape == (3, 32, 32)
    assert len(splits.test) == 100
