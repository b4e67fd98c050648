"""Device-resident CIFAR loader: each batched op against its CPU reference (torchvision, PIL, micronet.augment)
with fixed parameters, Fast AutoAugment's sampling, and the loader's sharding and determinism. CPU tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from micronet import augment
from micronet.augment import MIRRORED, OPS, Cutout, load_policy, policy_names
from micronet.config import AugmentConfig, DataConfig
from micronet.data import CIFAR100_MEAN, CIFAR100_STD, build_splits, build_transform, write_synthetic_cifar100
from micronet.data.gpu import (
    BatchedFastAutoAugment,
    GpuAugment,
    GpuCifarLoader,
    apply_faa_op,
    cutout,
    draw_crop_flip,
    gpu_supported,
    normalize,
    op_value,
    pad_crop_flip,
)
from micronet.errors import MicronetError

NO_AUG = AugmentConfig(crop_padding=0, hflip=False, cutout=0)


def _hwc_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _test_images() -> np.ndarray:
    """Histograms that exercise every branch of AutoContrast/Equalize: noise, a gradient, low contrast, a
    constant image, two levels, and one bright pixel over dark noise (Equalize's table then passes 255)."""
    rng = np.random.default_rng(0)
    gradient = np.broadcast_to(np.linspace(0, 255, 32)[None, :, None], (32, 32, 3)).astype(np.uint8)
    two_levels = np.where(rng.random((32, 32, 1)) < 0.9, 200, 10).astype(np.uint8).repeat(3, 2)
    one_bright = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    one_bright[5, 7] = 255
    return np.stack([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), gradient,
                     rng.integers(100, 140, (32, 32, 3), dtype=np.uint8), np.full((32, 32, 3), 77, np.uint8),
                     two_levels, one_bright])


# --- crop, flip, normalize, cutout -----------------------------------------------------------------------


@pytest.mark.parametrize("mode, fill", [("constant", 0), ("constant", 128), ("reflect", 0)])
def test_pad_crop_flip_matches_torchvision(mode, fill):
    images = _nchw(_hwc_images(6))
    top, left = torch.tensor([0, 8, 3, 5, 8, 0]), torch.tensor([8, 0, 4, 1, 8, 0])
    flip = torch.tensor([False, True, False, True, True, False])
    out = pad_crop_flip(images, top, left, flip, padding=4, fill=fill, padding_mode=mode)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(len(images)):
        ref = TF.crop(TF.pad(images[i], 4, fill=fill, padding_mode=mode), int(top[i]), int(left[i]), 32, 32)
        ref = TF.hflip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref), i
    as_float = pad_crop_flip(images.float(), top, left, flip, padding=4, fill=fill, padding_mode=mode)
    assert torch.equal(as_float, out.float())


def test_reflect_padding_wider_than_the_image_matches_pil():
    # The worker path pads PIL images through np.pad, which reflects again past the far edge.
    images = _hwc_images(2, seed=1)
    top, left, flip = torch.tensor([0, 53]), torch.tensor([80, 17]), torch.tensor([False, True])
    out = pad_crop_flip(_nchw(images), top, left, flip, padding=40, padding_mode="reflect")
    for i in range(2):
        padded = TF.pad(Image.fromarray(images[i]), 40, padding_mode="reflect")
        ref = TF.crop(padded, int(top[i]), int(left[i]), 32, 32)
        ref = TF.hflip(ref) if flip[i] else ref
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), np.asarray(ref))


def test_crop_offsets_cover_exactly_the_padded_range():
    top, left, flip = draw_crop_flip(4000, padding=3, hflip=True, generator=torch.Generator().manual_seed(0))
    assert set(top.tolist()) == set(left.tolist()) == set(range(7))
    assert 0.45 < flip.float().mean() < 0.55
    _, _, never = draw_crop_flip(100, padding=3, hflip=False, generator=torch.Generator().manual_seed(0))
    assert not never.any()


def test_normalize_equals_to_tensor_then_normalize():
    images = _hwc_images(3, seed=2)
    ref = torch.stack([T.Normalize(CIFAR100_MEAN, CIFAR100_STD)(T.ToTensor()(Image.fromarray(im))) for im in images])
    assert torch.equal(normalize(_nchw(images), CIFAR100_MEAN, CIFAR100_STD), ref)


@pytest.mark.parametrize("size", [8, 7])
def test_cutout_equals_micronet_cutout_for_the_same_centre(size):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    centres = [(0, 0), (31, 31), (16, 3), (2, 29), (10, 10)]  # corners clip the square
    out = cutout(images, size, torch.tensor([c[0] for c in centres]), torch.tensor([c[1] for c in centres]))
    for i, (cy, cx) in enumerate(centres):
        draws = iter([cy, cx])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor(next(draws)))
            ref = Cutout(size)(images[i])
        assert torch.equal(out[i], ref), (cy, cx)
    side = size - size % 2
    assert int((out[4] == 0).sum()) == 3 * side * side  # an odd size gives size - 1


# --- Fast AutoAugment -------------------------------------------------------------------------------------


def _policy_values() -> dict[str, list[float]]:
    """Every value each op takes in the shipped policies, both signs where the op is mirrored."""
    values: dict[str, set[float]] = {}
    for name in policy_names():
        for sub in load_policy(name):
            for op, _, level in sub:
                v = op_value(op, level)
                values.setdefault(op, set()).update({v, -v} if op in MIRRORED else {v})
    return {op: sorted(v) for op, v in values.items()}


PIL_MAX_DIFFERENCE = {op: 0 for op in OPS}  # uint8 levels; the module docstring states these bounds


@pytest.mark.parametrize("op", sorted(set(OPS) - {"Cutout"}))
def test_faa_op_matches_pil(op):
    values = _policy_values()[op]
    images = _test_images() if op in ("AutoContrast", "Equalize", "Invert") else _test_images()[:3]
    values = values[:1] if op in ("AutoContrast", "Equalize", "Invert") else values  # no parameter
    batch = np.repeat(images, len(values), axis=0)
    out = apply_faa_op(_nchw(batch), op, values * len(images)).permute(0, 2, 3, 1).numpy()
    ref = np.stack([np.asarray(OPS[op](Image.fromarray(im), v)) for im, v in zip(batch, values * len(images))])
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= PIL_MAX_DIFFERENCE[op], (op, diff.max(), diff.mean())


def test_faa_rotate_fast_paths_match_pil():
    # PIL transposes at 90/180/270 degrees instead of resampling; the ranges never reach them, the maps do.
    images = _test_images()[:1]
    for angle in (90.0, 180.0, 270.0, -90.0, 0.0):
        out = apply_faa_op(_nchw(images), "Rotate", [angle])[0].permute(1, 2, 0).numpy()
        assert np.array_equal(out, np.asarray(OPS["Rotate"](Image.fromarray(images[0]), angle))), angle


def test_faa_cutout_matches_pil_for_the_same_centre():
    images = _test_images()[:1].repeat(5, axis=0)
    sides = [0.2, 0.2, 0.13, 0.0, 0.2]
    centres = [(0.0, 0.0), (31.9, 31.9), (10.3, 20.7), (16.0, 16.0), (31.99, 0.5)]  # (x, y) in pixels
    out = apply_faa_op(_nchw(images), "Cutout", sides, torch.tensor(centres, dtype=torch.float64) / 32)
    for i, (side, (cx, cy)) in enumerate(zip(sides, centres)):
        draws = iter([cx, cy])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(augment.random, "uniform", lambda a, b: next(draws))
            ref = np.asarray(augment.cutout_pil(Image.fromarray(images[i]), side))
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), ref), i


def test_faa_applies_the_chosen_sub_policies_like_pil():
    """A shipped policy with explicit draws: each image equals micronet.augment's ops applied in order."""
    policy = load_policy("fa_shake26_2x96d_cifar100")
    faa = BatchedFastAutoAugment(policy)
    images = _test_images()[[0, 1, 2, 5]].repeat(16, axis=0)
    sub, applied, mirrored, centres = faa.draw(len(images), torch.Generator().manual_seed(3))
    applied[::2] = True  # make sure most images run two ops
    out = faa.apply(_nchw(images), sub, applied, mirrored, centres).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(images):
        img = Image.fromarray(image)
        for k, (op, _, level) in enumerate(policy[int(sub[i])]):
            if not applied[i, k]:
                continue
            v = op_value(op, level)
            v = -v if op in MIRRORED and mirrored[i, k] else v
            draws = iter((centres[i, k] * 32).tolist())
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(augment.random, "uniform", lambda a, b: next(draws))
                img = OPS[op](img, v)
        assert np.array_equal(out[i], np.asarray(img)), i


def _level_of(op: str, value: float) -> float:
    low, high = augment.op_ranges()[op]
    return (value - low) / (high - low)


def test_faa_sampling_follows_probabilities_and_mirrors_signs():
    # Sub-policy 0 inverts with p 0.3; sub-policy 1 always shifts right or left by 9 pixels (p 0.5 each way).
    policy = [[("Invert", 0.3, 0.0)], [("TranslateX", 1.0, _level_of("TranslateX", 9 / 32))]]
    faa = BatchedFastAutoAugment(policy)
    n = 2000
    sub, applied, mirrored, _ = faa.draw(n, torch.Generator().manual_seed(0))
    assert abs(float((sub == 0).float().mean()) - 0.5) < 0.03
    assert abs(float(applied[sub == 0, 0].float().mean()) - 0.3) < 0.03
    assert bool(applied[sub == 1, 0].all())
    image = _nchw(_test_images()[:1])
    out = faa(image.expand(n, -1, -1, -1), torch.Generator().manual_seed(0))
    inverted = (out == 255 - image).flatten(1).all(1)
    left = (out[..., :23] == image[..., 9:]).flatten(1).all(1)  # output x shows input x + 9
    right = (out[..., 9:] == image[..., :23]).flatten(1).all(1)
    unchanged = (out == image).flatten(1).all(1)
    assert bool((inverted | left | right | unchanged).all())
    assert abs(float(inverted.float().mean()) - 0.15) < 0.03
    assert abs(float(left.float().mean()) - 0.25) < 0.03 and abs(float(right.float().mean()) - 0.25) < 0.03


def test_unsupported_augmentations_go_to_workers():
    assert gpu_supported(AugmentConfig(autoaugment="fa_reduced_cifar10", cutout=16, crop_fill=128)) == (True, "")
    for field, value in [("random_resized_crop", {}), ("brightness", 0.2), ("contrast", 0.2), ("rotate", 10.0),
                         ("zoom", 1.1), ("warp", 0.2)]:
        ok, reason = gpu_supported(AugmentConfig(**{field: value}))
        assert not ok and "data.loader: workers" in reason, field
        with pytest.raises(MicronetError):
            GpuAugment(AugmentConfig(**{field: value}))


# --- the loader ---------------------------------------------------------------------------------------------


def _index_loader(n: int, batch_size: int, **kwargs) -> GpuCifarLoader:
    """Labels are the images' indices, so batches say which images they hold."""
    return GpuCifarLoader([(_hwc_images(n), np.arange(n), AugmentConfig(cutout=8))], batch_size, **kwargs)


def test_epochs_shard_like_distributed_sampler_and_cover_every_index_once():
    n, world = 48, 3
    seen = []
    for rank in range(world):
        loader = _index_loader(n, 4, rank=rank, world_size=world, seed=5)
        loader.set_epoch(2)
        sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=5, drop_last=True)
        sampler.set_epoch(2)
        assert loader.epoch_indices().tolist() == list(sampler)
        labels = [y for _, y in loader]
        assert len(labels) == len(loader) == 4
        assert torch.cat(labels).tolist() == list(sampler)
        seen += torch.cat(labels).tolist()
    assert sorted(seen) == list(range(n))


def test_drop_last_follows_the_sampler_and_the_batch():
    # 50 over 3 ranks: the sampler drops 2, each rank's 16 make 3 batches of 5 and drop 1.
    loader = _index_loader(50, 5, rank=1, world_size=3)
    assert loader.num_samples == 16 and len(loader) == 3
    assert sum(len(y) for _, y in loader) == 15
    keep = _index_loader(50, 5, rank=2, world_size=3, drop_last=False)
    sampler = DistributedSampler(range(50), 3, 2, shuffle=True, seed=0, drop_last=False)
    assert len(keep) == 4 and torch.cat([y for _, y in keep]).tolist() == list(sampler)


def test_batches_are_deterministic_per_seed_and_change_across_epochs():
    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b, c = _index_loader(32, 8, seed=1), _index_loader(32, 8, seed=1), _index_loader(32, 8, seed=2)
    first = epoch(a, 0)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(first, epoch(b, 0)))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, epoch(a, 0)))  # replaying an epoch
    assert any(not torch.equal(y, y2) for (_, y), (_, y2) in zip(first, epoch(a, 1)))
    assert any(not torch.equal(y, y2) for (_, y), (_, y2) in zip(first, epoch(c, 0)))
    x, y = first[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device.type == y.device.type == "cpu"


def test_augmentation_changes_images_but_keeps_their_statistics():
    images = _hwc_images(64)
    plain = GpuCifarLoader([(images, np.arange(64), NO_AUG)], 64, shuffle=False)
    augmented = GpuCifarLoader([(images, np.arange(64), AugmentConfig(autoaugment="fa_reduced_cifar10",
                                                                      cutout=8))], 64, shuffle=False)
    (x0, y0), = list(plain)
    (x1, y1), = list(augmented)
    assert torch.equal(y0, y1)
    assert (x0 != x1).flatten(1).any(1).float().mean() > 0.9  # crop/flip/FAA leave few images alone
    assert bool(((x1 == 0).flatten(1).sum(1) >= 3 * 4 * 4).all())  # cutout: at least a corner's 4x4 square


def test_copies_each_get_their_own_augmentation_and_share_images():
    # Copy 0 normalized, copy 1 not: every output is the exact eval-style transform of its own copy.
    images = _hwc_images(20)
    raw = AugmentConfig(crop_padding=0, hflip=False, normalize=False)
    loader = GpuCifarLoader([(images, np.arange(20), NO_AUG), (images, np.arange(20), raw)], 8, seed=0,
                            channels_last=True)
    assert loader.images.shape[0] == 20  # one device copy for both groups
    assert len(loader) == 5
    reference = normalize(_nchw(images), CIFAR100_MEAN, CIFAR100_STD)
    order = loader.epoch_indices().tolist()
    for b, (x, y) in enumerate(loader):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert sorted(y.tolist()) == sorted(i % 20 for i in order[8 * b: 8 * (b + 1)])
        copy = sorted(i >= 20 for i in order[8 * b: 8 * (b + 1)])  # batch grouped by copy, copy 0 first
        for image, label, second in zip(x, y, copy):
            expected = _nchw(images[label:label + 1])[0].float() / 255 if second else reference[label]
            assert torch.equal(image, expected)


def test_from_subsets_matches_the_eval_transform(tmp_path: Path):
    write_synthetic_cifar100(tmp_path, 120, 100, seed=0)
    splits = build_splits(DataConfig(root=str(tmp_path), val_size=20))
    loader = GpuCifarLoader.from_subsets([(splits.train, NO_AUG), (splits.train, AugmentConfig())], 10)
    assert loader.total == 200 and loader.images.shape[0] == 100  # the two copies share their images
    eval_tf = build_transform(None, train=False)
    dataset, indices = splits.train.dataset, splits.train.indices
    x, y = next(iter(loader))
    copy0 = [i for i in loader.epoch_indices()[:10].tolist() if i < 100]  # first in the batch, in epoch order
    assert copy0
    for image, label, i in zip(x[:len(copy0)], y, copy0):
        assert int(label) == dataset.targets[indices[i]]
        assert torch.equal(image, eval_tf(Image.fromarray(dataset.data[indices[i]])))


def test_loader_rejects_bad_input():
    with pytest.raises(MicronetError, match="fewer"):
        _index_loader(10, 8, world_size=2)
    with pytest.raises(MicronetError, match="uint8"):
        GpuCifarLoader([(np.zeros((4, 32, 32, 3), np.float32), np.arange(4), NO_AUG)], 2)
    with pytest.raises(MicronetError, match="rank"):
        _index_loader(10, 2, rank=2, world_size=2)


def test_each_step_of_a_multi_step_stage_gets_its_own_batches_and_its_batch_size():
    """compress_in_steps reseeds the GPU loader from (seed, step): step 2's fine-tuning does not replay step 1's
    batches (the loader's draws follow (seed, epoch), and every fine-tuning starts at epoch 0)."""
    from micronet.training import derived_seed

    loader = _index_loader(32, 8, seed=0)
    epochs = []
    for step in range(2):
        loader.set_seed(derived_seed(0, step))
        loader.set_epoch(0)
        epochs.append([y.clone() for _, y in loader])
    assert any(not torch.equal(a, b) for a, b in zip(*epochs))
    loader.set_seed(derived_seed(0, 0))
    assert all(torch.equal(a, y) for a, (_, y) in zip(epochs[0], loader))  # a resumed step draws the same
    loader.set_batch_size(4)
    assert len(loader) == 8 and all(len(y) == 4 for _, y in loader)
    with pytest.raises(MicronetError):
        loader.set_batch_size(64)
