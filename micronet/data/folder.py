"""Your own images (`data.dataset: imagefolder`): torchvision's ImageFolder layout, `root/train/<class>/*` and
`root/val/<class>/*`, any image size and class count. Each image is read as RGB and brought to `data.image_size`
square (shorter side resized, centre crop) as it is read, so the CIFAR transforms and every `data.augment` option
(Fast AutoAugment, padded or random-resized crop, flip, cutout) and `data.copies` apply to it as to CIFAR-100.

Splits as for ImageNet: `data.val_size` images held out of train/ (seeded), val/ is the test split the score stage
alone reads. Normalization is ImageNet's unless `data.mean`/`data.std` are set."""

from __future__ import annotations

from typing import Callable

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from micronet.config import DataConfig
from micronet.data.cifar import build_transform
from micronet.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, check_class_folders, split_folder, with_transform
from micronet.data.splits import Splits, split_indices, training_copies
from micronet.errors import MicronetError
from micronet.paths import untracked_input

WHAT = "image folder"
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (torchvision ImageFolder layout: .jpg, .png, ...)"


class ReadSquare:
    """ImageFolder's loader: the file as an RGB PIL image of `size` x `size`. A file PIL cannot read stops the run
    naming it (rather than a decoder traceback from a worker process)."""

    def __init__(self, size: int) -> None:
        self.square = T.Compose([T.Resize(size), T.CenterCrop(size)])

    def __call__(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise MicronetError(f"image folder: cannot read {path} ({e}); remove or replace the file") from None
        return self.square(rgb)


def check_image_folder(cfg: DataConfig) -> list[str]:
    """The class names (sorted folder names) after checking the layout; fails in one line naming what is wrong."""
    root = untracked_input(cfg.root)
    if not root.is_dir():
        raise MicronetError(f"image folder not found: data.root = {cfg.root} ({root.resolve()}) is not a folder; "
                            f"expected {LAYOUT}")
    return check_class_folders(root, WHAT, LAYOUT, "give every class a folder, with images, in both")


def load_image_folder(cfg: DataConfig, split: str, transform: Callable) -> ImageFolder:
    folder = split_folder(untracked_input(cfg.root), split, WHAT, LAYOUT).resolve()  # files read later, any cwd
    try:
        return ImageFolder(str(folder), transform=transform, loader=ReadSquare(cfg.image_size))
    except (FileNotFoundError, OSError) as e:  # a class folder without any file with an image extension
        raise MicronetError(f"image folder not usable at {folder}: {e}") from None


def _transform(cfg: DataConfig, aug, train: bool) -> Callable:
    return build_transform(aug, train, mean=cfg.mean or IMAGENET_MEAN, std=cfg.std or IMAGENET_STD,
                           size=cfg.image_size)


def image_folder_test(cfg: DataConfig) -> ImageFolder:
    """val/ (eval transform): all the score stage reads."""
    check_image_folder(cfg)
    return load_image_folder(cfg, "val", _transform(cfg, cfg.augment, train=False))


def image_folder_splits(cfg: DataConfig) -> Splits:
    """Train (train transform; one view per entry of data.copies), val held out of train/ (eval transform), test:
    val/ (eval transform)."""
    test = image_folder_test(cfg)
    eval_tf = _transform(cfg, cfg.augment, train=False)
    full = load_image_folder(cfg, "train", eval_tf)
    if test.class_to_idx != full.class_to_idx:
        raise MicronetError(f"image folder at {cfg.root}: train/ and val/ class folders differ once empty ones are "
                            "skipped; every class folder needs at least one image in both")
    train_idx, val_idx = split_indices(len(full), cfg.val_size, cfg.split_seed)
    augments = list(cfg.copies) or [cfg.augment]
    train = training_copies([with_transform(full, _transform(cfg, aug, train=True)) for aug in augments], train_idx)
    val = Subset(full, val_idx) if val_idx else None
    return Splits(train=train, val=val, test=test, train_eval=Subset(full, train_idx), augments=augments)


def image_folder_classes(cfg: DataConfig) -> int:
    return len(check_image_folder(cfg))


def ensure_image_folder(cfg: DataConfig) -> None:
    if cfg.download:
        raise MicronetError("data.download: true is for CIFAR-100; an image folder is read where data.root says "
                            "(set data.download: false)")
    check_image_folder(cfg)
