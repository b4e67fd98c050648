"""Structured pruning, sparsity and quantization on toy PyramidNets."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pytest

from micronet.checkpoint import atomic_save, load_model, make_checkpoint, safe_load
from micronet.compression.quantize import power_of_two_exponent, quantize_model, quantize_tensor
from micronet.compression.sparsity import (
    apply_masks, global_magnitude_masks, prunable_weights, sparsity_report, step_rates,
)
from micronet.compression.structured import count_parameters, prune_to_rate, residual_writers
from micronet.errors import MicronetError
from micronet.nets import create_model

ARGS = {"depth": 11, "alpha": 24, "num_classes": 10}


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("pyramidnet", **ARGS).eval()


def batches(n: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def loss_fn_for(data):
    def loss_fn(model, per_sample=False):
        model.eval()
        if per_sample:
            return (F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for x, y in data for i in range(len(y)))
        return sum(F.cross_entropy(model(x), y) for x, y in data) / len(data)

    return loss_fn


# ---- structured -----------------------------------------------------------------------------------------


def test_residual_writers_are_the_stem_and_block_outputs():
    model = toy()
    names = {id(m): n for n, m in model.named_modules()}
    found = sorted(names[id(m)] for m in residual_writers(model, torch.zeros(1, 3, 32, 32)))
    assert found == ["conv1", "layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3"]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "hessian"])
def test_prune_removes_channels_to_the_rate(criterion):
    model = toy()
    before = count_parameters(model)
    rate = prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.5, before, criterion=criterion,
                         loss_fn=loss_fn_for(batches(1, 4)), max_layer_rate=0.8)
    after = count_parameters(model)
    assert rate == pytest.approx(1 - after / before)
    assert 0.5 <= rate <= 0.51  # lands within one of 200 small increments, not a whole step past the rate
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    # bottleneck widths shrank, the residual stream (block outputs, stem, classifier) kept its width
    reference = toy()
    ref_blocks = [b for layer in (reference.layer1, reference.layer2, reference.layer3) for b in layer]
    assert sum(b.conv1.out_channels for b in blocks) < sum(b.conv1.out_channels for b in ref_blocks)
    assert [b.conv3.out_channels for b in blocks] == [b.conv3.out_channels for b in ref_blocks]
    assert model.conv1.out_channels == reference.conv1.out_channels and model.fc.in_features == reference.fc.in_features
    for b in blocks:  # each conv's weight really has the smaller shape, and BN follows it
        assert b.conv2.weight.shape[1] == b.conv1.out_channels == b.bn2.num_features
        assert b.conv3.weight.shape[1] == b.conv2.out_channels == b.bn3.num_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_taylor_needs_data():
    model = toy()
    with pytest.raises(MicronetError, match="needs data"):
        prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.3, count_parameters(model), criterion="taylor")


def test_pruned_model_reloads_from_plan_and_state_dict(tmp_path):
    model = toy()
    prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.4, count_parameters(model), criterion="magnitude")
    path = tmp_path / "pruned.pt"
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    reloaded, ckpt = load_model(path)  # plain create_model + resize + load_state_dict: no pruning code
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(reloaded.eval()(x), model(x))
    assert count_parameters(reloaded) == count_parameters(model)
    assert all(isinstance(v, (dict, str, type(None), int)) for k, v in ckpt.items() if k != "state_dict")


def test_checkpoint_is_weights_only_and_errors_are_clear(tmp_path):
    with pytest.raises(MicronetError, match="checkpoint not found"):
        safe_load(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"module": nn.Linear(2, 2)}, evil)  # a pickled module object is refused
    with pytest.raises(MicronetError, match="refused: it pickles objects other than tensors"):
        safe_load(evil)
    wrong = tmp_path / "wrong.pt"
    ckpt = make_checkpoint(toy(), "pyramidnet", ARGS)
    ckpt["state_dict"]["fc.weight"] = torch.zeros(3, 3)
    atomic_save(ckpt, wrong)
    with pytest.raises(MicronetError, match="weights do not fit"):
        load_model(wrong)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"a": torch.ones(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# ---- sparsity -------------------------------------------------------------------------------------------


def test_step_rates_are_geometric_and_end_at_rate():
    rates = step_rates(0.51, 2)
    assert rates[0] == pytest.approx(0.3, abs=1e-3) and rates[-1] == pytest.approx(0.51)
    assert step_rates(0.5, 1) == [pytest.approx(0.5)]


def test_global_magnitude_masks_hit_the_exact_rate_and_respect_exclude():
    model = toy()
    weights = prunable_weights(model, exclude=["conv1"])
    assert "conv1.weight" not in weights and "fc.weight" in weights
    original = torch.cat([w.detach().abs().flatten().clone() for w in weights.values()])
    masks = global_magnitude_masks(weights, 0.6)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros == round(0.6 * total)
    apply_masks(model, masks)
    report = sparsity_report(model)
    assert report["conv1"]["zeros"] == 0
    keep = torch.cat([m.flatten() for m in masks.values()]).bool()
    # one global threshold: every surviving weight is at least as large as every removed one
    assert original[~keep].max() <= original[keep].min()
    assert torch.equal(torch.cat([w.detach().flatten() for w in weights.values()]) != 0, keep)


def test_exclude_keeps_a_factorized_layer_whole():
    from micronet.compression.factorized import FactorizedConv2d

    model = nn.Sequential()
    model.add_module("conv1", FactorizedConv2d(3, 8, 2, 4, 3, padding=1))
    model.add_module("conv10", nn.Conv2d(8, 8, 1))  # a name that merely starts like the excluded one
    assert list(prunable_weights(model, exclude=["conv1"])) == ["conv10.weight"]
    assert len(prunable_weights(model, exclude=["conv1.core"])) == 3


def test_exclude_unknown_layer_is_an_error():
    with pytest.raises(MicronetError, match="names no layer"):
        prunable_weights(toy(), exclude=["conv_first"])


# ---- quantization -------------------------------------------------------------------------------------------


def test_quantize_tensor_rounds_then_clamps_to_a_hand_computed_grid():
    # exponent 2, 4 bits: x*4 = [1.2, -6.8, 20, 0.496, -33] -> clamp [-8, 7] -> round -> [1, -7, 7, 0, -8] -> /4
    x = torch.tensor([0.3, -1.7, 5.0, 0.124, -8.25])
    assert quantize_tensor(x, 4, 2).tolist() == [0.25, -1.75, 1.75, 0.0, -2.0]
    # 8 bits, exponent 7 (bound 1.0): the 1/128 grid
    assert quantize_tensor(torch.tensor([0.5, 0.00390625 + 1e-4, 0.99999]), 8, 7).tolist() == [0.5, 0.0078125, 0.9921875]
    assert power_of_two_exponent(1.0, 8) == 7 and power_of_two_exponent(1.5, 8) == 6
    assert power_of_two_exponent(0.2, 9) == 8 + 2  # ceil(log2 0.2) = -2


def test_sigmamax_exponent_is_from_mean_plus_k_sigma():
    from micronet.compression.quantize import range_bound

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 30.0])  # mean 8, sample variance 610 / 4 = 152.5
    bound = range_bound(x, "sigmamax", 2.0)
    assert bound == pytest.approx(8.0 + 2 * 152.5**0.5, rel=1e-6)
    assert power_of_two_exponent(bound, 9) == 8 - 6  # |mean| + 2 sigma = 32.70 -> 2^6 -> exponent 2
    assert range_bound(x, "max", 2.0) == 30.0
    assert range_bound(-x, "sigmamax", 2.0) == pytest.approx(bound)  # |mean|


def test_activation_quantizer_tracks_a_running_average_and_quantizes_while_calibrating():
    from micronet.compression.quantize import ActivationQuantizer

    q = ActivationQuantizer(bits=8, sigmas=1.0, momentum=0.5)
    q.calibrating = True
    first = torch.tensor([1.0, 3.0])  # mean 2, std 1.41421
    second = torch.tensor([-4.0, 4.0, 4.0, -4.0])  # mean 0, std 4.6188
    out = q(first)
    # after one batch the statistics are the batch's: bound 2 + 1.41421 -> exponent 8-1-2 = 5, grid 1/32
    assert int(q.exponent) == 5 and torch.equal(out, quantize_tensor(first, 8, 5))
    q(second)
    mean = 2 + 0.5 * (0 - 2)
    std = 2**0.5 + 0.5 * (second.std().item() - 2**0.5)
    assert q._mean == pytest.approx(mean) and q._std == pytest.approx(std)
    q.finish_calibration()
    assert int(q.exponent) == power_of_two_exponent(abs(mean) + std, 8) == 4
    assert not q.calibrating and torch.equal(q(torch.tensor([0.51])), torch.tensor([0.5]))


def test_hessian_criterion_removes_the_channel_with_the_least_w2_mean_g2():
    """OBD: a channel's importance is sum w^2 * E[g^2] over its weights in the group (conv rows + the
    classifier's columns), with g the per-sample gradient. Computed here by hand and compared with what goes."""
    torch.manual_seed(4)  # a model where the last sample alone would rank another channel lowest
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3))
    data = batches(2, 6)
    data = [(x[:, :, :8, :8], y % 3) for x, y in data]
    conv, fc = model[0], model[4]
    squares = [torch.zeros_like(conv.weight), torch.zeros_like(fc.weight)]
    last = None
    n = 0
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            last = [conv.weight.grad.pow(2).clone(), fc.weight.grad.pow(2).clone()]
            squares[0] += last[0]
            squares[1] += last[1]
            n += 1

    def importance(sq):
        return (conv.weight.detach() ** 2 * sq[0] / n).flatten(1).sum(1) + (fc.weight.detach() ** 2 * sq[1] / n).sum(0)

    expected = int(importance(squares).argmin())
    assert expected != int(importance([last[0] * n, last[1] * n]).argmin())  # the last sample alone ranks otherwise
    before = conv.weight.detach().clone()
    prune_to_rate(model, torch.zeros(1, 3, 8, 8), 0.1, count_parameters(model), criterion="hessian",
                  loss_fn=loss_fn_for(data), max_layer_rate=0.5)
    keep = [c for c in range(6) if c != expected]
    assert conv.out_channels == 5 and torch.equal(conv.weight.detach(), before[keep])


def _quantized_toy(points: str = "every_op", weight_bits: int = 9, activation_bits: int = 12):
    import copy

    from micronet.compression.quantize import batchnorm_to_affine, fold_batchnorms
    from micronet.scoring import foldable_batchnorms

    model = toy()
    prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.3, count_parameters(model), criterion="magnitude")
    apply_masks(model, global_magnitude_masks(prunable_weights(model), 0.5))
    calib = [x for x, _ in batches(3, 8)]
    x = calib[0]
    reference = model(x)
    pairs = foldable_batchnorms(model, (3, 32, 32))
    folded = copy.deepcopy(model)  # the float weights the quantizer rounds, for hand-computed exponents
    fold_batchnorms(folded, pairs)
    for m in folded.modules():
        if isinstance(m, nn.BatchNorm2d):
            batchnorm_to_affine(m)
    info = quantize_model(model, pairs, calib, weight_bits=weight_bits, activation_bits=activation_bits, points=points,
                          example=x[:1])
    return model, info, x, reference, folded


def test_quantize_folds_bn_rounds_weights_with_sigmamax_exponents_and_keeps_zeros(tmp_path):
    from micronet.compression.quantize import range_bound

    model, info, x, reference, folded = _quantized_toy()
    spec = info["spec"]
    assert spec["folded"] and ["conv1", "bn1"] in spec["folded"]
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    for name, exponent in info["weight_exponents"].items():
        original = folded.get_parameter(name).detach()
        assert exponent == power_of_two_exponent(float(original.mean().abs() + 10 * original.std()), 9), name
        assert exponent == power_of_two_exponent(range_bound(original, "sigmamax", 10.0), 9), name
        assert torch.equal(model.get_parameter(name).detach(), quantize_tensor(original, 9, exponent)), name
    # sparsity survives quantization exactly: the zeros of the pruned weights are still there, no new ones lost
    for name in ("layer1.0.conv2", "layer2.0.conv1"):
        assert torch.equal(model.get_submodule(name).weight == 0, folded.get_submodule(name).weight == 0)
    # activations are rounded too: outputs differ slightly from float, but not wildly
    out = model(x)
    assert not torch.equal(out, reference)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_quantized_checkpoint_round_trips_and_the_counter_reads_its_bits(tmp_path):
    from micronet.scoring import count

    model, info, x, _, _ = _quantized_toy()
    path = tmp_path / "q.pt"
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    reloaded, ckpt = load_model(path)
    assert ckpt["quantization"]["weight_bits"] == 9 and ckpt["quantization"]["activation_bits"] == 12
    assert torch.equal(reloaded.eval()(x), model(x))
    counted = count(reloaded, (3, 32, 32), freebie=True)
    assert counted.quantized and not counted.freebie
    convs = [r for r in counted.layers if r.kind == "conv"]
    assert convs and all(r.bits == 12 for r in convs[1:])  # max(9-bit weights, 12-bit activations)


def test_wave_range_corner_cases_one_element_zeros_and_constants():
    """Wave's SigmaMax gives a single value std = 1e-15 * |mean| (not NaN), so it is bounded by itself: 3.7 at 9 bits
    takes exponent 9-1-2 = 6 and stays 237/64 = 3.703125 (a NaN bound would clamp it to 255/256). All zeros: any
    exponent keeps them zero; a constant tensor (std 0) is bounded by |mean| and kept to the grid's precision."""
    from micronet.compression.quantize import range_bound, weight_exponent

    one = torch.tensor([[[[3.7]]]])
    assert range_bound(one, "sigmamax", 10.0) == pytest.approx(3.7)
    e = weight_exponent(one, 9, "sigmamax", 10.0, per_channel=False)
    assert int(e) == 6 and quantize_tensor(one, 9, e).item() == 3.703125
    assert quantize_tensor(one, 9, weight_exponent(one, 9, "sigmamax", 10.0, per_channel=True)).item() == 3.703125
    zeros = torch.zeros(4, 3)
    assert int(weight_exponent(zeros, 9, "sigmamax", 10.0, False)) == 8
    assert torch.equal(quantize_tensor(zeros, 9, weight_exponent(zeros, 9, "sigmamax", 10.0, True)), zeros)
    constant = torch.full((2, 5), -0.3)  # bound 0.3 -> ceil(log2 0.3) = -1 -> exponent 9; -0.3 * 512 = -153.6
    e = weight_exponent(constant, 9, "sigmamax", 10.0, per_channel=True)
    assert e.tolist() == [9, 9] and torch.equal(quantize_tensor(constant, 9, e), torch.full((2, 5), -154 / 512))


def test_per_channel_exponents_and_per_layer_bits_are_stored_counted_and_reloaded(tmp_path):
    """One exponent per output channel: each channel on its own grid (a channel of small weights keeps its
    precision beside one of large weights), each exponent stored as a buffer and charged 8 bits by the counter;
    layer_bits patterns give a layer its own width, which the checkpoint states and the counter charges."""
    from micronet.compression.quantize import ActivationQuantizer, QuantizationAware, channel_bounds, off_grid
    from micronet.scoring import EXPONENT_BITS, count

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    with torch.no_grad():
        model[0].weight[0].mul_(100.0)  # channel 0 two orders of magnitude above the others
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(8, 3, 8, 8)
    info = quantize_model(model, [], [x], weight_bits=6, activation_bits=8, layer_bits={"2": 10},
                          per_channel=True)
    spec = info["spec"]
    assert spec["layer_weight_bits"] == {"0": 6, "2": 10, "6": 6} and spec["weight_exponents"] == "per_channel"
    e0 = model[0].weight_exponent
    assert e0.shape == (4,) and e0.tolist() == [6 - 1 - math.ceil(math.log2(b)) for b in
                                                channel_bounds(original["0.weight"], "sigmamax", 10.0).tolist()]
    assert e0[1] > e0[0] + 5  # the small channels got finer grids
    for i in range(4):
        assert torch.equal(model[0].weight[i], quantize_tensor(original["0.weight"][i], 6, int(e0[i])))
    assert model[2].weight_bits == 10 and model[0].bias_exponent.dim() == 0  # biases: one exponent
    counted = count(model, (3, 8, 8))
    by_kind = {r.kind: r for r in counted.layers}
    for row, name in zip([r for r in counted.layers if r.kind in ("conv", "linear")], ("0", "2", "6")):
        layer, bits = model.get_submodule(name), spec["layer_weight_bits"][name]
        w, nnz = layer.weight, int(torch.count_nonzero(layer.weight))  # rounding may zero small weights: masked
        weight = nnz * bits + (w.numel() if nnz < w.numel() else 0) + EXPONENT_BITS * w.shape[0]
        bias = layer.bias.numel() * bits + EXPONENT_BITS
        assert row.param_bits == weight + bias, (name, row)
    assert by_kind["linear"].bits == 8  # max(6-bit weights, 8-bit activations)
    assert (by_kind["linear"].weight_bits, by_kind["linear"].activation_bits) == (6, 8)
    head = counted.table(tasks=["cifar100"]).splitlines()[0]
    assert "weight bits" in head and "act bits" in head  # the count table says both apart
    path = tmp_path / "q.pt"
    atomic_save(make_checkpoint(model, "tiny", {}), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["quantization"]["layer_weight_bits"]["2"] == 10 and "0.weight_exponent" in ckpt["state_dict"]
    assert off_grid(model) == []
    with torch.no_grad():
        model[2].weight[1, 0, 0, 0] += 2.0 ** -int(model[2].weight_exponent[1]) / 2  # half a step off channel 1
    assert off_grid(model) == ["2.weight"]
    with torch.no_grad():
        model[2].weight.copy_(quantize_tensor(model[2].weight, 10, model[2].weight_exponent))
    qat = QuantizationAware(model)  # fine-tunes on the same per-channel grids
    assert torch.equal(qat(x), model(x))
    assert sum(isinstance(m, ActivationQuantizer) for m in model.modules()) >= 5


def test_wave_activation_points_keep_every_op_at_the_activation_bits():
    """Wave quantizes after every leaf module and the input; with the residual sums quantized too, no arithmetic
    op of the PyramidNet runs above 12 bits except the 32-bit accumulators the rules require: conv/linear adds,
    and the requantization that reads an accumulator."""
    from micronet.scoring import count

    model, info, _, _, _ = _quantized_toy("every_op")
    points = set(info["spec"]["activation_layers"])
    assert {"", "layer1.0", "layer1.0.shake_drop", "layer2.0.downsample", "layer1.0.conv2", "avgpool"} <= points
    assert not points & {"layer1", "bn1", "layer1.0.bn4"}  # containers passing a child's output, folded BNs
    counted = count(model, (3, 32, 32))
    for row in counted.layers:
        if row.kind in ("conv", "linear"):
            assert row.bits == 12, row  # the multiplies; their adds accumulate at 32
        elif row.kind != "requant":
            assert row.bits <= 12, row
    kinds = {row.kind for row in counted.layers if row.bits <= 12}
    assert {"add", "scale", "bn", "relu", "gap"} <= kinds  # residual adds, ShakeDrop, unfoldable bn1, pools

    layers_only, _, _, _, _ = _quantized_toy("layers")
    wide = [r for r in count(layers_only, (3, 32, 32)).layers if r.kind in ("add", "scale", "bn") and r.bits > 12]
    assert wide  # the old points left the sums and the next BN at 32 bits


def test_prune_stops_at_the_layer_cap_instead_of_overshooting():
    model = toy()
    before = count_parameters(model)
    rate = prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.9, before, criterion="magnitude", max_layer_rate=0.2)
    assert 0.05 < rate < 0.5  # capped: every bottleneck keeps at least 80% of its channels
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    reference = [b for layer in (toy().layer1, toy().layer2, toy().layer3) for b in layer]
    assert all(b.conv1.out_channels >= 0.8 * r.conv1.out_channels - 1 for b, r in zip(blocks, reference))


def test_quantization_aware_finetuning_lowers_the_loss_on_the_grid_with_masks_kept():
    """The one loop trains a quantized sparse toy through straight-through rounding: its loss on the training data
    falls, and after `finish` every parameter is exactly on its (frozen) grid and every pruned weight still zero.
    The BN after the ReLU cannot be folded: it stays an affine map in eval mode while the loop trains."""
    from torch.utils.data import TensorDataset

    from micronet.compression.quantize import ActivationQuantizer, QuantizationAware, sparsity_masks
    from micronet.config import OptimConfig
    from micronet.scoring import foldable_batchnorms
    from micronet.training import Runtime, evaluate, fit, make_loader

    cpu = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    apply_masks(model, global_magnitude_masks(prunable_weights(model), 0.5))
    masks = sparsity_masks(model)
    assert set(masks) == {"0.weight", "4.weight", "8.weight"}
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (64,), generator=g)
    patterns = torch.randn(4, 3, 8, 8, generator=g)  # one image per class, under noise: learnable
    data = TensorDataset(patterns[labels] + 0.5 * torch.randn(64, 3, 8, 8, generator=g), labels)
    loader = make_loader(data, 64, cpu, train=False, workers=0)
    info = quantize_model(model, foldable_batchnorms(model, (3, 8, 8)), [data.tensors[0]], weight_bits=6,
                          activation_bits=8)
    assert info["spec"]["folded"] == [["0", "1"]]
    exponents = [int(m.exponent) for m in model.modules() if isinstance(m, ActivationQuantizer)]
    before = evaluate(model, loader, cpu).loss
    qat = QuantizationAware(model)
    fit(qat, data, None, OptimConfig(epochs=8, lr=0.1, weight_decay=0.0), cpu, batch_size=16,
        masks=qat.masks(masks))
    assert not model[3].training  # the unfoldable BN never used batch statistics
    model = qat.finish()
    assert not any(n.endswith("original") for n, _ in model.named_parameters())
    after = evaluate(model, loader, cpu).loss
    assert after < 0.9 * before, (before, after)
    for name, exponent in info["weight_exponents"].items():
        p = model.get_parameter(name).detach()
        assert torch.equal(p, quantize_tensor(p, 6, exponent)), name
    for name, mask in masks.items():
        assert not model.get_parameter(name).detach()[mask == 0].any(), name
    assert [int(m.exponent) for m in model.modules() if isinstance(m, ActivationQuantizer)] == exponents


def test_fidelity_counts_top1_agreement_and_the_relative_logit_error():
    from micronet.compression.quantize import fidelity

    reference = torch.tensor([[3.0, 1.0, 0.0], [1.0, 4.0, 0.0], [-2.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    logits = reference.clone()
    logits[:, 2] = reference[:, 0]  # top-1: [0 (a tie: the first), 1, 1, 0] against [0, 1, 2, 0]
    result = fidelity(reference, logits)
    assert result["agreement"] == 0.75
    assert result["logit_relative_error"] == pytest.approx(float(reference[:, 0].norm() / reference.norm()))
    assert fidelity(reference, reference) == {"agreement": 1.0, "logit_relative_error": 0.0}
