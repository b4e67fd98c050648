"""DNW sparse training (per-layer top-k, straight-through gradient) and the resnet50_dnw architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from micronet.checkpoint import build_from_checkpoint, make_checkpoint
from micronet.compression.dnw import DnwTopK, apply_dnw, bake_dnw, density_report, kept_count
from micronet.config import OptimConfig
from micronet.errors import MicronetError
from micronet.nets import create_model, list_models
from micronet.scoring import count
from micronet.training import Runtime, fit

CPU = Runtime(torch.device("cpu"))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


# --- the top-k rule and the gradient ---------------------------------------------------------------------


def test_kept_count_is_dnws_training_rule_not_the_profilers():
    # DNW zeroes int(0.9 * numel) and keeps the rest; its profiler counted int(0.1 * numel).
    assert kept_count(4096, 0.1) == 410 and int(0.1 * 4096) == 409  # layer1.0.conv1: 64x64x1x1
    assert kept_count(36864, 0.1) == 3687  # 3x3 64->64: 3,686.4 rounds up to keep
    assert kept_count(2_048_000, 0.1) == 204_800  # the classifier: exact
    assert kept_count(10, 1.0) == 10 and kept_count(10, 0.05) == 1  # never an empty layer


def test_forward_keeps_each_layers_top_k_by_magnitude():
    layer = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -2.0, 0.1, 1.5, -0.2]]))
    apply_dnw(layer, density=0.4)  # keeps 5 - int(0.6 * 5) = 2: -2.0 and 1.5
    assert torch.equal(layer.weight, torch.tensor([[0.0, -2.0, 0.0, 1.5, 0.0]]))
    assert torch.equal(layer(torch.ones(1, 5)), torch.tensor([[-0.5]]))


def test_gradient_reaches_pruned_weights_straight_through():
    # y = W x, loss = sum(c * y): dloss/dW = c x^T for every entry, pruned or kept (DNW's ChooseTopEdges).
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1, -0.2], [0.05, -3.0, 0.3]]))
    apply_dnw(layer, density=0.5)  # keeps 6 - int(0.5 * 6) = 3: 1.0, -3.0, 0.3
    assert torch.equal(layer.weight != 0, torch.tensor([[True, False, False], [False, True, True]]))
    x, c = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([3.0, -4.0])
    (layer(x)[0] * c).sum().backward()
    original = layer.parametrizations.weight.original
    assert torch.equal(original.grad, torch.outer(c, x[0]))


def test_a_dormant_weight_reenters_the_top_k_after_it_grows():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, 0.2, 0.1]]))
    apply_dnw(layer, density=0.5)  # keeps 1.0 and 0.5
    x = torch.tensor([[0.0, 0.0, 0.0, 10.0]])  # only the dormant w3 sees input
    out = layer(x)
    assert out.item() == 0.0
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    (-out.sum()).backward()  # gradient -10 on w3 although it was pruned in this forward
    optimizer.step()
    assert torch.allclose(layer.parametrizations.weight.original, torch.tensor([[1.0, 0.5, 0.2, 1.1]]))
    assert torch.equal(layer.weight != 0, torch.tensor([[True, False, False, True]]))  # 0.5 is dormant now
    assert layer(x).item() == pytest.approx(11.0)


# --- applying, excluding, baking, saving -------------------------------------------------------------------


def test_apply_dnw_sparsifies_conv_and_linear_except_the_excluded_layer():
    model = small_cnn()
    dense_first = model[0].weight.detach().clone()
    assert apply_dnw(model, 0.25, exclude=["0"]) == ["3", "8"]
    assert not parametrize.is_parametrized(model[0]) and torch.equal(model[0].weight, dense_first)
    assert all(not parametrize.is_parametrized(m) for m in (model[1], model[4]))  # BN stays dense
    assert model[8].bias is not None and torch.count_nonzero(model[8].bias) == 4  # so do biases
    report = density_report(model)
    assert report["0"] == {"numel": 216, "nonzero": 216, "density": 1.0}
    assert report["3"]["nonzero"] == kept_count(1152, 0.25) == 288
    assert report["8"]["nonzero"] == 16


def test_apply_dnw_rejects_unknown_or_non_conv_exclude_names_and_a_second_application():
    with pytest.raises(MicronetError, match=r"exclude names no conv/linear layer \['1', 'conv1'\]"):
        apply_dnw(small_cnn(), 0.1, exclude=["conv1", "1"])  # no such layer; "1" is a BatchNorm
    model = small_cnn()
    apply_dnw(model, 0.1)
    with pytest.raises(MicronetError, match="already DNW-sparse"):
        apply_dnw(model, 0.1)


def test_bake_leaves_exact_zeros_at_the_requested_density_and_a_plain_state_dict():
    model = small_cnn().eval()
    apply_dnw(model, 0.1, exclude=["0"])
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    assert bake_dnw(model) == ["3", "8"]
    assert torch.equal(model(x), before)
    assert isinstance(model[3].weight, nn.Parameter) and not parametrize.is_parametrized(model[3])
    assert sorted(k for k in model.state_dict() if "weight" in k and "running" not in k) == [
        "0.weight", "1.weight", "3.weight", "4.weight", "8.weight"]
    assert int(torch.count_nonzero(model[3].weight)) == kept_count(1152, 0.1) == 116
    assert int(torch.count_nonzero(model[8].weight)) == kept_count(64, 0.1) == 7
    assert int(torch.count_nonzero(model[0].weight)) == 216
    assert bake_dnw(model) == []  # nothing left to bake


def test_training_state_dict_keeps_dormant_weights_and_reloads_into_a_dnw_model():
    model = small_cnn()
    apply_dnw(model, 0.1, exclude=["0"])
    state = model.state_dict()
    assert "3.parametrizations.weight.original" in state and "3.weight" not in state and "0.weight" in state
    assert int(torch.count_nonzero(state["3.parametrizations.weight.original"])) == 1152  # dense: resumable
    fresh = small_cnn()
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(state)  # the resume file needs apply_dnw first
    apply_dnw(fresh, 0.1, exclude=["0"])
    fresh.load_state_dict(state)
    assert torch.equal(fresh[3].parametrizations.weight.original, model[3].parametrizations.weight.original)


def test_training_loop_resumes_a_dnw_model_without_knowing_about_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=g)
    x = torch.randn(64, 3, 8, 8, generator=g) + y[:, None, None, None].float()
    data = TensorDataset(x, y)
    resume, cfg = tmp_path / "train.resume.pt", OptimConfig(epochs=2, lr=0.05)

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    model = small_cnn()
    apply_dnw(model, 0.25, exclude=["0"])
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, None, cfg, CPU, batch_size=16, resume_path=resume, fingerprint="f", on_epoch=stop_after_one)
    saved = torch.load(resume, weights_only=True)["model"]
    resumed = small_cnn()
    apply_dnw(resumed, 0.25, exclude=["0"])
    result = fit(resumed, data, None, cfg, CPU, batch_size=16, resume_path=resume, fingerprint="f")
    assert [r["epoch"] for r in result.history] == [1, 2]
    moved = resumed[3].parametrizations.weight.original.detach()
    assert not torch.equal(moved, saved["3.parametrizations.weight.original"])  # epoch 2 trained from it
    bake_dnw(resumed)
    ckpt = make_checkpoint(resumed, "test", {})
    assert not any("parametrizations" in k for k in ckpt["state_dict"])
    assert density_report(resumed)["3"]["nonzero"] == kept_count(1152, 0.25)


def test_dnw_topk_validates_density():
    with pytest.raises(MicronetError, match="density"):
        DnwTopK(0.0)


# --- resnet50_dnw ----------------------------------------------------------------------------------------


def test_resnet50_dnw_is_torchvisions_v1_5_with_a_bias_free_1x1_conv_classifier():
    torch.manual_seed(0)
    resnet = create_model("resnet50_dnw")
    assert "resnet50_dnw" in list_models()
    assert sum(p.numel() for p in resnet.parameters()) == 25_556_032
    fc = resnet.fc
    assert isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.bias is None
    assert (fc.in_channels, fc.out_channels) == (2048, 1000)
    block = resnet.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    assert block.downsample[0].stride == (2, 2)
    # kaiming_normal fan_in: std sqrt(2 / fan_in); fan_out would give 0.03125 and 0.0447 here
    assert resnet.layer4[0].conv3.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.01)
    assert fc.weight.std().item() == pytest.approx((2 / 2048) ** 0.5, rel=0.01)
    bns = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert create_model("resnet50_dnw", num_classes=10).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # DNW's profiler: int(p * numel) per conv with p = 1 - 0.9 (0.09999999999999998), the stem dense;
    # its README reports 2,558,732 for the submission's model
    convs = {n: m for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 54
    assert sum(int((1 - (0.0 if n == "conv1" else 0.9)) * m.weight.numel()) for n, m in convs.items()) == 2_558_732


def test_resnet50_dnw_at_10_percent_counts_sparse_layers_with_masks():
    model = create_model("resnet50_dnw", num_classes=100)
    sparse = apply_dnw(model, 0.1, exclude=["conv1"])
    assert len(sparse) == 53 and "conv1" not in sparse and sparse[-1] == "fc"  # 52 convs + the classifier
    bake_dnw(model)
    report = density_report(model)
    assert report["conv1"]["density"] == 1.0
    assert all(report[n]["nonzero"] == kept_count(report[n]["numel"], 0.1) for n in sparse)
    rebuilt = build_from_checkpoint(make_checkpoint(model, "resnet50_dnw", {"num_classes": 100}))  # plain keys
    assert density_report(rebuilt) == report
    result = count(model, (3, 32, 32), freebie=True)
    fc = next(l for l in result.layers if l.name == "fc")
    assert fc.kind == "conv" and fc.input_shape == (1, 2048, 1, 1) and fc.output_shape == (1, 100, 1, 1)
    assert fc.sparsity == pytest.approx(0.9)
    assert fc.mults == pytest.approx(20_480)  # 204,800 weights x 1 position x (1 - 0.9)
    assert fc.param_bits == 20_480 * 16 + 204_800  # nonzeros at 16 bits (freebie) + a 1-bit mask each


def test_mask_follows_the_logical_weight_in_channels_last():
    """The training loop may convert the model to channels_last: the top-k must not follow the memory order."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    apply_dnw(conv, 0.1)
    expected = conv.weight.detach().clone()
    conv.to(memory_format=torch.channels_last)
    assert conv.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, expected)
