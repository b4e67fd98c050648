"""CIFAR-100: torchvision's loader (the original files, or a folder whose manifest records its own md5s: a verified
copy or a stand-in written here), the seeded train/validation split, Wave's transforms, and a synthetic stand-in
written in CIFAR-100's own on-disk format so every pipeline runs without the real data."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100
from torchvision.datasets.vision import StandardTransform

from micronet.augment import Cutout, FastAutoAugment, load_policy
from micronet.config import AugmentConfig, DataConfig, SynthConfig
from micronet.errors import MicronetError
from micronet.paths import file_digest, untracked_input
from micronet.data.splits import Splits, split_indices, training_copies

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
NUM_CLASSES = 100
BASE_FOLDER = CIFAR100.base_folder  # "cifar-100-python"
SYNTHETIC_MANIFEST = "synthetic.json"  # marks a folder written here (write_cifar100_format), not the real files
VERIFIED_MANIFEST = "MANIFEST.json"  # marks a verified copy of the real data whose md5s differ from the originals'
MANIFESTS = (VERIFIED_MANIFEST, SYNTHETIC_MANIFEST)  # either one: check its md5s, not torchvision's
FILES = ("train", "test", "meta")


# --- transforms ----------------------------------------------------------------------------------------


def build_transform(
    aug: Optional[AugmentConfig], train: bool, mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD, size: int = 32,
) -> Callable:
    """FAA (PIL) -> colour jitter -> random-resized or padded crop -> flip -> affine -> ToTensor -> Normalize ->
    Cutout (tensor). Wave's order is the subset FAA -> RandomCrop -> HFlip -> ToTensor -> Normalize -> Cutout.

    Eval is ToTensor -> Normalize. `aug=None` means no augmentation (normalization stays on)."""
    aug = aug if aug is not None else AugmentConfig(crop_padding=0, hflip=False, cutout=0)
    steps: list[Callable] = []
    if train:
        if aug.autoaugment:
            steps.append(FastAutoAugment(load_policy(aug.autoaugment)))
        for strength, jitter in ((aug.brightness, "brightness"), (aug.contrast, "contrast")):
            if strength > 0:  # one draw per property, each applied with p_lighting (fastai's brightness/contrast)
                steps.append(T.RandomApply([T.ColorJitter(**{jitter: strength})], p=aug.p_lighting))
        if aug.random_resized_crop is not None:
            rrc = aug.random_resized_crop
            steps.append(T.RandomResizedCrop(size, scale=rrc.scale, ratio=rrc.ratio))
        elif aug.crop_padding > 0:
            steps.append(T.RandomCrop(size, padding=aug.crop_padding, fill=aug.crop_fill,
                                      padding_mode=aug.crop_padding_mode))
        if aug.hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += _affine(aug, size)
    steps.append(T.ToTensor())
    if aug.normalize:
        steps.append(T.Normalize(mean, std))
    if train and aug.cutout > 0:
        steps.append(Cutout(aug.cutout))
    return T.Compose(steps)


def _affine(aug: AugmentConfig, size: int) -> list[Callable]:
    """fastai v1's rotate / zoom / symmetric warp, each with probability p_affine, with a reflected border: the
    image is reflect-padded, transformed, and centre-cropped back. torchvision's RandomPerspective stands in for
    fastai's symmetric_warp (it moves the four corners independently rather than in mirrored pairs)."""
    ops: list[Callable] = []
    if aug.rotate > 0:
        ops.append(T.RandomApply([T.RandomRotation(aug.rotate)], p=aug.p_affine))
    if aug.zoom > 1:
        ops.append(T.RandomApply([T.RandomAffine(0, scale=(1.0, aug.zoom))], p=aug.p_affine))
    if aug.warp > 0:
        ops.append(T.RandomPerspective(aug.warp, p=aug.p_affine))
    if not ops:
        return []
    border = size // 4
    return [T.Pad(border, padding_mode="reflect"), *ops, T.CenterCrop(size)]


# --- datasets ------------------------------------------------------------------------------------------


# (resolved path, size, mtime_ns) -> md5: a stage loads train and test (torchvision hashes every file per split),
# and 180 MB of real data takes a noticeable while to hash, so each unchanged file is hashed once per process.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _hash_file(path: Path) -> str:
    return file_digest(path, "md5")


def file_md5(path: Path) -> str:
    """The md5 of `path`, remembered for as long as its size and modification time stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = _hash_file(path)
    return _MD5_CACHE[key]


class ManifestCIFAR100(CIFAR100):
    """torchvision's CIFAR100 for a folder with a manifest (MANIFEST.json: a verified copy of the real data;
    synthetic.json: a stand-in written here): checks the md5s the manifest records instead of the original
    files' (torchvision verifies those even with download=False), each file once per process, and says which
    file failed. Parsing is torchvision's."""

    def __init__(self, root: str | Path, md5: dict[str, str], manifest: str = SYNTHETIC_MANIFEST,
                 **kwargs) -> None:
        self.train_list = [["train", md5["train"]]]
        self.test_list = [["test", md5["test"]]]
        self.meta = {**CIFAR100.meta, "md5": md5["meta"]}
        self.manifest = manifest
        super().__init__(root, **kwargs)

    def _check_integrity(self) -> bool:
        """The split's file and meta (not every split, as torchvision does); a mismatch is one MicronetError line."""
        split = self.train_list if self.train else self.test_list
        for name, expected in [*split, [self.meta["filename"], self.meta["md5"]]]:
            _verify(Path(self.root) / self.base_folder, name, expected, self.manifest)
        return True

    def _load_meta(self) -> None:
        """torchvision's, without hashing meta again (`_check_integrity` did, just before)."""
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _verify(folder: Path, name: str, expected: str, manifest: str) -> None:
    """One line naming the file, its md5 and what to do, rather than torchvision's "not found or corrupted"."""
    folder = folder.resolve()
    fix = ("copy the folder again from its source" if manifest == VERIFIED_MANIFEST else
           f"it changed after it was written here; delete {folder} and write it again (`micronet data synth`, "
           f"or a stage with data.synthetic set)")
    path = folder / name
    if not path.is_file():
        raise MicronetError(f"CIFAR-100 at {folder}: {name} is missing ({manifest} lists it); {fix}")
    got = file_md5(path)
    if got != expected:
        raise MicronetError(f"CIFAR-100 at {folder}: {name} does not match {manifest}'s md5 ({got}, expected "
                            f"{expected}); the copy is damaged: {fix}")


def cifar100_manifest(root: str | Path) -> Optional[tuple[str, dict]]:
    """(file name, contents) of the manifest under root/cifar-100-python (MANIFEST.json before synthetic.json), or
    None for the original files (or none). A manifest without md5s for train, test and meta is refused."""
    folder = Path(root) / BASE_FOLDER
    for name in MANIFESTS:
        path = folder / name
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise MicronetError(f"CIFAR-100 at {folder.resolve()}: {name} is not readable JSON ({e})") from None
            md5 = manifest.get("md5") if isinstance(manifest, dict) else None
            if not isinstance(md5, dict) or any(not isinstance(md5.get(f), str) for f in FILES):
                raise MicronetError(f"CIFAR-100 at {folder.resolve()}: {name} has no \"md5\" entry for each of "
                                    f"{', '.join(FILES)}; it cannot vouch for the files")
            return name, manifest
    return None


def synthetic_manifest(root: str | Path) -> Optional[dict]:
    """The manifest of a stand-in written here under root (synthetic.json), or None for real (or absent)
    CIFAR-100: what ensure_cifar100 compares with data.synthetic to decide whether to write it again."""
    path = Path(root) / BASE_FOLDER / SYNTHETIC_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_cifar100(
    root: str | Path, train: bool, download: bool = False, transform: Optional[Callable] = None
) -> CIFAR100:
    """CIFAR-100 from `root/cifar-100-python/{train,test,meta}` (torchvision's layout): checked against its
    manifest's md5s where it has one (a verified copy, or a stand-in written here), else torchvision's."""
    root = untracked_input(root)
    found = cifar100_manifest(root)
    try:
        if found is not None:
            name, manifest = found
            return ManifestCIFAR100(root, manifest["md5"], name, train=train, transform=transform)
        return CIFAR100(root, train=train, transform=transform, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted" (missing file or md5 mismatch)
        raise _not_usable(root) from None
    except OSError as e:  # download=True without network, or an unreadable folder
        action = f"download CIFAR-100 from {CIFAR100.url} to" if download else "read CIFAR-100 at"
        raise MicronetError(f"could not {action} {root.resolve()}: {e}") from None


def _not_usable(root: Path) -> MicronetError:
    folder = (root / BASE_FOLDER).resolve()
    missing = [f for f in ("train", "test", "meta") if not (folder / f).is_file()]
    problem = f"missing {', '.join(missing)}" if missing else "corrupted or not CIFAR-100 (md5 check failed)"
    return MicronetError(
        f"CIFAR-100 not usable at {folder}: {problem}; put the extracted 'cifar-100-python' folder "
        f"(train, test, meta) in {root.resolve()}, or set `data.download: true` in params.yaml to download it"
    )


def ensure_cifar100(cfg: DataConfig) -> None:
    """Before a stage starts its worker processes: download once (data.download) or fail fast in one line,
    rather than in every rank."""
    root = untracked_input(cfg.root)
    if cfg.synthetic is not None:
        synth = cfg.synthetic
        manifest = synthetic_manifest(root) or {}
        wanted = {"source": synth.source, "seed": synth.seed, "n_train": synth.train, "n_test": synth.test}
        if synth.source == "cifar100":
            wanted.update(classes=synth.classes, copy_of=str(untracked_input(synth.copy_of).resolve()))
        if any(manifest.get(k, "synthetic" if k == "source" else None) != v for k, v in wanted.items()):
            write_stand_in_cifar100(root, synth)
        return
    if cfg.download:
        for train in (True, False):
            load_cifar100(root, train=train, download=True)
    elif any(not (root / BASE_FOLDER / f).is_file() for f in ("train", "test", "meta")):
        raise _not_usable(root)


def _with_transform(ds: CIFAR100, transform: Callable) -> CIFAR100:
    """A second view of the same images (the arrays are shared, not copied) with another transform."""
    view = copy.copy(ds)
    view.transform = transform
    view.transforms = StandardTransform(transform, ds.target_transform)
    return view


def cifar100_test(cfg: DataConfig) -> CIFAR100:
    """The test file (eval transform): all the score stage reads."""
    transform = build_transform(cfg.augment, train=False, mean=cfg.mean or CIFAR100_MEAN,
                                std=cfg.std or CIFAR100_STD, size=cfg.image_size or 32)
    return load_cifar100(cfg.root, train=False, download=False, transform=transform)


def cifar100_splits(cfg: DataConfig) -> Splits:
    """Train (train transform; one view per entry of data.copies), val held out of the training file (eval
    transform), test (eval transform)."""
    mean, std = cfg.mean or CIFAR100_MEAN, cfg.std or CIFAR100_STD
    size = cfg.image_size or 32
    augments = list(cfg.copies) or [cfg.augment]
    eval_tf = build_transform(cfg.augment, train=False, mean=mean, std=std, size=size)
    full = load_cifar100(cfg.root, train=True, download=cfg.download, transform=eval_tf)
    train_idx, val_idx = split_indices(len(full), cfg.val_size, cfg.split_seed)
    test = cifar100_test(cfg)
    train = training_copies([_with_transform(full, build_transform(aug, True, mean, std, size)) for aug in augments],
                            train_idx)
    val = Subset(full, val_idx) if val_idx else None
    return Splits(train=train, val=val, test=test, train_eval=Subset(full, train_idx), augments=augments)


# --- synthetic data ------------------------------------------------------------------------------------

# Each class: its own mean colour (a 5x5x4 grid over RGB, fixed permutation) and its own texture
# (one of 5 flip-tolerant pattern kinds at one of 2 frequencies, then 1 of 2 pattern strengths). Images
# add a random phase/centre (shift), per-image colour jitter, a random pattern contrast and pixel noise,
# so a small CNN learns it well above chance in a few epochs and pad-4 crop + flip keep the class.
_GRID = np.stack(np.meshgrid(np.linspace(40, 215, 5), np.linspace(40, 215, 5), np.linspace(50, 205, 4),
                             indexing="ij"), axis=-1).reshape(-1, 3)
_CLASS_COLOUR = _GRID[np.random.default_rng(1234).permutation(NUM_CLASSES)]  # (100, 3), independent of seed


def _class_pattern(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32) texture in [-1, 1] for class c with a random phase or centre per image."""
    kind, freq = c % 5, (2 * np.pi / 8, 2 * np.pi / 4)[(c // 5) % 2]
    y, x = np.mgrid[0:32, 0:32].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    if kind == 0:  # horizontal stripes
        return np.cos(freq * y + phase)
    if kind == 1:  # vertical stripes
        return np.cos(freq * x + phase)
    if kind == 2:  # checkerboard
        return np.cos(freq * x + phase) * np.cos(freq * y + rng.uniform(0, 2 * np.pi, size=(n, 1, 1)))
    if kind == 3:  # diagonal lattice (both diagonals, so a flip keeps it)
        return 0.5 * (np.cos(freq * (x + y) / np.sqrt(2) + phase) + np.cos(freq * (x - y) / np.sqrt(2) + phase))
    cy, cx = rng.uniform(8, 24, size=(2, n, 1, 1))  # rings around a random centre
    return np.cos(freq * np.hypot(x - cx, y - cy) + phase)


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows, channel-major (R plane, G plane, B plane), like CIFAR's `data`."""
    out = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        strength = (30.0, 55.0)[(c // 10) % 2]
        pattern = _class_pattern(int(c), n, rng) * rng.uniform(0.6, 1.2, size=(n, 1, 1)) * strength
        colour = _CLASS_COLOUR[c] + rng.normal(0, 18, size=(n, 3))
        img = colour[:, :, None, None] + pattern[:, None] + rng.normal(0, 30, size=(n, 3, 32, 32))
        out[idx] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out.reshape(len(labels), 3072)


def _write_pickle(path: Path, obj: dict) -> str:
    """Pickle like the real (Python 2) files read back: str keys, loadable with encoding="latin1"."""
    data = pickle.dumps(obj, protocol=2)
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()


def write_synthetic_cifar100(out: Path, n_train: int, n_test: int, seed: int) -> Path:
    """Write a deterministic synthetic CIFAR-100 to `out/cifar-100-python/` (train, test, meta and a
    manifest with their md5s); returns that folder. Point `data.root` at `out` to use it."""
    if n_train < 1 or n_test < 1:
        raise MicronetError(f"synthetic CIFAR-100 needs at least 1 train and 1 test image (got {n_train}, {n_test})")
    splits = {}
    for split, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(np.arange(n) % NUM_CLASSES)  # balanced over the 100 fine classes
        splits[split] = (labels, _synthetic_images(labels, rng))
    names = [f"synthetic_{c:02d}" for c in range(NUM_CLASSES)]
    return write_cifar100_format(out, splits, names, {"synthetic": True, "seed": seed, "n_train": n_train,
                                                      "n_test": n_test})


def write_stand_in_cifar100(out: Path, synth: SynthConfig) -> Path:
    """Write what `synth` describes (generated patterns, or scikit-learn's digits) to `out/cifar-100-python/`."""
    if synth.source == "cifar100":
        return write_cifar100_slice(out, untracked_input(synth.copy_of), synth.classes, synth.train, synth.test,
                                    synth.seed)
    if synth.source == "digits":
        from micronet.data.digits import write_digits_cifar100

        return write_digits_cifar100(out, synth.test, synth.seed, n_train=synth.train)
    return write_synthetic_cifar100(out, synth.train, synth.test, synth.seed)


def write_cifar100_format(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str],
                          manifest: dict) -> Path:
    """Write `out/cifar-100-python/{train,test,meta}` from {split: (labels, (N, 3072) uint8 rows)} and the 100
    fine class names, plus a manifest (`manifest` and the files' md5s) that marks the folder as written here;
    returns that folder. Refuses a folder that holds other data (no manifest)."""
    folder = Path(out) / BASE_FOLDER
    if (folder / VERIFIED_MANIFEST).exists():
        raise MicronetError(f"{folder} holds a verified copy of the real data ({VERIFIED_MANIFEST}); not overwriting "
                            f"it: point data.root (or --out) somewhere else for a stand-in")
    if folder.exists() and synthetic_manifest(out) is None and any(folder.iterdir()):
        raise MicronetError(f"{folder} holds data that is not synthetic (no {SYNTHETIC_MANIFEST}); not overwriting it")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = manifest.get("source", "synthetic")
    md5 = {}
    for split, (labels, data) in splits.items():
        md5[split] = _write_pickle(folder / split, {
            "filenames": [f"{prefix}_{split}_{i:06d}.png" for i in range(len(labels))],
            "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),  # 5 fine classes per superclass, as in CIFAR-100
            "data": data,
        })
    md5["meta"] = _write_pickle(folder / "meta", {
        "fine_label_names": names,
        "coarse_label_names": [f"{prefix}_super_{c:02d}" for c in range(NUM_CLASSES // 5)],
    })
    (folder / SYNTHETIC_MANIFEST).write_text(json.dumps({**manifest, "md5": md5}, indent=2) + "\n")
    return folder


def write_cifar100_slice(out: Path, copy_of: Path, classes: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A fixed slice of a real CIFAR-100 copy (verified on reading): the first `n_train` training and `n_test` test
    images, in file order, whose fine label is below `classes` (labels and pixels unchanged), for tests and toy
    runs on real images that take seconds. With 100 classes the test file is the first `n_test` images of the
    real test split, so a net's accuracy there is a slice of its full-split figure."""
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ds = load_cifar100(copy_of, train=split == "train")
        labels = np.asarray(ds.targets)
        idx = np.flatnonzero(labels < classes)[:n]
        if len(idx) < n:
            raise MicronetError(f"{copy_of}: its {split} split has {len(idx)} images of the first {classes} classes, "
                                f"fewer than the {n} asked for")
        splits[split] = (labels[idx], ds.data[idx].transpose(0, 3, 1, 2).reshape(len(idx), 3072))
    names = list(load_cifar100(copy_of, train=False).classes)
    manifest = {"source": "cifar100", "synthetic": False, "seed": seed, "n_train": n_train, "n_test": n_test,
                "classes": classes, "copy_of": str(Path(copy_of).resolve())}
    return write_cifar100_format(out, splits, names, manifest)
