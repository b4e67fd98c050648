"""Your own images (`data.dataset: imagefolder`): any size and class count in ImageFolder layout, one-line errors
for an empty or malformed folder, and the digits written as such a folder for the toy run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from micronet.config import DataConfig, SynthConfig
from micronet.data import build_splits, build_test, ensure_dataset, num_classes, write_digits_folder
from micronet.errors import MicronetError


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits3"), classes=3, n_train=120, n_test=30, seed=0)


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 24, "val_size": 20, **kw})


def _copy(digits: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits, tmp_path / "images"))


def test_digits_folder_is_png_files_of_mixed_sizes_in_imagefolder_layout(digits):
    for split, n in (("train", 120), ("val", 30)):
        assert sorted(p.name for p in (digits / split).iterdir()) == ["digit_0", "digit_1", "digit_2"]
        files = sorted((digits / split).rglob("*.png"))
        assert len(files) == n
    sizes = {Image.open(f).size for f in (digits / "train").rglob("*.png")}
    assert len(sizes) > 20 and any(w != h for w, h in sizes)  # not one size, not all square


def test_any_size_comes_out_at_image_size_with_one_label_per_class_folder(digits):
    cfg = _cfg(digits)
    ensure_dataset(cfg)
    splits = build_splits(cfg)
    assert num_classes(cfg) == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 20, 30)
    x, y = splits.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert sorted({splits.test[i][1] for i in range(len(splits.test))}) == [0, 1, 2]
    assert build_test(cfg)[0][0].shape == (3, 24, 24)
    # the eval transform is deterministic and normalized with ImageNet's statistics unless data.mean/std say
    assert torch.equal(splits.test[3][0], build_test(cfg)[3][0])
    black = build_test(_cfg(digits, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))[3][0]
    assert black.min() >= 0 and torch.allclose(black[0], (splits.test[3][0][0] * 0.229 + 0.485), atol=1e-5)


def test_every_augmentation_and_several_copies_apply_as_for_cifar(digits):
    aug = {"autoaugment": "fa_shake26_2x96d_cifar100", "crop_padding": 4, "hflip": False, "cutout": 8}
    splits = build_splits(_cfg(digits, copies=[aug, {**aug, "autoaugment": None}]))
    assert len(splits.train) == 200 and splits.train[0][0].shape == (3, 24, 24)


def test_params_need_an_image_size_and_refuse_synthetic_data(digits):
    with pytest.raises(ValidationError, match="needs data.image_size"):
        DataConfig(dataset="imagefolder", root=str(digits))
    with pytest.raises(ValidationError, match="remove data.synthetic"):
        _cfg(digits, synthetic={"source": "synthetic"})
    with pytest.raises(ValidationError, match="at most 522 together"):  # 3 x 174, the rarest digit's count
        SynthConfig(source="digits-folder", classes=3, train=500, test=30)


def _one_line(cfg: DataConfig, match: str) -> None:
    with pytest.raises(MicronetError, match=match) as info:
        build_splits(cfg)
    assert "\n" not in str(info.value)


def test_missing_or_malformed_folders_are_one_line_naming_what_is_wrong(digits, tmp_path):
    _one_line(_cfg(tmp_path / "nowhere"), "data.root = .*nowhere.* is not a folder")
    images = _copy(digits, tmp_path)
    shutil.rmtree(images / "val")
    _one_line(_cfg(images), r"image folder not found: .*val is missing")
    (images / "val").mkdir()
    _one_line(_cfg(images), "only in train: \\['digit_0', 'digit_1', 'digit_2'\\]")
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
        shutil.copy(next((digits / split / "digit_0").iterdir()), flat / split / "a.png")  # no class folders
    _one_line(_cfg(flat), r"train has no class folders")


def test_an_empty_class_folder_and_an_unreadable_image_are_one_line(digits, tmp_path):
    images = _copy(digits, tmp_path)
    for f in (images / "val" / "digit_2").iterdir():
        f.unlink()
    _one_line(_cfg(images), "Found no valid file for the classes digit_2")
    images = _copy(digits, tmp_path / "again")
    broken = next((images / "train" / "digit_1").iterdir())
    broken.write_bytes(b"not an image")
    splits = build_splits(_cfg(images, val_size=0))
    index = [Path(p).name for p, _ in splits.train.dataset.samples].index(broken.name)
    with pytest.raises(MicronetError, match=f"cannot read .*{broken.name}.*remove or replace the file"):
        splits.train[index]


def test_the_data_command_writes_the_folder_and_refuses_too_many_images(tmp_path):
    from micronet.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--source", "digits-folder", "--classes", "2", "--train", "40",
                                 "--test", "10", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "digits 0-1 as an image folder" in result.output
    assert len(list((tmp_path / "d" / "val").rglob("*.png"))) == 10
    result = runner.invoke(app, ["data", "synth", "--source", "digits-folder", "--classes", "11",
                                 "--out", str(tmp_path / "e")])
    assert result.exit_code != 0


def test_an_unreadable_image_met_in_a_worker_process_is_still_one_line(digits, tmp_path):
    from micronet.cli import one_line
    from torch.utils.data import DataLoader

    images = _copy(digits, tmp_path)
    for f in (images / "train" / "digit_1").iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(MicronetError) as info:
        for _ in DataLoader(build_splits(_cfg(images, val_size=0)).train, batch_size=8, num_workers=1):
            pass
    assert "Original Traceback" in str(info.value)  # what torch makes of it
    line = one_line(info.value)
    assert line.startswith("image folder: cannot read ") and "remove or replace the file" in line and "\n" not in line
