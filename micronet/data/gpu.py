"""CIFAR training data resident on the device, augmented a batch at a time (`data.loader: gpu`).

For small networks a GPU trains far more images per second than PIL workers can augment (airbench keeps
CIFAR on the GPU for this reason). `GpuCifarLoader` keeps the uint8 training images on the device and runs
`build_transform`'s train pipeline as batched tensor ops with per-image random parameters, in the same
order: Fast AutoAugment -> padded random crop -> horizontal flip -> ToTensor -> Normalize -> Cutout.

What matches the worker path, and how closely:

- Crop (constant fill or reflect), flip, ToTensor + Normalize and Cutout give the same result as
  torchvision / `micronet.augment.Cutout` for the same parameters (bit for bit; tests check it).
- Fast AutoAugment: every op of `micronet.augment.OPS` equals the PIL op bit for bit (max and mean absolute
  difference 0 uint8 levels against Pillow 13.0 on x86-64, for every op value the policy files use, both
  signs; `tests/test_gpu_data.py::test_faa_op_matches_pil` pins the bound at 0). How: the geometric ops
  (ShearX/Y, TranslateX/Y, Rotate: nearest-neighbour affine with black fill) and the point ops (Invert,
  Solarize, Posterize) are precomputed once per policy value by running the PIL op itself on an image of
  pixel indices or of the 256 levels, so the device only gathers; AutoContrast and Equalize follow
  ImageOps' histogram code in integer / float64 arithmetic; Contrast, Color, Brightness and Sharpness
  compute ImageEnhance's degenerate image exactly (ITU-R 601-2 luma in Pillow's 16.16 fixed point, the
  SMOOTH kernel with its rounding) and blend in float32 as Pillow's C `ImagingBlend` does. A Pillow built
  with fused multiply-add in that blend (some non-x86 builds) could differ by one level on a few pixels.
- Random streams differ: the worker path draws from Python's `random` and torch's CPU RNG per worker, this
  path from one torch.Generator on the device. The distributions are the same (sub-policy uniform, each op
  with its probability, geometric signs mirrored with p 0.5, crop offsets uniform in [0, 2p], flip p 0.5,
  Cutout centres uniform), the draws are not.
- Colour jitter, random-resized crop and fastai's rotate/zoom/warp have no batched version here:
  `gpu_supported` says so, and such configs stay on the worker path.

Cost: to keep the host from waiting on the device, every kind of FAA op (gather, table, blend, Cutout) runs
over the whole batch with the identity for the images of other kinds, a few hundred small kernels per batch:
cheap on a GPU, slower than PIL workers on a CPU (bench/bench_gpu_ops.py). No step reads a device value back
to the host, so one epoch makes one pinned host-to-device copy (its order) and no synchronization.

Determinism: the epoch's order is DistributedSampler's (a CPU permutation seeded with seed + epoch, the same
on every device); augmentation draws from a device generator seeded with (seed, epoch, rank), so the same
seed gives the same batches on one kind of device. CPU and CUDA generators differ, so augmentation draws
differ between them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from micronet.augment import CUTOUT_FILL, MIRRORED, OPS, SubPolicy, load_policy, op_ranges
from micronet.config import AugmentConfig
from micronet.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from micronet.errors import MicronetError

Device = Union[str, torch.device]
ArrayLike = Union[Tensor, np.ndarray, Sequence[int]]


def gpu_supported(augment: Optional[AugmentConfig]) -> tuple[bool, str]:
    """(True, "") when every step of `augment` has a batched version here; else (False, why), and the
    training set must go through DataLoader workers (data.loader: workers)."""
    if augment is None:
        return True, ""
    missing = []
    if augment.random_resized_crop is not None:
        missing.append("random_resized_crop")
    if augment.brightness > 0 or augment.contrast > 0:
        missing.append("colour jitter (brightness/contrast)")
    if augment.rotate > 0 or augment.zoom > 1 or augment.warp > 0:
        missing.append("affine rotate/zoom/warp")
    if missing:
        return False, f"data.loader gpu has no batched {', '.join(missing)}; use data.loader: workers"
    return True, ""


# --- batched pixel ops: images are (B, C, H, W), uint8 unless said otherwise ------------------------------


def _gather_pixels(images: Tensor, source: Tensor, fill: float = 0) -> Tensor:
    """out[b, :, p] = images[b, :, source[b, p]] over flattened H*W positions; source < 0 gives `fill`."""
    b, c, h, w = images.shape
    flat = images.reshape(b, c, h * w)
    out = flat.gather(2, source.clamp(min=0).long()[:, None, :].expand(b, c, h * w))
    return out.masked_fill_(source[:, None, :] < 0, fill).reshape(b, c, h, w)


def _reflect(coords: Tensor, size: int) -> Tensor:
    """np.pad's 'reflect' (edge not repeated), for any distance outside [0, size)."""
    if size == 1:
        return torch.zeros_like(coords)
    period = 2 * (size - 1)
    coords = coords.remainder(period)
    return torch.where(coords >= size, period - coords, coords)


def pad_crop_flip(
    images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int, fill: float = 0,
    padding_mode: str = "constant",
) -> Tensor:
    """T.RandomCrop(size, padding, fill, padding_mode) then T.RandomHorizontalFlip with the given per-image
    crop offsets (in the padded image, 0..2*padding) and flip flags, as one gather; output size = input size.
    Works on uint8 or float."""
    b, _, h, w = images.shape
    rows = top.long()[:, None] - padding + torch.arange(h, device=images.device)
    cols = left.long()[:, None] - padding + torch.arange(w, device=images.device)
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    if padding_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    elif padding_mode != "constant":
        raise MicronetError(f"crop_padding_mode {padding_mode!r} is not one of constant, reflect")
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    source = torch.where(inside, rows[:, :, None] * w + cols[:, None, :], -1)
    return _gather_pixels(images, source.reshape(b, h * w), fill)


def draw_crop_flip(
    n: int, padding: int, hflip: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(top, left, flip) per image: offsets uniform in [0, 2*padding] as T.RandomCrop, flips with p 0.5."""
    device = generator.device
    top = torch.randint(2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5 if hflip else torch.zeros(
        n, dtype=torch.bool, device=device)
    return top, left, flip


def normalize(images: Tensor, mean: Union[Sequence[float], Tensor], std: Union[Sequence[float], Tensor]) -> Tensor:
    """T.ToTensor (uint8 / 255) then T.Normalize, with the same float32 arithmetic (bit-identical). Pass
    mean/std as device tensors in a loop: building them from Python numbers copies to the device and waits."""
    x = images.to(torch.float32).div(255) if images.dtype == torch.uint8 else images
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub(mean).div(std)


def cutout(images: Tensor, size: int, centre_y: Tensor, centre_x: Tensor) -> Tensor:
    """micronet.augment.Cutout per image at the given integer centres: zero the square centre ± size//2,
    clipped at the borders (an odd size gives size - 1, as Wave's CutoutDefault)."""
    _, _, h, w = images.shape
    half = size // 2
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    in_y = (ys >= (centre_y[:, None] - half).clamp(min=0)) & (ys < (centre_y[:, None] + half).clamp(max=h))
    in_x = (xs >= (centre_x[:, None] - half).clamp(min=0)) & (xs < (centre_x[:, None] + half).clamp(max=w))
    box = in_y[:, None, :, None] & in_x[:, None, None, :]
    return images.masked_fill(box, 0)


def draw_cutout_centres(n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    device = generator.device
    return (torch.randint(height, (n,), generator=generator, device=device),
            torch.randint(width, (n,), generator=generator, device=device))


# --- Fast AutoAugment, batched ---------------------------------------------------------------------------

# What the device does for each op: gather through a source map, look up a per-channel table, blend with a
# degenerate image (ImageEnhance), or paint FAA's gray Cutout square.
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
POINT = ("Invert", "Solarize", "Posterize")  # a fixed 256-entry table per value
_CODES = {name: i + 1 for i, name in enumerate(sorted(OPS))}  # 0: no op
_BLEND_OPS = ("Contrast", "Color", "Brightness", "Sharpness")
_MISSING = {op for op in OPS if op not in (*GEOMETRIC, *POINT, *_BLEND_OPS, "AutoContrast", "Equalize", "Cutout")}
assert not _MISSING, f"micronet.augment.OPS has ops with no batched version: {_MISSING}"


def op_value(op: str, level: float) -> float:
    """A policy level in [0, 1] mapped onto the op's range, as micronet.augment.apply_op (sign not applied)."""
    low, high = op_ranges()[op]
    return level * (high - low) + low


class _OpTable:
    """One row per (op, value): what the device needs to apply it. Row 0 is the identity. Geometric maps
    and point tables come from running the PIL op once on an index image, so they are PIL's by construction."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.code: list[int] = [0]
        self.map_row: list[int] = [0]
        self.lut_row: list[int] = [0]
        self.alpha: list[float] = [1.0]
        self.side: list[float] = [0.0]
        index = np.arange(1, height * width + 1, dtype=np.int32).reshape(height, width)
        self._index_image = Image.fromarray(index)  # mode "I": 0 marks PIL's black fill
        self._levels_image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
        self._maps: list[np.ndarray] = [np.arange(height * width, dtype=np.int32)]
        self._luts: list[np.ndarray] = [np.arange(256, dtype=np.uint8)]
        self._rows: dict[tuple[str, float], int] = {}

    def row(self, op: str, value: float) -> int:
        key = (op, value)
        if key not in self._rows:
            self._rows[key] = self._add(op, value)
        return self._rows[key]

    def _add(self, op: str, value: float) -> int:
        map_row = lut_row = 0
        alpha, side = 1.0, 0.0
        if op in GEOMETRIC:
            source = np.asarray(OPS[op](self._index_image, value), dtype=np.int64).reshape(-1) - 1
            self._maps.append(source.astype(np.int32))
            map_row = len(self._maps) - 1
        elif op in POINT:
            self._luts.append(np.asarray(OPS[op](self._levels_image, value), dtype=np.uint8).reshape(-1))
            lut_row = len(self._luts) - 1
        elif op in _BLEND_OPS:
            alpha = value
        elif op == "Cutout":
            side = value * self.width  # as micronet.augment.cutout_pil: a fraction of the width
        self.code.append(_CODES[op])
        self.map_row.append(map_row)
        self.lut_row.append(lut_row)
        self.alpha.append(alpha)
        self.side.append(side)
        return len(self.code) - 1

    def to(self, device: Device) -> "_DeviceOpTable":
        return _DeviceOpTable(
            code=torch.tensor(self.code, device=device),
            map=torch.tensor(self.map_row, device=device),
            lut=torch.tensor(self.lut_row, device=device),
            alpha=torch.tensor(self.alpha, dtype=torch.float32, device=device),  # C float, as ImagingBlend
            side=torch.tensor(self.side, dtype=torch.float64, device=device),
            maps=torch.from_numpy(np.stack(self._maps)).to(device),
            luts=torch.from_numpy(np.stack(self._luts)).to(device),
            gray=torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=device).view(1, -1, 1, 1),
        )


@dataclass(frozen=True)
class _DeviceOpTable:
    code: Tensor  # (R,) op code, 0 = identity
    map: Tensor  # (R,) row of `maps`
    lut: Tensor  # (R,) row of `luts`
    alpha: Tensor  # (R,) blend factor (1 = identity)
    side: Tensor  # (R,) FAA Cutout side in pixels (0 = none)
    maps: Tensor  # (M, H*W) int32 source pixel, -1 = black
    luts: Tensor  # (L, 256) uint8
    gray: Tensor  # (1, 3, 1, 1) uint8 fill of FAA's Cutout


def _luma(images: Tensor) -> Tensor:
    """PIL's RGB -> L (ITU-R 601-2 in 16.16 fixed point, Convert.c L24), int32 (B, H, W)."""
    x = images.to(torch.int32)
    return (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16


def _autocontrast_lut(images: Tensor) -> Tensor:
    """ImageOps.autocontrast (cutoff 0) as a (B, C, 256) table: each band stretched from its min..max."""
    flat = images.flatten(2)
    lo, hi = flat.amin(2).double(), flat.amax(2).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    lut = (levels * scale[..., None] + offset[..., None]).trunc().clamp(0, 255)
    return torch.where((hi > lo)[..., None], lut, levels).to(torch.uint8)


def _equalize_lut(images: Tensor) -> Tensor:
    """ImageOps.equalize as a (B, C, 256) table, in its integer arithmetic (values over 255 clip, as
    Image.point does)."""
    b, c = images.shape[:2]
    flat = images.reshape(b * c, -1).long()
    # scatter_add_, not bincount: bincount reads its maximum back to the host, a sync per batch on CUDA.
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, flat, torch.ones((), dtype=torch.long, device=images.device).expand_as(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))[:, 0]  # count of the highest level present
    step = (flat.shape[1] - last) // 255
    before = hist.cumsum(1) - hist  # pixels below each level
    lut = (step[:, None] // 2 + before) // step.clamp(min=1)[:, None]
    levels = torch.arange(256, device=images.device).expand(b * c, 256)
    return torch.where((step > 0)[:, None], lut.clamp(max=255), levels).to(torch.uint8).reshape(b, c, 256)


def _smooth(images: Tensor) -> Tensor:
    """ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divisor 13, rounded; border pixels kept)."""
    x = images.to(torch.int32)
    h, w = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy:dy + h - 2, dx:dx + w - 2]
    out = x.clone()
    # The true value s/13 + 0.5 is never an integer, so Pillow's float32 sum rounds as exact arithmetic does.
    out[..., 1:-1, 1:-1] = (2 * total + 13) // 26
    return out


def _blend(degenerate: Tensor, images: Tensor, alpha: Tensor) -> Tensor:
    """Image.blend(degenerate, images, alpha) as Pillow's C code: float32 in1 + alpha * (in2 - in1),
    clipped to [0, 255] and truncated."""
    in1 = degenerate.to(torch.float32)
    out = in1 + alpha.view(-1, 1, 1, 1) * (images.to(torch.float32) - in1)
    return out.clamp(0, 255).trunc().to(torch.uint8)


def _apply_rows(images: Tensor, table: _DeviceOpTable, rows: Tensor, centres: Tensor) -> Tensor:
    """Apply table row rows[b] to image b (uint8 RGB). Each kind of op runs over the whole batch with the
    identity for the images of other kinds, so nothing waits on the device for a count (no host sync)."""
    b, c, h, w = images.shape
    code = table.code[rows]
    images = _gather_pixels(images, table.maps[table.map[rows]], 0)

    lut = table.luts[table.lut[rows]][:, None, :].expand(b, c, 256)
    lut = torch.where((code == _CODES["AutoContrast"])[:, None, None], _autocontrast_lut(images), lut)
    lut = torch.where((code == _CODES["Equalize"])[:, None, None], _equalize_lut(images), lut)
    images = lut.gather(2, images.reshape(b, c, h * w).long()).reshape(b, c, h, w)

    luma = _luma(images)[:, None]  # (B, 1, H, W)
    mean = luma.flatten(1).sum(1).double() / (h * w)
    contrast = (mean + 0.5).floor().to(torch.int32).view(b, 1, 1, 1)  # ImageStat mean, rounded
    degenerate = torch.zeros_like(images, dtype=torch.int32)  # Brightness
    for name, value in (("Contrast", contrast), ("Color", luma), ("Sharpness", _smooth(images))):
        degenerate = torch.where((code == _CODES[name]).view(b, 1, 1, 1), value, degenerate)
    images = _blend(degenerate, images, table.alpha[rows])

    # FAA's Cutout (micronet.augment.cutout_pil): gray square at a float centre, corners truncated to ints.
    side = table.side[rows]
    cx, cy = centres[:, 0] * w, centres[:, 1] * h
    x0, x1 = (cx - side / 2).clamp(min=0).trunc(), (cx + side / 2).clamp(max=w).trunc()
    y0, y1 = (cy - side / 2).clamp(min=0).trunc(), (cy + side / 2).clamp(max=h).trunc()
    xs = torch.arange(w, device=images.device, dtype=torch.float64)
    ys = torch.arange(h, device=images.device, dtype=torch.float64)
    box = (((ys >= y0[:, None]) & (ys < y1[:, None]))[:, :, None]
           & ((xs >= x0[:, None]) & (xs < x1[:, None]))[:, None, :])[:, None]
    return torch.where(box, table.gray, images)


def apply_faa_op(images: Tensor, op: str, values: Sequence[float], centres: Optional[Tensor] = None) -> Tensor:
    """micronet.augment.OPS[op](image, values[b]) for each uint8 RGB image b (values already mapped onto the
    op's range and signed). `centres`: (B, 2) float64 Cutout centres as fractions of (width, height),
    standing in for cutout_pil's random.uniform draws."""
    if op not in _CODES:
        raise MicronetError(f"unknown augmentation op {op!r}; known: {', '.join(sorted(OPS))}")
    table = _OpTable(*images.shape[-2:])
    rows = torch.tensor([table.row(op, float(v)) for v in values], device=images.device)
    if centres is None:
        centres = torch.zeros(len(images), 2, dtype=torch.float64, device=images.device)
    return _apply_rows(images, table.to(images.device), rows, centres)


class BatchedFastAutoAugment:
    """micronet.augment.FastAutoAugment over a batch: per image one sub-policy chosen uniformly, each of
    its ops applied with its probability, geometric values mirrored with p 0.5."""

    def __init__(self, policy: list[SubPolicy], image_size: tuple[int, int] = (32, 32), device: Device = "cpu"):
        if not policy:
            raise MicronetError("Fast AutoAugment policy is empty")
        self.slots = max(len(sub) for sub in policy)
        table = _OpTable(*image_size)
        prob = torch.full((len(policy), self.slots), -1.0, dtype=torch.float64)  # -1: no op in this slot
        rows = torch.zeros(len(policy), self.slots, 2, dtype=torch.long)  # [..., mirrored]
        for s, sub in enumerate(policy):
            for k, (op, p, level) in enumerate(sub):
                if op not in _CODES:
                    raise MicronetError(f"Fast AutoAugment policy: unknown augmentation op {op!r}")
                value = op_value(op, level)
                prob[s, k] = p
                rows[s, k, 0] = table.row(op, value)
                rows[s, k, 1] = table.row(op, -value) if op in MIRRORED else rows[s, k, 0]
        self.table = table.to(device)
        self.prob = prob.to(device)
        self.rows = rows.to(device)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per image: sub-policy (n,), applied (n, slots), mirrored (n, slots), Cutout centres
        (n, slots, 2) as fractions of the width and height."""
        device = generator.device
        sub = torch.randint(len(self.prob), (n,), generator=generator, device=device)
        u = torch.rand(n, self.slots, generator=generator, device=device, dtype=torch.float64)
        applied = u <= self.prob[sub]  # random.random() <= prob
        mirrored = torch.rand(n, self.slots, generator=generator, device=device) > 0.5
        centres = torch.rand(n, self.slots, 2, generator=generator, device=device, dtype=torch.float64)
        return sub, applied, mirrored, centres

    def apply(self, images: Tensor, sub: Tensor, applied: Tensor, mirrored: Tensor, centres: Tensor) -> Tensor:
        for k in range(self.slots):
            rows = torch.where(applied[:, k], self.rows[sub, k, mirrored[:, k].long()], 0)
            images = _apply_rows(images, self.table, rows, centres[:, k])
        return images

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, *self.draw(len(images), generator))


# --- one copy's pipeline, and the loader ---------------------------------------------------------------


class GpuAugment:
    """One AugmentConfig's train pipeline on uint8 (B, 3, H, W) batches, in build_transform's order;
    returns float32 (normalized unless augment.normalize is off)."""

    def __init__(
        self, augment: Optional[AugmentConfig], mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD, image_size: tuple[int, int] = (32, 32), device: Device = "cpu",
    ) -> None:
        augment = augment if augment is not None else AugmentConfig(crop_padding=0, hflip=False, cutout=0)
        ok, reason = gpu_supported(augment)
        if not ok:
            raise MicronetError(reason)
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        policy = load_policy(augment.autoaugment) if augment.autoaugment else None
        self.faa = BatchedFastAutoAugment(policy, image_size, device) if policy else None

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        aug = self.augment
        if self.faa is not None:
            images = self.faa(images, generator)
        if aug.crop_padding > 0 or aug.hflip:
            top, left, flip = draw_crop_flip(len(images), aug.crop_padding, aug.hflip, generator)
            images = pad_crop_flip(images, top, left, flip, aug.crop_padding, aug.crop_fill, aug.crop_padding_mode)
        x = images.to(torch.float32).div(255)
        if aug.normalize:
            x = normalize(x, self.mean, self.std)
        if aug.cutout > 0:
            x = cutout(x, aug.cutout, *draw_cutout_centres(len(x), x.shape[-2], x.shape[-1], generator))
        return x


def _images_and_labels(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 and (N,) labels of a CIFAR-style dataset (`.data`, `.targets`), through Subsets."""
    if isinstance(dataset, Subset):
        images, labels = _images_and_labels(dataset.dataset)
        indices = np.asarray(dataset.indices, dtype=np.int64)
        return images[indices], labels[indices]
    if not hasattr(dataset, "data") or not hasattr(dataset, "targets"):
        raise MicronetError(f"data.loader gpu needs a CIFAR-style dataset with .data and .targets, "
                            f"not {type(dataset).__name__}; use data.loader: workers")
    return np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)


class GpuCifarLoader:
    """The training set on the device, yielding (float images, int64 labels) batches of `batch_size` (per
    rank) on the device, augmented per copy.

    `groups`: one (uint8 (N, H, W, 3) images, (N,) labels, AugmentConfig) per copy of the training set; an
    epoch is one pass over all copies (like a ConcatDataset), shuffled together. Groups that pass the same
    images object share one copy on the device. Sharding follows DistributedSampler(shuffle, seed,
    drop_last) over the concatenation, so a rank's batches hold the indices DistributedSampler would give
    it; within a batch the images come grouped by copy. `set_epoch` reseeds both the order and the
    augmentation, so replaying an epoch (resume) gives the same batches."""

    def __init__(
        self,
        groups: Sequence[tuple[ArrayLike, ArrayLike, Optional[AugmentConfig]]],
        batch_size: int,
        *,
        device: Device = "cpu",
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        channels_last: bool = False,
    ) -> None:
        if not groups:
            raise MicronetError("GpuCifarLoader needs at least one (images, labels, augment) group")
        if not 0 <= rank < world_size:
            raise MicronetError(f"rank {rank} is not in [0, world_size={world_size})")
        self.device = torch.device(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.channels_last = seed, shuffle, drop_last, channels_last
        self.epoch = 0

        banks: dict[int, int] = {}  # id(images) -> block of the device bank
        blocks_images, blocks_labels, block_start = [], [], [0]
        group_block, sizes = [], []
        for images, labels, _ in groups:
            if id(images) not in banks:
                x = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
                y = torch.as_tensor(labels if isinstance(labels, Tensor) else np.asarray(labels), dtype=torch.int64)
                if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3 or len(x) != len(y):
                    raise MicronetError(f"GpuCifarLoader groups need uint8 (N, H, W, 3) images and N labels, got "
                                        f"{x.dtype} {tuple(x.shape)} and {len(y)} labels")
                banks[id(images)] = len(blocks_images)
                blocks_images.append(x.permute(0, 3, 1, 2))
                blocks_labels.append(y)
                block_start.append(block_start[-1] + len(x))
            group_block.append(banks[id(images)])
            sizes.append(len(blocks_images[banks[id(images)]]))
        self.images = torch.cat(blocks_images).contiguous().to(self.device)  # (N_bank, 3, H, W) uint8
        self.labels = torch.cat(blocks_labels).to(self.device)
        self.image_size = tuple(self.images.shape[-2:])
        # Global index i (over the concatenated copies) -> group and bank row.
        self.group_start = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
        self.group_bank_start = torch.tensor([block_start[blk] for blk in group_block], dtype=torch.int64)
        self.augments = [GpuAugment(aug, mean, std, self.image_size, self.device) for _, _, aug in groups]
        if len(self) == 0:
            raise MicronetError(f"the training split ({self.total} images over {world_size} ranks) holds fewer "
                                f"images per rank than one batch ({batch_size})")

    @classmethod
    def from_subsets(
        cls, pairs: Sequence[tuple[Dataset, Optional[AugmentConfig]]], batch_size: int, **kwargs
    ) -> "GpuCifarLoader":
        """From (training Subset, AugmentConfig) per copy, as micronet.data.build_splits returns them."""
        cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        groups = []
        for dataset, augment in pairs:
            key = _dataset_key(dataset)
            if key not in cache:
                cache[key] = _images_and_labels(dataset)
            groups.append((*cache[key], augment))
        return cls(groups, batch_size, **kwargs)

    @property
    def total(self) -> int:
        return int(self.group_start[-1])

    @property
    def num_samples(self) -> int:
        """This rank's share of an epoch, as DistributedSampler."""
        if self.drop_last:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_seed(self, seed: int) -> None:
        """A new base seed for the order and the draws: a multi-step stage gives each step (seed, step)'s, so
        the fine-tuning after step 2 does not replay step 1's batches."""
        self.seed = int(seed)

    def set_batch_size(self, batch_size: int) -> None:
        """This rank's batch from now on (Wave's per-compression fine-tune batches)."""
        if batch_size < 1 or self.num_samples // batch_size == 0 and self.drop_last:
            raise MicronetError(f"the training split ({self.total} images over {self.world_size} ranks) holds fewer "
                                f"images per rank than one batch ({batch_size})")
        self.batch_size = int(batch_size)

    def epoch_indices(self, epoch: Optional[int] = None) -> Tensor:
        """This rank's global indices for the epoch (CPU), DistributedSampler's order exactly."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.total, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.total)
        size = self.num_samples * self.world_size
        if size > len(order):  # no drop_last: pad with the first indices again, as DistributedSampler
            order = torch.cat([order] * math.ceil(size / len(order)))
        return order[:size][self.rank:size:self.world_size].contiguous()

    def _generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(2, dtype=np.uint32)
        return torch.Generator(device=self.device).manual_seed(int(state[0]) << 32 | int(state[1]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self.epoch_indices()[: len(self) * self.batch_size] if self.drop_last else self.epoch_indices()
        group = torch.searchsorted(self.group_start, indices, right=True) - 1
        bank_row = self.group_bank_start[group] + indices - self.group_start[group]
        batch = torch.arange(len(indices)) // self.batch_size
        n_groups = len(self.augments)
        order = torch.sort(batch * n_groups + group, stable=True).indices  # batches keep their images, by copy
        counts = torch.bincount(batch * n_groups + group, minlength=len(self) * n_groups).view(-1, n_groups)
        rows = bank_row[order]
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the device (no host sync)
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        counts = counts.tolist()
        generator = self._generator()
        start = 0
        for per_group in counts:
            end = start + sum(per_group)
            batch_rows = rows[start:end]
            images = self.images[batch_rows]
            parts, offset = [], 0
            for augment, n in zip(self.augments, per_group):
                if n:
                    parts.append(augment(images[offset:offset + n], generator))
                    offset += n
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, self.labels[batch_rows]
            start = end


def _dataset_key(dataset: Dataset) -> tuple:
    """Identity of the images a (possibly nested) Subset selects: the same base arrays and indices."""
    if isinstance(dataset, Subset):
        return (*_dataset_key(dataset.dataset), tuple(int(i) for i in dataset.indices))
    return (id(getattr(dataset, "data", dataset)),)
