"""Structured pruning, sparsity and quantization on toy PyramidNets."""

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
    assert 0.5 <= rate <= 0.52
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
    with pytest.raises(MicronetError, match="not a readable micronet checkpoint"):
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


def test_exclude_unknown_layer_is_an_error():
    with pytest.raises(MicronetError, match="names no layer"):
        prunable_weights(toy(), exclude=["conv_first"])


# ---- quantization -------------------------------------------------------------------------------------------


def test_quantize_tensor_rounds_to_bits():
    x = torch.randn(1000) * 3
    e = power_of_two_exponent(float(x.abs().max()), 8)
    q = quantize_tensor(x, 8, e)
    ints = q * 2.0**e
    assert torch.equal(ints, ints.round()) and ints.min() >= -128 and ints.max() <= 127
    assert (q - x).abs().max() <= 2.0 ** (-e) / 2 + 1e-6
    assert power_of_two_exponent(1.0, 8) == 7 and power_of_two_exponent(1.5, 8) == 6


def _quantized_toy():
    from micronet.scoring import foldable_batchnorms

    model = toy()
    prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.3, count_parameters(model), criterion="magnitude")
    apply_masks(model, global_magnitude_masks(prunable_weights(model), 0.5))
    calib = [x for x, _ in batches(3, 8)]
    x = calib[0]
    reference = model(x)
    pairs = foldable_batchnorms(model, (3, 32, 32))
    info = quantize_model(model, pairs, calib, weight_bits=9, activation_bits=12)
    return model, info, x, reference


def test_quantize_folds_bn_rounds_weights_and_keeps_zeros(tmp_path):
    model, info, x, reference = _quantized_toy()
    spec = info["spec"]
    assert spec["folded"] and ["conv1", "bn1"] in spec["folded"]
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    for (name, exponent) in info["weight_exponents"].items():
        p = model.get_parameter(name)
        ints = p.detach() * 2.0**exponent
        assert torch.equal(ints, ints.round()), name
        assert ints.min() >= -256 and ints.max() <= 255, name  # 9-bit signed
    # sparsity survives quantization exactly
    assert sparsity_report(model)["layer1.0.conv2"]["sparsity"] >= 0.2
    # activations are rounded too: outputs differ slightly from float, but not wildly
    out = model(x)
    assert not torch.equal(out, reference)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_quantized_checkpoint_round_trips_and_the_counter_reads_its_bits(tmp_path):
    from micronet.scoring import count

    model, info, x, _ = _quantized_toy()
    path = tmp_path / "q.pt"
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    reloaded, ckpt = load_model(path)
    assert ckpt["quantization"]["weight_bits"] == 9 and ckpt["quantization"]["activation_bits"] == 12
    assert torch.equal(reloaded.eval()(x), model(x))
    counted = count(reloaded, (3, 32, 32), freebie=True)
    assert counted.quantized and not counted.freebie
    convs = [r for r in counted.layers if r.kind == "conv"]
    assert convs and all(r.bits == 12 for r in convs[1:])  # max(9-bit weights, 12-bit activations)


def test_prune_stops_at_the_layer_cap_instead_of_overshooting():
    model = toy()
    before = count_parameters(model)
    rate = prune_to_rate(model, torch.zeros(1, 3, 32, 32), 0.9, before, criterion="magnitude", max_layer_rate=0.2)
    assert 0.05 < rate < 0.5  # capped: every bottleneck keeps at least 80% of its channels
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    reference = [b for layer in (toy().layer1, toy().layer2, toy().layer3) for b in layer]
    assert all(b.conv1.out_channels >= 0.8 * r.conv1.out_channels - 1 for b, r in zip(blocks, reference))
