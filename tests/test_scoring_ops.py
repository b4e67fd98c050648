"""Counter costs of the ops a cosine-classifier head needs (2-norm, F.normalize, division by a broadcast
activation), by hand. A 2-norm of R elements: R squares + 1 sqrt (mults), R - 1 adds."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.errors import MicronetError
from micronet.nets.efficientnet import CosineClassifier
from micronet.scoring import count

from counting import Fn, totals


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "norm",
    [
        lambda x: x.norm(dim=1, keepdim=True),
        lambda x: torch.norm(x, 2, 1, True),
        lambda x: torch.linalg.vector_norm(x, 2, dim=1),
        lambda x: x.norm(p=2.0, dim=1),
    ],
)
def test_vector_norm_of_a_vector(norm):
    # one norm of 6: 6 squares + 1 sqrt, 5 adds
    c = count(Fn(norm), (6,))
    assert totals(c) == (0, 7, 5)
    assert [l.kind for l in c.layers] == ["norm"]


def test_vector_norm_over_spatial_dims():
    # 4 norms (one per channel) of 8x8 = 64 elements each
    c = count(Fn(lambda x: torch.linalg.vector_norm(x, dim=(2, 3))), (4, 8, 8))
    assert totals(c) == (0, 4 * 65, 4 * 63)
    # no dim: one norm of all 256 elements
    assert totals(count(Fn(lambda x: x.norm()), (4, 8, 8))) == (0, 257, 255)


def test_other_norms_are_refused():
    with pytest.raises(MicronetError, match="p=1"):
        count(Fn(lambda x: x.norm(p=1, dim=1)), (6,))
    with pytest.raises(MicronetError, match="normalize with p=1"):
        count(Fn(lambda x: F.normalize(x, p=1.0, dim=1)), (6,))


def test_normalize_a_vector():
    # norm 6 + 1 mults / 5 adds, clamp_min(eps) 1 comparison, 6 divisions
    c = count(Fn(lambda x: F.normalize(x, dim=1)), (6,))
    assert totals(c) == (0, 7 + 1 + 6, 5)
    assert [l.kind for l in c.layers] == ["norm", "clamp", "div"]
    assert [l.output_shape for l in c.layers] == [(1, 1), (1, 1), (1, 6)]


def test_normalize_channels_of_a_feature_map():
    # dim=1 of 4x8x8: 64 vectors of 4 elements
    c = count(Fn(lambda x: F.normalize(x, dim=1)), (4, 8, 8))
    assert totals(c) == (0, 64 * 5 + 64 + 256, 64 * 3)
    assert c.layers[0].output_shape == (1, 1, 8, 8)
    # dim=(2, 3): 4 vectors of 64 elements
    c = count(Fn(lambda x: F.normalize(x, dim=(2, 3))), (4, 8, 8))
    assert totals(c) == (0, 4 * 65 + 4 + 256, 4 * 63)


def test_normalize_counts_like_its_own_code_and_like_ucis():
    fused = count(Fn(lambda x: F.normalize(x, dim=1)), (6, 3, 3))
    # torch's code: the divisor is the clamped norm expanded (a stride-0 view) to the input's shape
    torch_code = count(Fn(lambda x: x / x.norm(2, 1, True).clamp_min(1e-12).expand_as(x)), (6, 3, 3))
    assert totals(fused) == totals(torch_code) and fused.flops == torch_code.flops
    # the submission's L2norm divides by the bare norm: one comparison per vector (9 vectors) less
    uci = count(Fn(lambda x: torch.div(x, torch.norm(x, 2, 1, True))), (6, 3, 3))
    assert uci.mults == fused.mults - 9 and uci.adds == fused.adds


def test_division_by_a_broadcast_activation():
    # per-channel mean (gap: 4 mults, 4*63 adds), then one division per element
    c = count(Fn(lambda x: x / x.mean((2, 3), keepdim=True)), (4, 8, 8))
    assert totals(c) == (0, 4 + 256, 4 * 63)
    assert [l.kind for l in c.layers] == ["gap", "div"]
    c = count(Fn(lambda x: torch.div(x, x.norm())), (4, 8, 8))
    assert totals(c) == (0, 257 + 256, 255)
    # a full-shape divisor stays refused, expanded or not
    with pytest.raises(MicronetError, match="div by an activation with one value per element"):
        count(Fn(lambda x: x / x.relu().add(1).contiguous()), (4, 8, 8))


def test_static_normalization_is_constant_folded():
    # the weight's normalization is free; the normalized weight is stored once, dense
    lin = nn.Linear(6, 3, bias=False)
    c = count(Fn(lambda x, m: F.linear(x, F.normalize(m.weight, dim=1)), lin), (6,))
    assert totals(c) == (18 * 32, 18, 15)
    assert [l.kind for l in c.layers] == ["linear"]


def test_cosine_classifier():
    torch.manual_seed(0)
    c = count(CosineClassifier(200, 100), (200,))
    assert [l.kind for l in c.layers] == ["norm", "clamp", "div", "linear", "clamp"]
    # normalize 200: 201 + 1 + 200 mults, 199 adds | cos: 200x100 mults, 199x100 adds | clamp(-1, 1): 2 per class
    assert totals(c) == (20_000 * 32, 402 + 20_000 + 200, 199 + 19_900)
    half = count(CosineClassifier(200, 100), (200,), freebie=True)
    assert half.param_bits == 20_000 * 16
    assert half.flops == (402 + 20_000 + 200) / 2 + 199 + 19_900


class ActQuant(nn.Module):
    """Power-of-two fake quantizer (activation_bits): the counter charges it as one requant op."""

    activation_bits = 12

    def forward(self, x):
        return torch.round(x * 64.0) / 64.0


def test_quantized_normalize_bits():
    # requant 6 (at the 32-bit input) | norm at 12 bits | clamp and division read the 32-bit norm
    c = count(nn.Sequential(ActQuant(), Fn(lambda x: F.normalize(x, dim=1))), (6,))
    assert c.quantized
    assert [l.kind for l in c.layers] == ["requant", "norm", "clamp", "div"]
    assert [l.bits for l in c.layers] == [32, 12, 32, 32]
    assert c.flops == 6 + (7 + 5) * 12 / 32 + 1 + 6
    decomposed = count(nn.Sequential(ActQuant(), Fn(lambda x: x / x.norm(2, 1, True).clamp_min(1e-12))), (6,))
    assert totals(decomposed) == totals(c) and decomposed.flops == c.flops


def test_quantized_division_takes_the_wider_input():
    # 12-bit x divided by a 12-bit (requantized) per-channel mean: the division runs at 12 bits
    q1, q2 = ActQuant(), ActQuant()
    narrow = count(Fn(lambda x, a, b: a(x) / b(a(x).mean((2, 3), keepdim=True)), q1, q2), (4, 2, 2))
    div = [l for l in narrow.layers if l.kind == "div"]
    assert len(div) == 1 and div[0].bits == 12 and div[0].mults == 16
    # by the mean itself (a 32-bit accumulator): 32 bits
    wide = count(Fn(lambda x, a: a(x) / a(x).mean((2, 3), keepdim=True), q1), (4, 2, 2))
    assert [l.bits for l in wide.layers if l.kind == "div"] == [32]
