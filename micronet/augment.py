"""Fast AutoAugment (Lim et al. 2019) policies applied to PIL images, and the tensor Cutout Wave used
after normalization. The policy tables are data (micronet/assets/fast_autoaugment_policies.json); the
ops are the project's own PIL code, following the behaviour of kakaobrain's `augmentations.py`."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from importlib import resources
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from micronet.errors import MicronetError

SubPolicy = list[tuple[str, float, float]]  # [(op, probability, level), ...], prob and level in [0, 1]

POLICY_FILE = "fast_autoaugment_policies.json"
CUTOUT_FILL = (125, 123, 114)  # FAA's Cutout fills this gray in PIL space (≈ the CIFAR mean colour)


@lru_cache(maxsize=1)
def _policy_file() -> dict:
    text = resources.files("micronet").joinpath("assets", POLICY_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def policy_names() -> list[str]:
    return sorted(_policy_file()["policies"])


def op_ranges() -> dict[str, tuple[float, float]]:
    """(low, high) per op name; a level in [0, 1] maps linearly onto it."""
    return {name: (float(lo), float(hi)) for name, (lo, hi) in _policy_file()["op_ranges"].items()}


def load_policy(name: str) -> list[SubPolicy]:
    """The named policy's sub-policies, checked so that every op is one this module can apply."""
    policies = _policy_file()["policies"]
    if name not in policies:
        raise MicronetError(f"unknown Fast AutoAugment policy {name!r}; available: {', '.join(policy_names())}")
    policy = [[(str(op), float(prob), float(level)) for op, prob, level in sub] for sub in policies[name]]
    _check_ops(policy, where=f"policy {name!r}")
    return policy


# --- ops: fn(img, v) with v already mapped onto the op's range -------------------------------------------


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    # PIL's AFFINE data maps output (x, y) to input (a x + b y + c, d x + e y + f); the border fills black.
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


def shear_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, v, 0, 0, 1, 0))


def shear_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, v, 1, 0))


def translate_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, v * img.size[0], 0, 1, 0))  # v is a fraction of the width


def translate_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, v * img.size[1]))  # v is a fraction of the height


def rotate(img: Image.Image, v: float) -> Image.Image:
    return img.rotate(v)


def auto_contrast(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def invert(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.invert(img)


def equalize(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.equalize(img)


def solarize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.solarize(img, v)  # inverts pixels >= v; v = 256 leaves the image alone


def posterize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.posterize(img, max(1, int(v)))  # keeps the int(v) top bits


def contrast(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(v)


def color(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(v)


def brightness(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(v)


def sharpness(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(v)


def cutout_pil(img: Image.Image, v: float) -> Image.Image:
    """Gray square of side v·width at a uniformly random centre, clipped at the borders."""
    side = v * img.size[0]
    if side <= 0:
        return img
    w, h = img.size
    cx, cy = random.uniform(0, w), random.uniform(0, h)
    x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    x1, y1 = int(min(float(w), cx + side / 2)), int(min(float(h), cy + side / 2))
    if x1 <= x0 or y1 <= y0:
        return img
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=CUTOUT_FILL)  # PIL's corners are inclusive
    return img


OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "AutoContrast": auto_contrast,
    "Invert": invert,
    "Equalize": equalize,
    "Solarize": solarize,
    "Posterize": posterize,
    "Contrast": contrast,
    "Color": color,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "Cutout": cutout_pil,
}
MIRRORED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})  # sign flips with p 0.5


def _check_ops(policy: list[SubPolicy], where: str) -> None:
    ranges = op_ranges()
    for sub in policy:
        for op, _, _ in sub:
            if op not in OPS or op not in ranges:
                raise MicronetError(f"{where}: unknown augmentation op {op!r}; known: {', '.join(sorted(OPS))}")


def apply_op(img: Image.Image, op: str, level: float) -> Image.Image:
    """One op at a level in [0, 1]: linear onto the op's range, then a random sign for geometric ops."""
    low, high = op_ranges()[op]
    v = level * (high - low) + low
    if op in MIRRORED and random.random() > 0.5:
        v = -v
    return OPS[op](img, v)


class FastAutoAugment:
    """Per image: one sub-policy chosen uniformly, each of its ops applied with its probability.

    Uses Python's `random`, which the DataLoader reseeds in every worker (numpy's RNG it does not)."""

    def __init__(self, policy: list[SubPolicy]) -> None:
        if not policy:
            raise MicronetError("Fast AutoAugment policy is empty")
        _check_ops(policy, where="Fast AutoAugment policy")
        self.policy = policy

    def __call__(self, img: Image.Image) -> Image.Image:
        for op, prob, level in random.choice(self.policy):
            if random.random() <= prob:
                img = apply_op(img, op, level)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.policy)} sub-policies)"


class Cutout:
    """Wave's CutoutDefault: zero a size×size square at a uniformly random centre of a normalized CHW
    tensor, clipped at the borders (an odd size gives size-1, as there: centre ± size//2). Draws from
    torch's RNG, which the DataLoader seeds per worker."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
