"""The MicroNet counter against the rules' public test vectors and hand-computed per-op costs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from micronet.errors import MicronetError
from micronet.nets import create_model
from micronet.scoring import TASKS, Count, count, foldable_batchnorms
from stages.count import count_command

from counting import Fn, totals


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(model: nn.Module) -> nn.Module:
    """Random init can draw an exact 0.0, which the rules count as sparsity (and a mask): avoid it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # weights; biases are never masked
                p[p == 0] = 1e-3
    return model


# ---------------------------------------------------------------------------------------------
# Public test vectors (rules doc section 5)


def test_vector_conv_no_bias():
    c = count(nn.Conv2d(16, 32, 3, padding=1, bias=False), (16, 32, 32))
    assert totals(c) == (147_456, 4_718_592, 4_685_824)


def test_vector_conv_bias_relu():
    c = count(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()), (16, 32, 32))
    assert totals(c) == (148_480, 4_751_360, 4_718_592)


def test_vector_conv_stride2_freebie():
    c = count(nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()), (16, 32, 32), freebie=True)
    assert totals(c) == (74_240, 1_187_840, 1_179_648)
    assert c.freebie and not c.quantized
    assert c.flops == 1_187_840 / 2 + 1_179_648


def test_vector_global_average_pool():
    c = count(nn.AdaptiveAvgPool2d(1), (384, 8, 8))
    assert totals(c) == (0, 384, 24_192)
    assert [l.kind for l in c.layers] == ["gap"]


def test_vector_linear():
    c = count(nn.Linear(384, 100), (384,))
    assert totals(c) == (1_232_000, 38_400, 38_400)


class WRNBlock(nn.Module):
    """fastai BasicBlock: the shortcut reads relu(bn(x)), the residual branch is scaled by 0.2."""

    def __init__(self, ni: int, nf: int, stride: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(ni)
        self.conv1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False)
        self.conv2 = nn.Sequential(nn.BatchNorm2d(nf), nn.ReLU(inplace=True), nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.shortcut = nn.Conv2d(ni, nf, 1, stride, 0, bias=False) if ni != nf else None

    def forward(self, x):
        x2 = F.relu(self.bn(x), inplace=True)
        r = self.shortcut(x2) if self.shortcut is not None else x2
        x = self.conv2(self.conv1(x2)) * 0.2
        return x.add_(r)


def wrn_22_6() -> nn.Module:
    widths = [16, 96, 192, 384]
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    for g in range(3):
        for b in range(3):
            layers.append(WRNBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], (1 if g == 0 else 2) if b == 0 else 1))
    layers += [nn.BatchNorm2d(384), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(384, 100)]
    return nn.Sequential(*layers)


def test_vector_wrn_22_6():
    model = dense(wrn_22_6())
    assert sum(p.numel() for p in model.parameters()) == 9_693_108
    c = count(model, (3, 32, 32))
    convs = [l for l in c.layers if l.kind == "conv"]
    assert len(convs) == 22
    assert sum(l.mults for l in convs) == 1_384_562_688
    # The vector is for bias-free convs; the ones a BN folds into gain N bias adds on top.
    bias_adds = sum(math.prod(l.output_shape) for l in convs if "+" in l.name)
    assert sum(l.adds for l in convs) == 1_383_342_080 + bias_adds
    # Folds: the stem (its output only feeds block 1's BN) and each block's conv1 (into conv2's BN).
    assert sorted(l.name for l in convs if "+" in l.name) == sorted(
        ["0+bn"] + [f"{i}.conv1+0" for i in range(1, 10)]
    )


def test_vector_score_arithmetic():
    def score(params: float, flops: float, task: str) -> float:
        return Count(param_bits=params * 32, mults=0, adds=0, params=params, flops=flops).score(task)

    assert round(score(2_558_732, 1_030_462_620, "imagenet"), 6) == 1.251568
    # UCI's own 0.074762 is one unit high in the 6th decimal (exact: 0.0747612): allow the last digit
    assert abs(score(0.5 * 2_793_064, 382_885_052, "cifar100") - 0.074762) <= 1e-6
    assert round(score(2_793_064, 512_835_116, "cifar100"), 5) == 0.12541
    assert round(score(108_108.75, 26_052_109, "cifar100"), 7) == 0.0054454
    assert TASKS["cifar100"]["params_ref"] == 36.5e6 and TASKS["imagenet"]["ops_ref"] == 1170e6
    with pytest.raises(MicronetError, match="unknown task"):
        score(1, 1, "cifar10")


# ---------------------------------------------------------------------------------------------
# Every op kind, by hand (C=4 channels of 8x8 unless stated: N = 256 elements)

N = 4 * 8 * 8


@pytest.mark.parametrize(
    "name, fn, expected",
    [
        # depthwise 3x3: V = 9, N = 256 -> mults 9N, adds 8N, 36 weights
        ("depthwise", lambda x, m: m(x), (36 * 32, 9 * N, 8 * N)),
        # windowed avg pool 2x2/2: 64 outputs, 1 mult + 3 adds each
        ("avgpool", lambda x: F.avg_pool2d(x, 2), (0, 64, 3 * 64)),
        # max pool 3x3/2 pad 1: 64 outputs, 8 comparisons each
        ("maxpool", lambda x: F.max_pool2d(x, 3, 2, 1), (0, 8 * 64, 0)),
        # pools whose window is the whole input are global: C mults, (HW-1)C adds
        ("gap_avgpool", lambda x: F.avg_pool2d(x, 8), (0, 4, 63 * 4)),
        ("gap_mean", lambda x: x.mean((2, 3)), (0, 4, 63 * 4)),
        ("add", lambda x: x + x.relu(), (0, N, N)),
        ("scale_scalar", lambda x: x * 0.2, (0, N, 0)),
        ("scale_rmul", lambda x: 0.2 * x, (0, N, 0)),
        ("div_scalar", lambda x: x / 4, (0, N, 0)),
        ("relu", lambda x: F.relu(x), (0, N, 0)),
        ("relu6", lambda x: F.relu6(x), (0, 2 * N, 0)),
        ("hardtanh_relu6", lambda x: F.hardtanh(x, 0.0, 6.0), (0, 2 * N, 0)),
        ("sigmoid", lambda x: torch.sigmoid(x), (0, 2 * N, N)),
        ("silu", lambda x: F.silu(x), (0, 3 * N, N)),
        ("hardswish", lambda x: F.hardswish(x), (0, 4 * N, N)),
        ("hardsigmoid", lambda x: F.hardsigmoid(x), (0, 3 * N, N)),
        # unfoldable BN (its input is the model input): 1 mult + 1 add per element, 2 params per channel
        ("bn", lambda x, m: m(x), (2 * 4 * 32, N, N)),
        # data movement is free
        ("free", lambda x: torch.cat([F.pad(x, (0, 0, 0, 0, 0, 4)), x], 1).flatten(1).view(1, -1)[:, :10], (0, 0, 0)),
        ("dropout", lambda x, m: m(F.dropout(x, 0.5, training=False)), (0, 0, 0)),
    ],
)
def test_op_kinds(name, fn, expected):
    mods = {"depthwise": [nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)], "bn": [nn.BatchNorm2d(4)],
            "dropout": [nn.Dropout(0.3)]}.get(name, [])
    c = count(Fn(fn, *mods), (4, 8, 8))
    assert totals(c) == expected


def test_grouped_conv_and_linear_bias():
    # grouped 3x3, 8->8, groups 2: V = 9*4 = 36 per output, N = 8*6*6 = 288, plus bias adds
    c = count(nn.Conv2d(8, 8, 3, padding=1, groups=2), (8, 6, 6))
    assert totals(c) == ((8 * 4 * 9 + 8) * 32, 36 * 288, 35 * 288 + 288)
    # a linear layer on a flattened pool: 10 -> 3 without bias
    c = count(nn.Sequential(nn.Flatten(), nn.Linear(10, 3, bias=False)), (10, 1, 1))
    assert totals(c) == (30 * 32, 30, 9 * 3)


def test_adaptive_pool_to_non_global_output():
    # 5 -> 2 adaptive windows are [0:3] and [2:5]: four 3x3 windows per channel, 8 adds each
    c = count(nn.AdaptiveAvgPool2d(2), (2, 5, 5))
    assert totals(c) == (0, 8, 2 * 4 * 8)
    c = count(nn.AdaptiveMaxPool2d(1), (2, 5, 5))
    assert totals(c) == (0, 2 * 24, 0)


def test_clamp_counts_one_comparison_per_bound():
    assert count(Fn(lambda x: x.clamp(0, 6)), (4, 8, 8)).mults == 2 * N
    assert count(Fn(lambda x: x.clamp(min=0)), (4, 8, 8)).mults == N


# ---------------------------------------------------------------------------------------------
# Functional ops count like their modules


class ModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.gate = nn.Sigmoid()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(x)))
        y = y * self.gate(y)
        x = self.pool(x + y)
        return self.fc(torch.flatten(self.gap(x), 1))


class FunctionalNet(ModuleNet):
    def forward(self, x):
        bn = lambda t, m: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        x = F.relu(bn(F.conv2d(x, self.conv1.weight, None, 1, 1), self.bn1))
        y = bn(F.conv2d(x, self.conv2.weight, None, 1, 1, 1, 8), self.bn2)
        y = y * torch.sigmoid(y)  # swish written out: 2 + 1 mults, 1 add, like SiLU
        y = y * torch.sigmoid(y)
        x = F.max_pool2d(x.add(y), 2)
        return F.linear(F.adaptive_avg_pool2d(x, 1).view(1, -1), self.fc.weight, self.fc.bias)


def test_functional_twin_counts_the_same():
    a, b = count(ModuleNet(), (3, 16, 16)), count(FunctionalNet(), (3, 16, 16))
    assert totals(a) == totals(b)
    assert a.flops == b.flops
    # both BNs fold into their convs; the residual add, pooling and activations are all counted
    assert [l.kind for l in a.layers] == ["conv", "relu", "conv", "silu", "sigmoid", "scale", "add", "maxpool", "gap", "linear"]
    assert [l.kind for l in b.layers] == ["conv", "relu", "conv", "sigmoid", "scale", "sigmoid", "scale", "add", "maxpool", "gap", "linear"]
    relu_rows = [l for l in a.layers if l.kind == "relu"] + [l for l in b.layers if l.kind == "relu"]
    assert relu_rows[0].mults == relu_rows[1].mults == 8 * 16 * 16


# ---------------------------------------------------------------------------------------------
# Sparsity and masks


def test_sparse_conv_scales_ops_and_adds_mask():
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.view(-1)[: 4608 // 4] = 0.0  # exactly 25% zeros
    c = count(conv, (16, 8, 8))
    n = 32 * 8 * 8
    v = 144 * 0.75
    assert c.layers[0].sparsity == 0.25
    assert (c.mults, c.adds) == (v * n, (v - 1) * n)
    assert c.param_bits == 3456 * 32 + 4608


def test_dense_layer_has_no_mask_and_bias_is_never_masked():
    fc = nn.Linear(384, 100)
    with torch.no_grad():
        fc.bias.zero_()
    assert count(fc, (384,)).param_bits == (38_400 + 100) * 32


def test_unstructured_fraction_is_exact():
    fc = nn.Linear(7, 3, bias=False)
    with torch.no_grad():
        fc.weight[0, :3] = 0.0  # 3 of 21 zero: s is not a round number
    c = count(fc, (7,))
    v = 7.0 * (1.0 - 3 / 21)
    assert (c.mults, c.adds) == (v * 3, (v - 1) * 3)
    assert c.param_bits == 18 * 32 + 21


# ---------------------------------------------------------------------------------------------
# BatchNorm folding


def test_conv_bn_folds_into_a_bias():
    c = count(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)), (4, 8, 8))
    n = 8 * 64
    assert [l.kind for l in c.layers] == ["conv"] and c.layers[0].name == "0+1"
    assert totals(c) == ((288 + 8) * 32, 36 * n, 35 * n + n)


def test_conv_with_bias_does_not_gain_another():
    c = count(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)), (4, 8, 8))
    assert totals(c) == ((288 + 8) * 32, 36 * 512, 36 * 512)


def test_linear_bn1d_folds():
    c = count(nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), (6,))
    assert totals(c) == ((30 + 5) * 32, 30, 5 * 5 + 5)


def test_foldable_batchnorms_names_module_pairs():
    model = dense(wrn_22_6())
    pairs = foldable_batchnorms(model, (3, 32, 32))
    assert pairs == [("0", "1.bn")] + [(f"{i}.conv1", f"{i}.conv2.0") for i in range(1, 10)]
    shared = nn.Conv2d(4, 4, 1, bias=False)  # called twice: folding one caller's BN would change the other
    bn = nn.BatchNorm2d(4)
    assert foldable_batchnorms(Fn(lambda x, c, b: b(c(x)) + c(x), shared, bn), (4, 2, 2)) == []


def test_bn_after_residual_add_does_not_fold():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    c = count(Fn(lambda x, conv, bn: bn(conv(x) + x), conv, bn), (4, 8, 8))
    assert [l.kind for l in c.layers] == ["conv", "add", "bn"]
    assert totals(c) == ((144 + 8) * 32, 36 * N + N, 35 * N + N + N)


def test_bn_whose_input_has_two_consumers_does_not_fold():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    c = count(Fn(lambda x, conv, bn: (lambda y: F.relu(bn(y)) + y)(conv(x)), conv, bn), (4, 8, 8))
    assert [l.kind for l in c.layers] == ["conv", "bn", "relu", "add"]
    assert c.param_bits == (144 + 2 * 4) * 32


# ---------------------------------------------------------------------------------------------
# Precision: freebie and quantized models


def test_freebie_halves_params_and_mults_not_adds():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    full, half = count(model, (3, 8, 8)), count(model, (3, 8, 8), freebie=True)
    assert half.param_bits == full.param_bits / 2
    assert (half.mults, half.adds) == (full.mults, full.adds)
    assert full.flops == full.mults + full.adds
    assert half.flops == full.mults / 2 + full.adds
    assert half.to_dict()["freebie"] is True and full.to_dict()["freebie"] is False
    assert all(l.bits == 16 for l in half.layers)


class QConv2d(nn.Conv2d):
    weight_bits = 9


class QLinear(nn.Linear):
    weight_bits = 9


class ActQuant(nn.Module):
    """Power-of-two fake quantizer: round/clamp inside are one requant op, not counted one by one."""

    activation_bits = 12

    def forward(self, x):
        scale = 2.0**6
        hi = 2 ** (self.activation_bits - 1)
        return torch.clamp(torch.round(x * scale), -hi, hi - 1) / scale


def quantized_model() -> nn.Module:
    return nn.Sequential(ActQuant(), QConv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), ActQuant(),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), QLinear(8, 10))


@pytest.mark.parametrize("freebie", [False, True])
def test_quantized_model(freebie):
    c = count(quantized_model(), (4, 8, 8), freebie=freebie)
    assert c.quantized and not c.freebie  # quantizing removes the freebie
    assert [l.kind for l in c.layers] == ["requant", "conv", "requant", "relu", "gap", "linear"]
    # one 8-bit exponent per quantizer and per quantized tensor (weights and biases, each with its own scale):
    # requant | conv 288 w @9 + folded BN bias 8 @9 | requant | fc 80 w + 10 b @9
    assert c.param_bits == 8 + (288 * 9 + 8 + 8 * 9 + 8) + 8 + (80 * 9 + 8 + 10 * 9 + 8)
    assert c.mults == 256 + 36 * 512 + 512 + 512 + 8 + 80
    assert c.adds == (35 * 512 + 512) + 63 * 8 + (7 * 10 + 10)
    flops = (
        256  # requant of the 32-bit input
        + 36 * 512 * 12 / 32 + (35 * 512 + 512)  # conv: mults at max(12-bit act, 9-bit w), 32-bit accumulation
        + 512  # requant of the 32-bit accumulator
        + 512 * 12 / 32  # relu of 12-bit values (its output stays 12-bit: it only compares)
        + 8 * 12 / 32 + 63 * 8 * 12 / 32  # GAP of 12-bit activations
        + 80 + 80  # fc reads the 32-bit pool output
    )
    assert c.flops == flops
    assert [l.bits for l in c.layers] == [32, 12, 32, 12, 12, 32]


def test_unknown_op_raises_with_its_name():
    with pytest.raises(MicronetError, match="counter does not know op erf"):
        count(Fn(lambda x: torch.erf(x)), (4, 8, 8))
    with pytest.raises(MicronetError, match="counter does not know op gelu"):
        count(nn.GELU(), (4, 8, 8))
    with pytest.raises(MicronetError, match="exp"):
        count(Fn(lambda x: x.exp()), (4, 8, 8))
    with pytest.raises(MicronetError, match="div"):
        count(Fn(lambda x: x / (x.relu() + 1)), (4, 8, 8))


def test_softmax_is_free_only_on_the_logits():
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    logits = count(head, (4, 2, 2))
    assert totals(count(Fn(lambda x, h: F.softmax(h(x), 1), head), (4, 2, 2))) == totals(logits)
    with pytest.raises(MicronetError, match="softmax"):
        count(Fn(lambda x, h: h(F.softmax(x, 1)), head), (4, 2, 2))


def test_training_mode_and_threads_are_restored():
    model = ModuleNet().train()
    model.bn2.eval()
    torch.set_num_threads(2)
    try:
        count(model, (3, 8, 8))
        assert torch.get_num_threads() == 2  # the counter's single-thread pass restores the setting
    finally:
        torch.set_num_threads(1)
    assert model.training and model.bn1.training and not model.bn2.training


def test_table_and_dict():
    c = count(ModuleNet(), (3, 16, 16))
    text = c.table()
    for word in ("name", "kind", "in shape", "out shape", "sparsity", "weight bits", "act bits", "bits", "param bits",
                 "mults", "adds", "conv1+bn1", "params", "flops", "score"):
        assert word in text
    assert f"{c.mults:,.0f}" in text
    assert f"score       {c.score('imagenet'):.6f}  (imagenet)" in c.table(tasks=["imagenet"])
    assert "(cifar100)" not in c.table(tasks=["imagenet"])  # the score stage's table: its own track only
    d = c.to_dict()
    assert set(d) == {"param_bits", "params", "mults", "adds", "flops", "quantized", "freebie"}
    assert d["params"] == d["param_bits"] / 32


def test_accuracy_gate():
    c = count(nn.Identity(), (1, 1, 1))
    assert c.qualifies("cifar100", 8000, 10000)
    assert not c.qualifies("cifar100", 7999, 10000)
    assert c.qualifies("imagenet", 37500, 50000)
    assert not c.qualifies("imagenet", 37499, 50000)
    assert c.qualifies("cifar100", 4000, 5000) and not c.qualifies("cifar100", 3999, 5000)
    with pytest.raises(MicronetError):
        c.qualifies("cifar100", 1, 0)


# ---------------------------------------------------------------------------------------------
# PyramidNet-272 alpha 200 and the CLI


@pytest.fixture(scope="module")
def pyramidnet():
    torch.manual_seed(0)
    return dense(create_model("pyramidnet272"))


def test_pyramidnet272(pyramidnet):
    full, half = count(pyramidnet, (3, 32, 32)), count(pyramidnet, (3, 32, 32), freebie=True)
    total = sum(p.numel() for p in pyramidnet.parameters())
    assert total == 26_288_692
    # Folding replaces gamma+beta by one bias per channel: the stem BN and bn2/bn3/bn4 of every block.
    folded = [m.num_features for n, m in pyramidnet.named_modules()
              if isinstance(m, nn.BatchNorm2d) and (n == "bn1" or n.rsplit(".", 1)[-1] in ("bn2", "bn3", "bn4"))]
    assert len(folded) == 1 + 3 * 90
    assert full.param_bits == 32 * (total - sum(folded))
    assert half.param_bits == full.param_bits / 2
    assert (half.mults, half.adds) == (full.mults, full.adds)
    assert full.flops == full.mults + full.adds and half.flops == full.mults / 2 + full.adds

    # conv mults are the plain MAC count, taken independently with forward hooks
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.weight[0].numel()))
             for m in pyramidnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        pyramidnet.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sum(l.mults for l in full.layers if l.kind in ("conv", "linear")) == sum(macs)
    kinds = [l.kind for l in full.layers]
    assert kinds.count("conv") == 271 and kinds.count("bn") == 91 and kinds.count("add") == 90
    assert kinds.count("scale") == 90 and kinds.count("avgpool") == 2 and kinds.count("gap") == 1
    assert 0.9 < full.score("cifar100") < 1.6
    pairs = foldable_batchnorms(pyramidnet, (3, 32, 32))
    assert len(pairs) == 271 and pairs[:2] == [("conv1", "bn1"), ("layer1.0.conv1", "layer1.0.bn2")]


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(count_command)
    return app


def test_cli_counts_registered_architecture():
    result = CliRunner().invoke(cli(), ["--arch", "pyramidnet272", "--freebie"])
    assert result.exit_code == 0, result.output
    assert "layer3.29.conv3+bn4" in result.output
    assert "cifar100" in result.output and "imagenet" in result.output
    assert "freebie" in result.output
    # the untrained init is counted dense: exactly the figures of the counter on the fixture's model
    assert "param bits  419,606,976" in result.output


@pytest.mark.parametrize("bad", ["3,32", "3,32,x", "3,0,32", "3,32,32,1"])
def test_cli_rejects_bad_input(bad):
    result = CliRunner().invoke(cli(), ["--arch", "pyramidnet272", "--input", bad])
    assert result.exit_code == 2
    assert "input" in result.output.lower()
