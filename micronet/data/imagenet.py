"""ImageNet in torchvision's ImageFolder layout (`root/train/<wnid>/*.JPEG`, `root/val/<wnid>/*.JPEG`), the
standard ResNet transforms (random-resized crop + flip; resize + centre crop), the seeded validation hold-out,
and a synthetic stand-in written as real JPEG files in the same layout."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.datasets import ImageFolder

from micronet.config import AugmentConfig, DataConfig, ResizedCropConfig
from micronet.data.splits import Splits, split_indices
from micronet.errors import MicronetError
from micronet.paths import untracked_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # training crop and evaluation centre crop
EVAL_RESIZE = 256  # shorter side before the evaluation centre crop (ratio 8/7 to the crop)
SYNTHETIC_MANIFEST = "synthetic.json"  # marks a folder written by write_synthetic_imagenet
LAYOUT = "root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (torchvision ImageFolder layout)"


# --- transforms ----------------------------------------------------------------------------------------


def image_sizes(cfg: DataConfig) -> tuple[int, int]:
    """(crop, eval resize): 224/256 unless set; a crop alone keeps the standard 8/7 resize ratio."""
    size = cfg.image_size or IMAGE_SIZE
    resize = cfg.eval_resize or (EVAL_RESIZE if cfg.image_size is None else round(size * EVAL_RESIZE / IMAGE_SIZE))
    if resize < size:
        raise MicronetError(f"data.eval_resize ({resize}) must be at least data.image_size ({size}): "
                            "the evaluation centre crop is taken from the resized image")
    return size, resize


# AugmentConfig options the ImageNet transform does not apply; set, they would silently do nothing.
_UNSUPPORTED = {"autoaugment": None, "rotate": 0.0, "zoom": 1.0, "warp": 0.0, "brightness": 0.0, "contrast": 0.0,
                "cutout": 0}


def build_imagenet_transform(cfg: DataConfig, aug: Optional[AugmentConfig], train: bool) -> Callable:
    """Train: RandomResizedCrop (data.augment.random_resized_crop, default scale 0.08-1, ratio 3/4-4/3) ->
    flip -> float -> Normalize. Eval: Resize(shorter side) -> CenterCrop -> float -> Normalize.
    Normalization is ImageNet's unless data.mean/std are set. The padded crop (crop_padding) is a CIFAR
    augmentation: the random-resized crop replaces it here. `aug=None` means no augmentation: the eval
    transform, also for training.

    torchvision's v2 transforms on the uint8 tensor `read_rgb` decodes, not PIL: the decoded pixels are
    identical and the antialiased bilinear resize is within one uint8 level of PIL's (rounding), at about
    1.6x the images/s per core (bench/bench_loader.py)."""
    if aug is None:
        aug, train = AugmentConfig(), False
    for key, off in _UNSUPPORTED.items():
        if train and getattr(aug, key) != off:
            raise MicronetError(f"data.augment.{key} = {getattr(aug, key)!r} is not applied by the imagenet "
                                f"transform (random-resized crop + flip); set it to {off!r}")
    size, resize = image_sizes(cfg)
    if train:
        crop = aug.random_resized_crop or ResizedCropConfig()
        steps: list[Callable] = [v2.RandomResizedCrop(size, scale=crop.scale, ratio=crop.ratio, antialias=True)]
        if aug.hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if aug.normalize:
        steps.append(v2.Normalize(cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD))
    return v2.Compose(steps)


def read_rgb(path: str) -> torch.Tensor:
    """(3, H, W) uint8; grayscale and CMYK JPEGs become RGB (as PIL's convert("RGB")), and the format is
    read from the bytes, so a PNG with a .JPEG name (there is one in ImageNet's train set) decodes too."""
    return decode_image(path, mode=ImageReadMode.RGB)


# --- datasets ------------------------------------------------------------------------------------------


def split_folder(root: Path, split: str, what: str = "ImageNet", layout: str = LAYOUT) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise MicronetError(f"{what} not found: {folder.resolve()} is missing; expected {layout} "
                            f"with data.root = {root}")
    return folder


def check_class_folders(root: Path, what: str, layout: str, fix: str) -> list[str]:
    """The class folders (sorted) after checking that train/ and val/ exist and hold the same ones: ImageFolder
    numbers classes by sorted folder name, so both splits must list the same names for one index mapping."""
    train_dir, val_dir = split_folder(root, "train", what, layout), split_folder(root, "val", what, layout)
    train_classes = sorted(e.name for e in train_dir.iterdir() if e.is_dir())
    val_classes = sorted(e.name for e in val_dir.iterdir() if e.is_dir())
    if not train_classes:
        raise MicronetError(f"{what} not usable: {train_dir.resolve()} has no class folders; expected {layout}")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise MicronetError(
            f"{what} at {root.resolve()}: train/ and val/ must hold the same class folders (one index mapping); "
            f"only in train: {only_train[:3]}{'...' if len(only_train) > 3 else ''} ({len(only_train)}), "
            f"only in val: {only_val[:3]}{'...' if len(only_val) > 3 else ''} ({len(only_val)}) - {fix}"
        )
    return train_classes


def check_imagenet(root: str | Path) -> list[str]:
    """The class folders (sorted wnids) after checking that train/ and val/ exist and hold the same ones."""
    return check_class_folders(untracked_input(root), "ImageNet", LAYOUT,
                               "sort the official val images into <wnid> folders")


def imagenet_num_classes(cfg: DataConfig) -> int:
    return len(check_imagenet(cfg.root))


def ensure_imagenet(cfg: DataConfig) -> None:
    """Fail fast, in one line, before a stage starts its worker processes; with data.synthetic, write the
    synthetic set first if `root` does not hold it (the toy run)."""
    if cfg.synthetic is not None:
        synth, root = cfg.synthetic, untracked_input(cfg.root)
        wanted = {"seed": synth.seed, "classes": synth.classes, "train_per_class": synth.train,
                  "val_per_class": synth.test, "size": synth.size}
        manifest = synthetic_imagenet_manifest(root)
        if manifest is None or any(manifest.get(k) != v for k, v in wanted.items()):
            write_synthetic_imagenet(root, synth.classes, synth.train, synth.test, synth.size, synth.seed)
    if cfg.download:
        raise MicronetError(f"ImageNet cannot be downloaded (data.download: true); put it at {cfg.root} as {LAYOUT} "
                            "and set data.download: false")
    check_imagenet(cfg.root)


def load_imagenet(root: str | Path, split: str, transform: Optional[Callable] = None) -> ImageFolder:
    """One split folder (train or val) as torchvision's ImageFolder: classes are the sorted wnid folders,
    so train and val share one index mapping (check_imagenet makes sure they hold the same folders)."""
    folder = split_folder(untracked_input(root), split)
    try:
        return ImageFolder(str(folder), transform=transform, loader=read_rgb)
    except (FileNotFoundError, OSError) as e:  # an empty class folder, or no images with an image extension
        raise MicronetError(f"ImageNet not usable at {folder.resolve()}: {e}; expected {LAYOUT}") from None


def with_transform(ds: ImageFolder, transform: Callable) -> ImageFolder:
    """A second view of the same file list (shared, not rescanned) with another transform."""
    view = copy.copy(ds)
    view.transform = transform
    return view


def imagenet_test(cfg: DataConfig) -> ImageFolder:
    """The official val/ folder (eval transform): all the score stage reads, so train/'s 1.28M files are not
    listed for it (check_imagenet still makes sure both hold the same class folders)."""
    check_imagenet(cfg.root)
    return load_imagenet(cfg.root, "val", transform=build_imagenet_transform(cfg, cfg.augment, train=False))


def imagenet_splits(cfg: DataConfig) -> Splits:
    """Train (train transform); val: data.val_size images held out of train/ (seeded, eval transform);
    test: the official val/ folder (eval transform, the score stage only); train_eval: train, eval transform."""
    if cfg.copies:
        raise MicronetError("data.copies (several augmented copies of the training set) is CIFAR-only; "
                            "use data.augment for imagenet")
    test = imagenet_test(cfg)
    train_tf = build_imagenet_transform(cfg, cfg.augment, train=True)
    eval_tf = build_imagenet_transform(cfg, cfg.augment, train=False)
    full = load_imagenet(cfg.root, "train", transform=train_tf)
    if test.class_to_idx != full.class_to_idx:  # a class folder with no images is dropped by one of them
        raise MicronetError(f"ImageNet at {cfg.root}: train/ and val/ class folders differ once empty ones are "
                            "skipped; every class folder needs at least one image in both")
    train_idx, val_idx = split_indices(len(full), cfg.val_size, cfg.split_seed)
    full_eval = with_transform(full, eval_tf)
    val = Subset(full_eval, val_idx) if val_idx else None
    return Splits(train=Subset(full, train_idx), val=val, test=test, train_eval=Subset(full_eval, train_idx))


# --- synthetic data ------------------------------------------------------------------------------------

# Each class: its own mean colour (well apart in RGB) and its own texture (one of 4 flip- and
# crop-tolerant kinds at one of 2 scales); per image a random phase, colour jitter, contrast and noise,
# and a random aspect ratio as real photos have. The colour survives any crop, so a tiny net learns it.
_TEXTURES = 4


def _class_colour(c: int, classes: int) -> np.ndarray:
    """Evenly spaced hues at alternating brightness, as RGB in [0, 255]."""
    hue = 6.0 * c / classes
    rgb = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return 50.0 + rgb * (150.0 if c % 2 else 200.0)


def _synthetic_image(c: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: shorter side `size`, longer side up to 4/3 of it."""
    long = int(rng.integers(size, size * 4 // 3 + 1))
    h, w = (size, long) if rng.random() < 0.5 else (long, size)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) / size
    kind, periods = c % _TEXTURES, (6.0, 14.0)[(c // _TEXTURES) % 2]
    freq, phase = 2 * np.pi * periods, rng.uniform(0, 2 * np.pi)
    if kind == 0:  # horizontal stripes
        pattern = np.cos(freq * y + phase)
    elif kind == 1:  # vertical stripes
        pattern = np.cos(freq * x + phase)
    elif kind == 2:  # checkerboard
        pattern = np.cos(freq * x + phase) * np.cos(freq * y + rng.uniform(0, 2 * np.pi))
    else:  # rings around a random centre
        cy, cx = rng.uniform(0.2, 0.8, size=2) * (h / size, w / size)
        pattern = np.cos(freq * np.hypot(y - cy, x - cx) + phase)
    colour = _class_colour(c, classes) + rng.normal(0, 12, size=3)
    img = colour + (pattern * rng.uniform(25, 45))[..., None] + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def synthetic_imagenet_manifest(root: str | Path) -> Optional[dict]:
    """The manifest of a synthetic ImageNet under root, or None for real (or absent) data."""
    path = Path(root) / SYNTHETIC_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_synthetic_imagenet(
    out: str | Path, classes: int, train_per_class: int, val_per_class: int, size: int, seed: int
) -> Path:
    """Write a deterministic synthetic ImageNet to `out` in the ImageFolder layout (wnid-like folders
    n00000000, n00000001, ...; JPEG files, shorter side `size`) with a manifest; returns `out`.
    Point `data.root` at it."""
    if classes < 2 or train_per_class < 1 or val_per_class < 1 or size < 8:
        raise MicronetError(f"synthetic ImageNet needs >= 2 classes, >= 1 train and val image per class and "
                            f"size >= 8 (got {classes}, {train_per_class}, {val_per_class}, {size})")
    out = Path(out)
    if out.exists() and synthetic_imagenet_manifest(out) is None and any(out.iterdir()):
        raise MicronetError(f"{out} holds data that is not synthetic (no {SYNTHETIC_MANIFEST}); not overwriting it")
    for split in ("train", "val"):  # a rewrite with fewer classes or images leaves no stale files
        shutil.rmtree(out / split, ignore_errors=True)
    wnids = [f"n{c:08d}" for c in range(classes)]
    for stream, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c, wnid in enumerate(wnids):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, stream, c])
            for i in range(per_class):
                image = Image.fromarray(_synthetic_image(c, classes, size, rng))
                image.save(folder / f"{wnid}_{i:05d}.JPEG", format="JPEG", quality=90)
    manifest = {"synthetic": True, "seed": seed, "classes": classes, "train_per_class": train_per_class,
                "val_per_class": val_per_class, "size": size}
    (out / SYNTHETIC_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out

