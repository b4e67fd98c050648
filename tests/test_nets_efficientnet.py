"""UCI's 32x32 EfficientNets against the submission's figures (docs/submissions.md section 5)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.nets import builder, create_model
from micronet.nets.efficientnet import ConvBNSwish, CosineClassifier, MBConv, round_filters, round_repeats
from micronet.scoring import count

pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = ("efficientnet_b3_cifar", "efficientnet_b0_cifar", "efficientnet_ex", "efficientnet_exx")


@pytest.fixture(scope="module")
def ex() -> nn.Module:
    torch.manual_seed(0)
    return create_model("efficientnet_ex").eval()


@pytest.fixture(scope="module")
def exx() -> nn.Module:
    torch.manual_seed(0)
    return create_model("efficientnet_exx").eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_rounding_rules():
    # multiples of 8, never below 90 % of the scaled width; width 1.0 is untouched
    assert [round_filters(c, 0.8) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == [
        24, 16, 24, 32, 64, 88, 152, 256, 1024]
    assert [round_filters(c, 1.2) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == [
        40, 24, 32, 48, 96, 136, 232, 384, 1536]
    assert round_filters(20, 0.5) == 16 and round_filters(12, 0.5) == 8 and round_filters(37, 1.0) == 37
    assert [round_repeats(n, 0.8) for n in (1, 2, 2, 3, 3, 4, 1)] == [1, 2, 2, 3, 3, 4, 1]
    assert [round_repeats(n, 0.7) for n in (1, 2, 2, 3, 3, 4, 1)] == [1, 2, 2, 3, 3, 3, 1]
    assert [round_repeats(n, 1.4) for n in (1, 2, 2, 3, 3, 4, 1)] == [2, 3, 3, 5, 5, 6, 2]


def test_parameter_counts_match_the_submission(ex, exx):
    assert n_params(ex) == 2_793_064
    assert n_params(exx) == 2_418_650
    assert (len(ex.blocks), len(exx.blocks)) == (16, 15)
    # the teachers (no published count: this build's own figures, 26 and 16 blocks)
    assert n_params(create_model("efficientnet_b0_cifar")) == 4_285_556
    b3 = create_model("efficientnet_b3_cifar")
    assert n_params(b3) == 11_027_240 and len(b3.blocks) == 26


def block_rows(model: nn.Module) -> list[tuple]:
    """(in, hidden, out, k, stride, SE width, out HW, residual, params) per MBConv, from one 32x32 pass."""
    sizes: dict[int, int] = {}

    def remember(k: int):
        def hook(m, inputs, out):
            sizes[k] = out.shape[-1]  # a hook that returns a value would replace the output
        return hook

    hooks = [b.register_forward_hook(remember(k)) for k, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    rows = []
    for k, b in enumerate(model.blocks):
        depthwise, se, project = b.block[-4][1], b.block[-3], b.block[-2]
        rows.append((b.block[0][1].in_channels, depthwise.in_channels, project.out_channels,
                     depthwise.kernel_size[0], depthwise.stride[0], se.fc1.out_channels, sizes[k], b.use_residual,
                     n_params(b)))
    return rows


def test_layer_table(ex, exx):
    rows = block_rows(ex)
    assert n_params(ex.stem) == 696 and ex.stem[1].stride == (1, 1)
    assert rows[0] == (24, 24, 16, 3, 1, 6, 32, False, 1_014)
    assert rows[2] == (24, 144, 24, 3, 1, 6, 32, True, 10_734)
    assert rows[3] == (24, 144, 32, 5, 2, 6, 16, False, 14_214)
    assert rows[6] == rows[7] == (64, 384, 64, 3, 1, 16, 16, True, 67_024)
    assert rows[8] == (64, 384, 88, 5, 1, 16, 16, False, 82_456)
    assert rows[11] == (88, 528, 152, 5, 2, 22, 8, False, 166_270)
    assert rows[12] == rows[14] == (152, 912, 152, 5, 1, 38, 8, True, 374_414)
    assert rows[15] == (152, 912, 256, 3, 1, 38, 8, False, 454_982)
    assert [r[6] for r in rows] == [32] * 3 + [16] * 8 + [8] * 5
    assert n_params(ex.head) == 264_192
    assert n_params(ex.embedding) == 205_000 and n_params(ex.classifier) == 20_000
    # exx: one 152-channel residual block fewer
    assert block_rows(exx) == rows[:14] + rows[15:]


def test_explicit_same_padding(ex):
    pads = {(c[1].kernel_size[0], c[1].stride[0]): c[0].padding for c in ex.modules() if isinstance(c, ConvBNSwish)}
    # stride-2 5x5 pads 1 before and 2 after (TensorFlow "same"), which symmetric Conv2d padding can't
    assert pads == {(3, 1): (1, 1, 1, 1), (1, 1): (0, 0, 0, 0), (5, 1): (2, 2, 2, 2), (5, 2): (1, 2, 1, 2)}
    assert all(m.padding == (0, 0) for m in ex.modules() if isinstance(m, nn.Conv2d))


def test_norms_activations_and_biases(ex):
    bns = [m for m in ex.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 15 * 3 + 2 + 1  # stem, blocks (block 1 has no expansion), head
    assert all(m.eps == 1e-5 and m.momentum == 0.01 for m in bns)
    kinds = {type(m) for m in ex.modules() if not list(m.children())}
    assert nn.ReLU not in kinds and nn.SiLU in kinds  # Swish everywhere, the stem included
    for b in ex.blocks:
        assert b.block[-2].bias is not None  # projection conv keeps its bias before BN
        assert b.block[-3].fc1.bias is not None and b.block[-3].fc2.bias is not None
        assert isinstance(b.block[-3].activation, nn.SiLU) and isinstance(b.block[-3].scale_activation, nn.Sigmoid)
    assert all(c[1].bias is None for c in ex.modules() if isinstance(c, ConvBNSwish))


def test_init():
    torch.manual_seed(0)
    model = create_model("efficientnet_ex")
    head = model.head[1].weight  # 1x1, 1024 out: normal(0, sqrt(2 / 1024))
    assert abs(head.std().item() / math.sqrt(2 / 1024) - 1) < 0.02
    depthwise = model.blocks[15].block[1][1].weight  # fan-out counts all 912 channels: sqrt(2 / (9 * 912))
    assert abs(depthwise.std().item() / math.sqrt(2 / (9 * 912)) - 1) < 0.05
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and m.bias is not None)
    bound = 1 / math.sqrt(200)  # linear: U(+-1/sqrt(out_features))
    assert 0.99 * bound < model.embedding.weight.abs().max().item() <= bound
    assert torch.allclose(model.classifier.weight.norm(dim=0), torch.ones(100))


def test_cosine_output_batch_one(ex):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = ex(x)
        emb = ex.embedding(torch.flatten(ex.pool(ex.head(ex.blocks(ex.stem(x)))), 1))
    assert out.shape == (1, 100)
    w = ex.classifier.weight
    expected = (emb / emb.norm()) @ (w / w.norm(dim=0, keepdim=True))
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1.0
    # scale-free in the embedding: cos theta only
    with torch.no_grad():
        assert torch.allclose(ex.classifier(3.0 * emb), out, atol=1e-6)


def test_cosine_classifier_clamps_and_has_no_bias():
    clf = CosineClassifier(4, 3)
    assert [n for n, _ in clf.named_parameters()] == ["weight"]
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]))
    out = clf(torch.tensor([[5.0, 0, 0, 0], [0, -1, 1, 0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0, 0], [0, -1 / math.sqrt(2), 1 / math.sqrt(2)]]))


def test_drop_connect_training_only():
    for name in ("efficientnet_b0_cifar", "efficientnet_b3_cifar"):
        rates = [b.drop_connect.p for b in create_model(name).blocks if b.use_residual]
        assert len(rates) > 8 and set(rates) == {0.2}
    assert all(b.drop_connect is None or b.drop_connect.p == 0.0 for b in create_model("efficientnet_ex").blocks)
    torch.manual_seed(0)
    block = MBConv(8, 8, 6, 3, 1, drop_connect=0.5)
    assert MBConv(8, 16, 6, 3, 1, drop_connect=0.5).drop_connect is None  # no residual, nothing to drop
    x = torch.randn(64, 8, 4, 4)
    block.train()
    branch = block.block(x)  # train-mode BN: batch statistics, same batch -> same branch
    delta = block(x) - x
    kept = delta.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 64  # whole samples are dropped, not elements
    assert torch.allclose(delta[kept], branch[kept] / 0.5, atol=1e-5)
    block.eval()
    assert torch.equal(block(x), x + block.block(x))


def test_builders_and_training_step():
    for name in NAMES:
        assert {"num_classes", "drop_connect", "dropout"} <= set(inspect.signature(builder(name)).parameters)
    torch.manual_seed(0)
    model = create_model("efficientnet_ex", num_classes=10, dropout=0.2).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    F.cross_entropy(5.0 * out, torch.tensor([1, 2])).backward()  # the loss scales cos theta by s
    assert model.classifier.weight.grad.abs().sum() > 0 and model.stem[1].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Counting


def torchscope_madds(model: nn.Module, mul_factor: float) -> float:
    """The submission's counter (section 5 table), per example: every BN unfolded, SE multiply and residual
    adds uncounted, pools k^2 per output, linear without its bias add, L2norm quadratic."""
    total = 0.0

    def hook(m, inputs, out):
        nonlocal total
        x = inputs[0]
        n_out = out[0].numel()
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * x.shape[1] // m.groups
            total += mul_factor * k * n_out + (k - 1 + (m.bias is not None)) * n_out
        elif isinstance(m, nn.BatchNorm2d):
            total += (2 * mul_factor + 2) * n_out
        elif isinstance(m, nn.SiLU):
            total += (3 * mul_factor + 1) * n_out
        elif isinstance(m, nn.Sigmoid):
            total += (2 * mul_factor + 1) * n_out
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            total += x[0].numel()
        elif isinstance(m, nn.Linear):
            total += out.shape[1] * (mul_factor * x.shape[1] + x.shape[1] - 1)
        elif isinstance(m, CosineClassifier):
            d, c = x.shape[1], out.shape[1]
            total += d * (d - 1 + mul_factor * d + 1) + (mul_factor * d + d - 1) * c

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return total


def test_submissions_own_counter_is_reproduced(ex, exx):
    # op for op the same network the submission counted: its exact published totals
    assert torchscope_madds(ex, 0.5) == 382_885_052 and torchscope_madds(ex, 1.0) == 512_835_116
    assert torchscope_madds(exx, 0.5) == 353_361_693 and torchscope_madds(exx, 1.0) == 473_373_028


def folded_bn_saving(model: nn.Module) -> int:
    """gamma + beta of every BN, less one bias per channel where the conv had none (all but projections)."""
    saving = 0
    for m in model.modules():
        if isinstance(m, ConvBNSwish):
            saving += m[2].num_features
        elif isinstance(m, MBConv):
            saving += 2 * m.block[-1].num_features
    return saving


def test_official_count(ex, exx):
    c = count(ex, (3, 32, 32), freebie=True)
    assert folded_bn_saving(ex) == 18_272
    assert c.param_bits == 16 * (2_793_064 - 18_272)
    assert (c.mults, c.adds, c.flops) == (255_091_970, 249_765_523, 377_311_508)
    kinds = [l.kind for l in c.layers]
    assert "bn" not in kinds  # every BN folds
    assert kinds.count("add") == sum(b.use_residual for b in ex.blocks) == 9
    assert kinds.count("scale") == kinds.count("sigmoid") == 16  # the SE multiply is counted
    assert kinds[-5:] == ["norm", "clamp", "div", "linear", "clamp"]
    assert round(c.score("cifar100"), 6) == 0.07398

    c = count(exx, (3, 32, 32), freebie=True)
    assert c.param_bits == 16 * (2_418_650 - folded_bn_saving(exx))
    assert (c.mults, c.adds, c.flops) == (235_408_160, 230_308_269, 348_012_349)


def test_teachers_count():
    torch.manual_seed(0)
    b0 = create_model("efficientnet_b0_cifar")
    c = count(b0, (3, 32, 32), freebie=True)
    assert c.param_bits == 16 * (n_params(b0) - folded_bn_saving(b0))
    assert (c.mults, c.adds) == (385_119_470, 378_742_015)
    torch.manual_seed(0)
    b3 = create_model("efficientnet_b3_cifar")
    c = count(b3, (3, 32, 32))
    assert c.param_bits == 32 * (n_params(b3) - folded_bn_saving(b3))
    assert (c.mults, c.adds) == (978_501_130, 965_497_331)
