"""Data layer: synthetic CIFAR-100 in torchvision's format, manifest-checked folders (a verified copy of the real data,
or a stand-in written here), splits, transforms, Fast AutoAugment, Cutout."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision import transforms as T

from micronet import augment
from micronet.augment import CUTOUT_FILL, Cutout, FastAutoAugment, apply_op, load_policy, policy_names
from micronet.config import AugmentConfig, DataConfig
from micronet.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    ManifestCIFAR100,
    build_splits,
    build_test,
    build_transform,
    load_cifar100,
    num_classes,
    synthetic_manifest,
    write_digits_cifar100,
    write_synthetic_cifar100,
)
from micronet.errors import MicronetError

N_TRAIN, N_TEST = 400, 200


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_cifar100(root, N_TRAIN, N_TEST, seed=0)
    return root


def _md5s(root: Path) -> dict[str, str]:
    return {f: hashlib.md5((root / "cifar-100-python" / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")}


def _random_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


# --- synthetic data in CIFAR-100's format --------------------------------------------------------------


def test_synthetic_reads_with_plain_torchvision_cifar100(synth, monkeypatch):
    # Only the md5s differ from the real files: give torchvision's own class the synthetic ones.
    md5 = synthetic_manifest(synth)["md5"]
    assert md5 == _md5s(synth)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "meta", {**torchvision.datasets.CIFAR100.meta, "md5": md5["meta"]})
    for train, n in ((True, N_TRAIN), (False, N_TEST)):
        ds = torchvision.datasets.CIFAR100(synth, train=train, download=False)
        assert len(ds) == n and ds.data.shape == (n, 32, 32, 3) and ds.data.dtype == np.uint8
        assert len(ds.classes) == 100
        counts = np.bincount(ds.targets, minlength=100)
        assert counts.min() == counts.max() == n // 100  # balanced
        img, label = ds[0]
        assert isinstance(img, Image.Image) and img.size == (32, 32) and 0 <= label < 100


def test_synthetic_pickles_have_real_cifar100_keys(synth):
    with open(synth / "cifar-100-python" / "train", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert set(entry) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert entry["data"].shape == (N_TRAIN, 3072) and entry["data"].dtype == np.uint8
    assert entry["coarse_labels"] == [c // 5 for c in entry["fine_labels"]]
    with open(synth / "cifar-100-python" / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


def test_synthetic_is_deterministic_per_seed(synth, tmp_path):
    write_synthetic_cifar100(tmp_path / "same", N_TRAIN, N_TEST, seed=0)
    write_synthetic_cifar100(tmp_path / "other", N_TRAIN, N_TEST, seed=1)
    assert _md5s(tmp_path / "same") == _md5s(synth)
    other = _md5s(tmp_path / "other")
    assert other["train"] != _md5s(synth)["train"] and other["test"] != _md5s(synth)["test"]


def test_load_cifar100_reads_synthetic(synth):
    ds = load_cifar100(synth, train=False, transform=build_transform(None, train=False))
    assert isinstance(ds, ManifestCIFAR100) and ds.manifest == "synthetic.json" and len(ds) == N_TEST
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 100


def test_missing_dataset_is_a_one_line_user_error(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(MicronetError) as e:
        load_cifar100(root, train=True, download=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert str((root / "cifar-100-python").resolve()) in msg
    assert "cifar-100-python" in msg and "data.download" in msg


def test_real_layout_is_md5_checked(synth, tmp_path):
    # Synthetic files without their manifest look like corrupted real CIFAR-100: torchvision's md5s fail.
    write_synthetic_cifar100(tmp_path, 100, 100, seed=0)
    (tmp_path / "cifar-100-python" / "synthetic.json").unlink()
    with pytest.raises(MicronetError, match="corrupted"):
        load_cifar100(tmp_path, train=True, download=False)
    with pytest.raises(MicronetError, match="not synthetic"):  # and the writer will not overwrite it
        write_synthetic_cifar100(tmp_path, 100, 100, seed=0)


# --- folders with a manifest: a verified copy (MANIFEST.json) or a stand-in written here (synthetic.json) ----------


def _verified_copy(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """A small folder laid out like ../shared/data/cifar100: files whose md5s only MANIFEST.json vouches for."""
    folder = write_synthetic_cifar100(root, n_train, n_test, seed=0)
    md5 = json.loads((folder / "synthetic.json").read_text())["md5"]
    (folder / "synthetic.json").unlink()
    (folder / "MANIFEST.json").write_text(json.dumps({"dataset": "test copy", "md5": md5}))
    return root


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_verified_copy_loads_against_its_manifest_and_is_left_as_it_is(tmp_path):
    root = _verified_copy(tmp_path / "copy")
    before = _listing(root)
    train, test = (load_cifar100(root, train=t) for t in (True, False))
    assert isinstance(train, ManifestCIFAR100) and train.manifest == "MANIFEST.json"
    assert (len(train), len(test), len(train.classes)) == (200, 100, 100) and train.data.shape == (200, 32, 32, 3)
    assert len(build_test(DataConfig(root=str(root), val_size=0))) == 100
    assert _listing(root) == before  # nothing written into the data folder
    with pytest.raises(MicronetError, match="verified copy of the real data"):  # the writers refuse it
        write_synthetic_cifar100(root, 200, 100, seed=0)
    from micronet.data import ensure_dataset

    with pytest.raises(MicronetError, match="verified copy of the real data"):  # so does a synthetic config's stage
        ensure_dataset(DataConfig(root=str(root), synthetic={"train": 200, "test": 100}))
    assert _listing(root) == before


@pytest.mark.parametrize("manifest", ["MANIFEST.json", "synthetic.json"])
@pytest.mark.parametrize("damaged", ["train", "meta"])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, manifest, damaged):
    root = _verified_copy(tmp_path) if manifest == "MANIFEST.json" else tmp_path
    if manifest == "synthetic.json":
        write_synthetic_cifar100(root, 200, 100, seed=0)
    folder = root / "cifar-100-python"
    load_cifar100(root, train=True)  # hashed and remembered, then changed: the change is seen
    path = folder / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a write, not the same tick
    with pytest.raises(MicronetError) as e:
        load_cifar100(root, train=True)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"CIFAR-100 at {folder.resolve()}: {damaged} does not match {manifest}")
    assert hashlib.md5(bytes(data)).hexdigest() in line and "damaged" in line
    if damaged == "train":  # the test split does not read the training file
        assert len(load_cifar100(root, train=False)) == 100
    path.unlink()
    with pytest.raises(MicronetError, match=f"{damaged} is missing \\({manifest} lists it\\)"):
        load_cifar100(root, train=True)


def test_a_manifest_without_md5s_is_refused(tmp_path):
    root = _verified_copy(tmp_path)
    (root / "cifar-100-python" / "MANIFEST.json").write_text(json.dumps({"md5": {"train": "0" * 32}}))
    with pytest.raises(MicronetError, match="MANIFEST.json has no \"md5\" entry for each of train, test, meta"):
        load_cifar100(root, train=True)


def test_a_stage_hashes_each_file_once(tmp_path, monkeypatch):
    # torchvision hashes every file of the folder for each split it loads; train + val + test here hash each once.
    from micronet.data import cifar

    root = _verified_copy(tmp_path)
    hashed: list[str] = []
    real_hash = cifar._hash_file
    monkeypatch.setattr(cifar, "_MD5_CACHE", {})
    monkeypatch.setattr(cifar, "_hash_file", lambda path: hashed.append(path.name) or real_hash(path))
    cfg = DataConfig(root=str(root), val_size=50)
    splits = build_splits(cfg)
    build_test(cfg)
    assert len(splits.train) == 150 and len(splits.test) == 100
    assert sorted(hashed) == ["meta", "test", "train"]


def test_real_cifar100_loads_from_the_shared_copy(real_cifar100):
    # ../shared/data/cifar100: the real data set, its md5s checked against its MANIFEST.json, not torchvision's.
    train, test = (load_cifar100(real_cifar100, train=t) for t in (True, False))
    assert isinstance(train, ManifestCIFAR100) and train.manifest == "MANIFEST.json"
    assert (len(train), len(test)) == (50000, 10000) and train.data.shape == (50000, 32, 32, 3)
    assert len(train.classes) == 100 and train.classes[:2] == ["apple", "aquarium_fish"]
    assert np.bincount(train.targets, minlength=100).tolist() == [500] * 100
    assert np.bincount(test.targets, minlength=100).tolist() == [100] * 100


def test_digits_are_real_images_in_cifar100_format(tmp_path):
    # scikit-learn's bundled digits, read back by the same loader and config as CIFAR-100: 32x32 RGB, labels 0-9,
    # a stratified seeded split; a synthetic-data config at that root would not mistake them for its own set.
    from sklearn.datasets import load_digits

    write_digits_cifar100(tmp_path / "a", n_test=300, seed=0, n_train=500)
    train, test = (load_cifar100(tmp_path / "a", train=t) for t in (True, False))
    assert (len(train), len(test)) == (500, 300) and train.data.shape == (500, 32, 32, 3)
    assert sorted(set(test.targets)) == list(range(10)) and np.ptp(np.bincount(test.targets)) <= 2
    assert (train.data[..., 0] == train.data[..., 2]).all() and train.data.max() == 255  # grey, full range
    # each image, shrunk back to 8x8, is nearest to an original digit of its own label
    digits = load_digits()
    small = train.data[..., 0].reshape(500, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(500, 64) * (16 / 255)
    nearest = torch.cdist(torch.from_numpy(small), torch.from_numpy(digits.data)).argmin(1).numpy()
    assert (digits.target[nearest] == np.array(train.targets)).all()
    manifest = synthetic_manifest(tmp_path / "a")
    assert manifest["source"] == "digits" and manifest["synthetic"] is False
    write_digits_cifar100(tmp_path / "b", n_test=300, seed=0, n_train=500)
    assert _md5s(tmp_path / "a") == _md5s(tmp_path / "b")  # same seed, same bytes
    assert len(build_test(DataConfig(root=str(tmp_path / "a"), val_size=0))) == 300
    with pytest.raises(MicronetError, match="at most 1797 together"):
        write_digits_cifar100(tmp_path / "c", n_test=300, seed=0, n_train=1500)


def test_data_synthetic_source_digits_writes_them_where_a_stage_looks(tmp_path):
    # `data.synthetic.source: digits` (make demo DATA=digits): a stage's ensure_dataset writes the same bytes as the
    # writer, replaces a synthetic set of another source at that root, and keeps a matching one as it is.
    from micronet.data import ensure_dataset

    write_digits_cifar100(tmp_path / "ref", n_test=100, seed=1, n_train=400)
    write_synthetic_cifar100(tmp_path / "root", 400, 100, seed=1)
    cfg = DataConfig(root=str(tmp_path / "root"), synthetic={"source": "digits", "train": 400, "test": 100, "seed": 1})
    ensure_dataset(cfg)
    assert _md5s(tmp_path / "root") == _md5s(tmp_path / "ref")
    stamp = (tmp_path / "root/cifar-100-python/train").stat().st_mtime_ns
    ensure_dataset(cfg)
    assert (tmp_path / "root/cifar-100-python/train").stat().st_mtime_ns == stamp
    ensure_dataset(cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"source": "synthetic"})}))
    assert synthetic_manifest(tmp_path / "root")["synthetic"] is True
    with pytest.raises(ValueError, match="at most 1797 together"):
        DataConfig(synthetic={"source": "digits", "train": 1700, "test": 297})
    with pytest.raises(ValueError, match="imagenet takes synthetic only"):
        DataConfig(dataset="imagenet", synthetic={"source": "digits", "train": 100, "test": 100})


# --- splits ----------------------------------------------------------------------------------------------


def test_build_splits(synth):
    cfg = DataConfig(root=str(synth), val_size=100, split_seed=0)
    s = build_splits(cfg)
    assert num_classes(cfg) == 100
    assert len(s.train) == N_TRAIN - 100 and len(s.val) == 100 and len(s.test) == N_TEST
    train_idx, val_idx = set(s.train.indices), set(s.val.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(N_TRAIN))
    assert all(0 <= s.train.dataset.targets[i] < 100 for i in train_idx)
    # Same seed, same split; another seed, another split.
    assert build_splits(cfg).val.indices == s.val.indices
    assert build_splits(DataConfig(root=str(synth), val_size=100, split_seed=1)).val.indices != s.val.indices
    # Val and test are deterministic (eval transform); train is augmented (crop + flip by default).
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.test[0][0], s.test[0][0])
    assert s.val.dataset.data is s.train.dataset.data  # one copy of the images, two transforms
    # The score stage's test split alone: the same images and labels, with data.mean/std when they are set.
    test = build_test(DataConfig(root=str(synth), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert test.targets == s.test.targets and (test.data == s.test.data).all()
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    assert torch.allclose(test[0][0], (s.test[0][0] * std + mean - 0.5) / 0.25, atol=1e-5)
    assert s.train_eval.indices == s.train.indices and torch.equal(s.train_eval[0][0], s.train_eval[0][0])
    torch.manual_seed(0)
    assert any(not torch.equal(s.train[0][0], s.train[0][0]) for _ in range(5))


def test_build_splits_val_size_edges(synth):
    s = build_splits(DataConfig(root=str(synth), val_size=0))
    assert s.val is None and len(s.train) == N_TRAIN
    with pytest.raises(MicronetError, match="val_size"):
        build_splits(DataConfig(root=str(synth), val_size=N_TRAIN))


# --- transforms ------------------------------------------------------------------------------------------


def test_transform_order():
    aug = AugmentConfig(autoaugment="fa_shake26_2x96d_cifar100", crop_padding=4, hflip=True, cutout=16)
    train = build_transform(aug, train=True)
    assert [type(t) for t in train.transforms] == [
        FastAutoAugment, T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize, Cutout]
    assert train.transforms[1].padding == 4
    assert [type(t) for t in build_transform(aug, train=False).transforms] == [T.ToTensor, T.Normalize]
    assert [type(t) for t in build_transform(None, train=True).transforms] == [T.ToTensor, T.Normalize]

    # FAA sees the untouched 32x32 PIL image (before padding/cropping), and the pipeline runs end to end.
    seen = []
    faa = train.transforms[0]
    train.transforms[0] = lambda im: seen.append(im) or faa(im)
    img = _random_image()
    out = train(img)
    assert seen[0] is img and out.shape == (3, 32, 32)


def test_cutout_runs_after_normalize():
    # A flat image normalizes to non-zero values; only a Cutout after Normalize leaves exact zeros.
    aug = AugmentConfig(crop_padding=0, hflip=False, cutout=8)
    img = Image.new("RGB", (32, 32), (200, 30, 90))
    out = build_transform(aug, train=True)(img)
    expected = (torch.tensor([200, 30, 90]) / 255 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD)
    zero = (out == 0).all(dim=0)
    assert zero.sum() >= 16  # at least a 4x4 corner of the 8x8 square
    assert torch.allclose(out[:, ~zero], expected[:, None].expand(3, int((~zero).sum())), atol=1e-6)


def test_cutout_zeros_exactly_a_clipped_square():
    x = torch.randn(3, 32, 32)
    for seed in range(200):
        torch.manual_seed(seed)
        cy, cx = int(torch.randint(32, ())), int(torch.randint(32, ()))
        torch.manual_seed(seed)
        out = Cutout(16)(x)
        expected = x.clone()
        expected[:, max(0, cy - 8):min(32, cy + 8), max(0, cx - 8):min(32, cx + 8)] = 0
        assert torch.equal(out, expected)
    assert not torch.equal(x, torch.zeros_like(x))  # the input is not modified in place


# --- Fast AutoAugment ------------------------------------------------------------------------------------


def test_every_policy_loads_and_applies():
    names = policy_names()
    assert "fa_shake26_2x96d_cifar100" in names and len(names) == 5
    random.seed(0)
    img = _random_image()
    for name in names:
        policy = load_policy(name)
        assert len(policy) > 400 and all(len(sub) == 2 for sub in policy)
        for sub in policy:  # every op of every sub-policy, at its own level
            for op, prob, level in sub:
                assert 0 <= prob <= 1 and 0 <= level <= 1
                out = apply_op(img, op, level)
                assert out.size == (32, 32) and out.mode == "RGB"
        faa = FastAutoAugment(policy)
        for seed in range(50):
            out = faa(_random_image(seed))
            assert isinstance(out, Image.Image) and out.size == (32, 32)


def test_unknown_policy_and_op_are_user_errors():
    with pytest.raises(MicronetError, match="fa_shake26_2x96d_cifar100"):
        load_policy("no_such_policy")
    with pytest.raises(MicronetError, match="Wobble"):
        FastAutoAugment([[("Wobble", 0.5, 0.5), ("Invert", 0.5, 0.5)]])


def test_point_ops_exact():
    img = _random_image()
    a = np.asarray(img)
    assert np.array_equal(np.asarray(apply_op(img, "Invert", 0.3)), 255 - a)
    assert np.array_equal(np.asarray(apply_op(img, "Posterize", 0.0)), a & 0xF0)  # 4 bits kept
    assert np.array_equal(np.asarray(apply_op(img, "Posterize", 0.5)), a & 0xFC)  # 6 bits
    assert np.array_equal(np.asarray(apply_op(img, "Posterize", 1.0)), a)  # 8 bits: identity
    assert np.array_equal(np.asarray(apply_op(img, "Solarize", 1.0)), a)  # threshold 256
    assert np.array_equal(np.asarray(apply_op(img, "Solarize", 0.0)), 255 - a)  # threshold 0
    for op in ("Contrast", "Color", "Brightness", "Sharpness"):  # level 0.5 -> factor 1.0
        assert np.array_equal(np.asarray(apply_op(img, op, 0.5)), a), op
    assert np.asarray(apply_op(img, "Brightness", 0.0)).mean() < 0.2 * a.mean()  # factor 0.1


def test_geometric_ops_move_pixels():
    img = _random_image()
    a = np.asarray(img)
    random.seed(0)
    for op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert not np.array_equal(np.asarray(apply_op(img, op, 1.0)), a), op
        assert np.array_equal(np.asarray(apply_op(img, op, 0.5)), a), op  # middle of a symmetric range: 0
    # Translation is a fraction of the size: 0.25 -> 8 pixels, the uncovered border black.
    out = np.asarray(augment.translate_x(img, 0.25))
    assert np.array_equal(out[:, :24], a[:, 8:]) and not out[:, 24:].any()
    out = np.asarray(augment.translate_y(img, -0.25))
    assert np.array_equal(out[8:], a[:24]) and not out[:8].any()


def test_geometric_ops_are_mirrored_both_ways():
    # TranslateX at level 1 moves by +-0.45*32 px: black on the right for +, on the left for -.
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    random.seed(0)
    left = right = 0
    for _ in range(400):
        out = np.asarray(apply_op(img, "TranslateX", 1.0))
        right += int(out[:, -1].max() == 0)
        left += int(out[:, 0].max() == 0)
    assert left + right == 400 and 150 < left < 250


def test_faa_cutout_is_a_gray_square():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    random.seed(0)
    for _ in range(100):
        gray = np.all(np.asarray(apply_op(img, "Cutout", 1.0)) == CUTOUT_FILL, axis=-1)  # side 0.2*32 = 6.4
        ys, xs = np.nonzero(gray)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert gray.sum() == h * w and h <= 7 and w <= 7  # one filled, possibly clipped, rectangle
    assert not np.asarray(apply_op(img, "Cutout", 0.0)).any()


def test_faa_picks_one_sub_policy_and_respects_probability():
    policy = [[("Invert", 1.0, 0.0), ("Invert", 0.0, 0.0)], [("Posterize", 1.0, 0.0), ("Invert", 1.0, 0.0)]]
    faa = FastAutoAugment(policy)
    img = _random_image()
    a = np.asarray(img)
    random.seed(0)
    outs = {np.asarray(faa(img)).tobytes() for _ in range(100)}
    # Sub-policy 1: one Invert (prob 0 never fires); sub-policy 2: Posterize then Invert. Nothing else.
    assert outs == {(255 - a).tobytes(), (255 - (a & 0xF0)).tobytes()}


# --- the synthetic data is learnable ---------------------------------------------------------------------


def test_synthetic_is_learnable(tmp_path, one_thread):
    write_synthetic_cifar100(tmp_path, 2000, 1000, seed=0)
    torch.manual_seed(0)
    train = load_cifar100(tmp_path, train=True, transform=build_transform(AugmentConfig(), train=True))
    test = load_cifar100(tmp_path, train=False, transform=build_transform(AugmentConfig(), train=False))
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(3):
        net.train()
        for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        x, y = next(iter(torch.utils.data.DataLoader(test, batch_size=len(test))))
        acc = (net(x).argmax(1) == y).float().mean().item()
    print(f"synthetic CIFAR-100: {acc:.1%} test accuracy after 3 epochs in {time.perf_counter() - start:.1f}s")
    assert acc > 0.2  # chance is 1%


# --- CLI -------------------------------------------------------------------------------------------------


def test_synth_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from stages.data import synth_command

    app = typer.Typer()
    app.command("synth")(synth_command)
    app.command("other")(lambda: None)  # two commands, so Typer keeps the subcommand name
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--train", "200", "--test", "100", "--seed", "3"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert "\n" not in line and str(tmp_path / "cifar-100-python") in line and "200" in line and "100" in line
    assert synthetic_manifest(tmp_path)["seed"] == 3
    assert len(load_cifar100(tmp_path, train=True)) == 200
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d"), "--source", "digits", "--train", "300",
                                      "--test", "100"])
    assert result.exit_code == 0 and "digits" in result.output and synthetic_manifest(tmp_path / "d")["n_train"] == 300
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "e"), "--source", "digits", "--train", "1700",
                                      "--test", "100"])
    assert result.exit_code != 0 and "at most 1797 together" in str(result.exception) and not (tmp_path / "e").exists()


def test_digits_writer_refuses_a_split_the_params_would_refuse(tmp_path):
    """The writer is also called directly (default n_train: the rest); its size rule is the params' one."""
    from micronet.data.digits import write_digits_cifar100

    with pytest.raises(MicronetError, match=r"train \(1792\) and test \(5\) must be at least 10 each"):
        write_digits_cifar100(tmp_path, n_test=5, seed=0)
    with pytest.raises(MicronetError, match="at most 1797 together"):
        write_digits_cifar100(tmp_path, n_test=100, seed=0, n_train=1698)
    assert not (tmp_path / "cifar-100-python").exists()
