"""fastai WRN-22-6 and KAIST MicroNet ver1/ver2: exact sizes from the submissions' own tables
(docs/submissions.md §4 and §6), their forward semantics, and the official counter on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.importers import randomize_bn
from micronet.errors import MicronetError
from micronet.nets import create_model, list_models, validate_args
from micronet.scoring import count


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(model: nn.Module) -> nn.Module:
    """A random init can draw an exact 0.0, which the counter would treat as sparsity."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p[p == 0] = 1e-3
    return model


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_weights(module: nn.Module) -> int:
    """Parameters of dimension >= 2 (what KAIST's tables and masks cover)."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def test_families_registered():
    assert {"fastai_wrn22_6", "kaist_micronet_v1", "kaist_micronet_v2"} <= set(list_models())


# ---------------------------------------------------------------------------------------------
# fastai WRN-22-6


@pytest.fixture(scope="module")
def wrn() -> nn.Module:
    torch.manual_seed(0)
    return dense(create_model("fastai_wrn22_6", num_classes=100)).eval()


def test_wrn_parameters_match_fastai_table(wrn):
    assert n_params(wrn) == 9_693_108
    f = wrn.features
    assert n_params(f[0]) == 432  # stem conv, no BN/ReLU of its own
    # g1 block 1: shortcut 1x1, conv1, bn, conv2 (its input BN is bn16 = 32)
    assert [n_params(m) for m in (f[1].bn, f[1].shortcut, f[1].conv1, f[1].conv2[0], f[1].conv2[2])] == [
        32, 1_536, 13_824, 192, 82_944]
    assert n_params(f[2].shortcut) == 0  # 96 -> 96: identity
    # g2 block 1: bn96, shortcut, conv1 stride 2, bn, conv2
    assert [n_params(m) for m in (f[4].bn, f[4].shortcut, f[4].conv1, f[4].conv2[0], f[4].conv2[2])] == [
        192, 18_432, 165_888, 384, 331_776]
    assert f[4].conv1.stride == (2, 2) and f[4].shortcut.stride == (2, 2)
    # g3 block 1, then blocks 2-3 at 2 x (768 + 1,327,104) each
    assert [n_params(m) for m in (f[7].bn, f[7].shortcut, f[7].conv1, f[7].conv2[0], f[7].conv2[2])] == [
        384, 73_728, 663_552, 768, 1_327_104]
    assert n_params(f[8]) == n_params(f[9]) == 2 * (768 + 1_327_104)
    assert n_params(f[10]) == 768 and n_params(f[14]) == 38_500  # head BN, Linear(384, 100) with bias
    assert all(m.bias is None for m in wrn.modules() if isinstance(m, nn.Conv2d))


def test_wrn_block_scales_branch_and_shortcuts_preactivated_input():
    wrn = randomize_bn(create_model("fastai_wrn22_6")).eval()
    x = torch.randn(2, 96, 8, 8)
    for block in (wrn.features[2], wrn.features[4]):  # identity shortcut; 1x1 stride-2 shortcut
        with torch.no_grad():
            pre = F.relu(block.bn(x))
            expected = 0.2 * block.conv2(block.conv1(pre)) + block.shortcut(pre)
            assert torch.allclose(block(x.clone()), expected, atol=1e-6)


def test_wrn_official_count(wrn):
    c = count(wrn, (3, 32, 32), freebie=True)
    convs = [l for l in c.layers if l.kind == "conv"]
    assert len(convs) == 22
    assert sum(l.mults for l in convs) == 1_384_562_688
    # fastai's vector is for bias-free convs; the 10 a BN folds into (stem, each conv1) add one per output
    folded = [l for l in convs if "+" in l.name]
    assert sorted(l.name for l in folded) == sorted(["features.0+bn"] + [f"features.{i}.conv1+0" for i in range(1, 10)])
    assert sum(l.adds for l in convs) == 1_383_342_080 + sum(math.prod(l.output_shape) for l in folded)
    kinds = {}
    for l in c.layers:
        kinds.setdefault(l.kind, []).append(l)
    # 9 functional pre-activation ReLUs + 9 in conv2 + the head's; 9 x0.2 scalings and residual adds;
    # the 8 pre-activation BNs of blocks 2-9 and the head BN cannot fold (block 1's folds into the stem)
    assert len(kinds["relu"]) == 19 and sum(l.mults for l in kinds["relu"]) == 1_048_576
    assert len(kinds["scale"]) == 9 and sum(l.mults for l in kinds["scale"]) == 516_096
    assert len(kinds["add"]) == 9 and sum(l.adds for l in kinds["add"]) == 516_096
    assert len(kinds["bn"]) == 9
    # 16-bit storage: every parameter but the 2,032 BN values the 10 folds turn into conv biases
    assert c.param_bits == 16 * (9_693_108 - 2_032)


# ---------------------------------------------------------------------------------------------
# KAIST MicroNet


@pytest.fixture(scope="module")
def micronet_v1() -> nn.Module:
    torch.manual_seed(0)
    return dense(create_model("kaist_micronet_v1", num_classes=100)).eval()


def test_micronet_dense_weights():
    assert n_weights(create_model("kaist_micronet_v1")) == 450_456
    assert n_weights(create_model("kaist_micronet_v2")) == 471_184
    # their notebook's pruned counts: 40 % of the weights kept, halved by the freebie
    assert 450_456 * 0.4 / 2 == pytest.approx(90_091, abs=0.5)


def test_micronet_v1_block_table(micronet_v1):
    m = micronet_v1
    assert n_weights(m.conv1) == 864 and n_weights(m.linear) == 10_600
    blocks = list(m.layers)
    assert len(blocks) == 16
    table = {1: 6_112, 2: 2_096, 3: 3_248, 4: 7_520, 5: 11_232, 6: 16_272, 8: 21_168, 9: 35_640, 13: 37_976,
             14: 53_392, 15: 52_712, 16: 68_432}
    assert {i: n_weights(blocks[i - 1]) for i in table} == table
    assert [b.conv1.out_channels for b in blocks] == [96, 48, 48, 96, 96, 144, 144, 144, 216, 216, 216, 216,
                                                      216, 240, 264, 264]
    shortcuts = ["conv" if isinstance(b.shortcut, nn.Sequential) else "none" if b.shortcut is None else "id"
                 for b in blocks]
    assert [i + 1 for i, s in enumerate(shortcuts) if s == "conv"] == [1, 5, 14, 16]
    assert [i + 1 for i, s in enumerate(shortcuts) if s == "none"] == [3, 8, 13]
    assert (blocks[0].fc1.out_channels, blocks[15].fc1.out_channels) == (4, 26)
    assert all(isinstance(b.fc1, nn.Conv2d) and b.fc1.bias is not None for b in blocks)  # SE kept everywhere


def test_micronet_v2_widths():
    blocks = list(create_model("kaist_micronet_v2").layers)
    assert [b.conv1.out_channels for b in blocks] == [80, 50, 50, 90, 90, 140, 140, 140] + [200] * 5 + [
        220, 240, 240]


def test_micronet_init_and_bn_momentum():
    m = create_model("kaist_micronet_v1")
    assert all(b.momentum == 0.01 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert all(c.bias is None or not c.bias.any() for c in m.modules() if isinstance(c, nn.Conv2d))
    assert not m.linear.bias.any()
    big = m.layers[15].conv1  # 88 -> 264, 23,232 draws: N(0, sqrt(2 / (1 * 1 * 264)))
    assert big.weight.std().item() == pytest.approx(math.sqrt(2 / 264), rel=0.05)
    dw = m.layers[15].conv2  # depthwise: fan is 3 * 3 * 264
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 264)), rel=0.1)
    assert m.linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    # a toy run of ~100 steps raises it (toy.yaml), or its running statistics stay near the init's 0 / 1
    toy = create_model("kaist_micronet_v2", bn_momentum=0.1)
    assert {b.momentum for b in toy.modules() if isinstance(b, nn.BatchNorm2d)} == {0.1}
    with pytest.raises(MicronetError, match="bn_momentum"):
        validate_args("kaist_micronet_v1", {"bn_momentum": 0})


def _hswish(x: torch.Tensor) -> torch.Tensor:
    return x * F.relu6(x + 3.0) / 6.0


def kaist_reference_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Their forward, from the description: HSwish as x*relu6(x+3)/6, and on stride-2 blocks the SE gate
    computed and then thrown away by `out * w + shortcut(x) if stride == 1 else out`."""
    out = _hswish(m.bn1(m.conv1(x)))
    for b in m.layers:
        inp = out
        out = _hswish(b.bn1(b.conv1(inp)))
        out = _hswish(b.bn2(b.conv2(out)))
        out = b.bn3(b.conv3(out))
        w = torch.sigmoid(b.fc2(_hswish(b.fc1(F.adaptive_avg_pool2d(out, 1)))))
        out = out * w + b.shortcut(inp) if b.stride == 1 else out
    return m.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("arch", ["kaist_micronet_v1", "kaist_micronet_v2"])
def test_micronet_forward_matches_their_definition(arch):
    m = randomize_bn(create_model(arch)).eval()
    with torch.no_grad():
        for b in m.layers:  # SE biases are zero at init: give them values so the check sees them
            b.fc1.bias.uniform_(-0.5, 0.5)
            b.fc2.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, 32, 32)
        ours, ref = m(x), kaist_reference_forward(m, x)
    assert ours.shape == (2, 100)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_micronet_stride2_blocks_skip_se(micronet_v1):
    called = []
    handles = [b.fc1.register_forward_hook(lambda *a, i=i: called.append(i)) for i, b in enumerate(micronet_v1.layers)]
    try:
        with torch.no_grad():
            micronet_v1(torch.randn(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert sorted(called) == [i for i in range(16) if i not in (2, 7, 12)]


def test_micronet_v1_official_count(micronet_v1):
    c = count(micronet_v1, (3, 32, 32), freebie=True)
    kinds = {}
    for l in c.layers:
        kinds.setdefault(l.kind, []).append(l)
    # every op known; every BN folds into the conv that feeds it; dropout is free at inference
    assert set(kinds) == {"conv", "linear", "hardswish", "gap", "sigmoid", "scale", "add"}
    assert len(kinds["conv"]) == 1 + 16 * 3 + 4 + 13 * 2  # stem, 3 per block, 4 shortcuts, SE on 13 blocks
    assert len(kinds["hardswish"]) == 1 + 16 * 2 + 13
    macs = sum(l.mults for l in kinds["conv"] + kinds["linear"])
    assert macs == 37_331_888
    # §6's 37.34M also counts the SE 1x1 convs of the 3 stride-2 blocks, which their forward runs and discards
    discarded_se = 2 * (32 * 8 + 72 * 18 + 80 * 20)
    assert round((macs + discarded_se) / 1e6, 2) == 37.34
    # dense, 16-bit: weights + SE biases + one folded bias per BN + linear bias; no stride-2 SE storage
    stride2_se = sum(n_params(b.fc1) + n_params(b.fc2) for b in micronet_v1.layers if b.stride == 2)
    bn_channels = sum(b.num_features for b in micronet_v1.modules() if isinstance(b, nn.BatchNorm2d))
    assert c.param_bits == 16 * (n_params(micronet_v1) - stride2_se - bn_channels)


def test_micronet_v2_official_count():
    m = dense(create_model("kaist_micronet_v2")).eval()
    c = count(m, (3, 32, 32))
    macs = sum(l.mults for l in c.layers if l.kind in ("conv", "linear"))
    discarded_se = 2 * (36 * 9 + 80 * 20 + 88 * 22)
    assert round((macs + discarded_se) / 1e6, 2) == 39.48


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_shakedrop_gates_the_whole_batch_as_wave_and_scales_each_image(p):
    """Wave's ShakeDrop (mhariat/MicroNet@611cfb1 Pruning/models/shakedrop.py L14-L21): one Bernoulli gate per
    batch; a dropped batch has every image scaled by its own alpha in [-1, 1]."""
    from micronet.nets.pyramidnet import ShakeDrop

    torch.manual_seed(0)
    block = ShakeDrop(p).train()
    x = torch.ones(16, 3, 2, 2)
    untouched = dropped = 0
    for _ in range(60):
        y = block(x)
        if torch.equal(y, x):
            untouched += 1
            continue
        dropped += 1
        per_image = y.flatten(1)
        assert torch.equal(per_image, per_image[:, :1].expand_as(per_image))  # one alpha per image
        assert per_image.abs().max() <= 1 and len(per_image[:, 0].unique()) > 1  # ... and alphas differ
        assert not (per_image[:, 0] == 1).any()  # no image of a dropped batch kept its gate
    assert untouched and dropped
    x = torch.ones(8, 3, requires_grad=True)
    block(x).sum().backward()
    assert x.grad.shape == x.shape and (x.grad <= 1).all() and (x.grad >= 0).all()
    assert torch.equal(block.eval()(x), x * (1 - p))


def test_shakedrop_per_image_gate_is_an_option():
    from micronet.nets.pyramidnet import ShakeDrop

    torch.manual_seed(0)
    y = ShakeDrop(0.5, gate="image").train()(torch.ones(256, 1))
    kept = (y == 1).float().mean().item()
    assert 0.3 < kept < 0.7  # some images kept, some scaled, in the same batch
    model = create_model("pyramidnet", depth=11, alpha=4, num_classes=10, shakedrop_gate="image")
    assert {m.gate for m in model.modules() if hasattr(m, "gate")} == {"image"}
    assert {m.gate for m in create_model("pyramidnet", depth=11, alpha=4).modules() if hasattr(m, "gate")} == \
        {"batch"}
    with pytest.raises(ValueError):
        ShakeDrop(0.5, gate="channel")
