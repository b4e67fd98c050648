"""Fixed-point quantization with power-of-two scales, as the Wave submission did: fold BatchNorm where it can be,
round every weight tensor in place to its layer's bits (`weight_bits`, or a `layer_bits` pattern's) with one shared
exponent per tensor (Wave) or one per output channel, and insert activation quantizers calibrated on the
validation split.

A value x in b bits with exponent e is stored as the integer round(clamp(x * 2^e, -2^(b-1), 2^(b-1)-1));
the model keeps x_q = int / 2^e in float32, which represents it exactly, so evaluation is bit-true.
The counter reads `weight_bits` on modules, the `<param>_exponent` buffers beside the parameters (8 bits per
exponent) and `activation_bits` on quantizers.

Quantization-aware fine-tuning (`QuantizationAware`) trains the quantized model through the same rounding, with
the straight-through estimator. The rounding is torch's fake-quant kernel (`torch.fake_quantize_per_tensor_affine`
and `_per_channel_affine`, what torch.ao's FakeQuantize calls) at scale 2^-e, zero point 0: bit-equal to the formula
above, for every bit width up to 32. torch.ao's QAT flow and brevitas are not used around it: both swap modules for
their quantized versions and choose scales with their own observers (min/max, histogram; brevitas' power-of-two
option rounds the log-scale of a learnt or max-based range), neither has Wave's SigmaMax |mean| + k*std bound, and
both quantize at layer boundaries, not at every computed output as Wave's hooks do (the output of every leaf module
and of every block whose forward makes its own sum: residual sums, h-swish). A product made inside a forward that is
not a module's output (KAIST's SE gating `out * gate` before the residual sum) is not quantized: it stays a 32-bit
intermediate, and the counter charges it at 32 bits. The exponents stay the ones calibration chose (weights and
activations alike: frozen, not learnt)."""

from __future__ import annotations

import fnmatch
import itertools
import math
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from micronet.compression import replace_module
from micronet.errors import MicronetError

BatchNorm = nn.modules.batchnorm._BatchNorm
QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear, BatchNorm)
QUANTIZER_NAME = "act_quant"


def power_of_two_exponent(bound: float, bits: int) -> int:
    """Largest exponent e such that `bound` still fits in a signed `bits`-bit integer after scaling by 2^e."""
    if not math.isfinite(bound) or bound <= 0:
        return bits - 1
    return bits - 1 - math.ceil(math.log2(bound))


def power_of_two_exponents(bounds: torch.Tensor, bits: int) -> torch.Tensor:
    """power_of_two_exponent of each bound (int64, same shape), computed in float64 like the scalar one."""
    b = bounds.detach().double()
    usable = torch.isfinite(b) & (b > 0)
    e = bits - 1 - torch.ceil(torch.log2(torch.where(usable, b, torch.ones_like(b))))
    return torch.where(usable, e, torch.full_like(b, bits - 1)).to(torch.int64)


def quantize_tensor(x: torch.Tensor, bits: int, exponent: int | torch.Tensor) -> torch.Tensor:
    """x on the b-bit grid of step 2^-e (round half to even); the gradient is straight through inside the range
    and zero where x is clamped. `exponent`: an int, a 0-d tensor (no host sync: the kernel takes the scale as
    a tensor), or one exponent per output channel (dim 0)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not isinstance(exponent, torch.Tensor):
        return torch.fake_quantize_per_tensor_affine(x.float(), 2.0**-exponent, 0, low, high).to(x.dtype)
    scale = torch.exp2(-exponent.to(device=x.device, dtype=torch.float32))
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    if exponent.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, low, high).to(x.dtype)
    return torch.fake_quantize_per_channel_affine(x.float(), scale, zero, 0, low, high).to(x.dtype)


def _mean_std(x: torch.Tensor, dim: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (sample) std; a single value gets Wave's std = 1e-15 * |mean| (their `Quantization/` code), so
    its bound is the value itself and not NaN."""
    n = x.numel() if dim is None else x.shape[dim]
    mean = x.mean() if dim is None else x.mean(dim)
    if n == 1:
        return mean, 1e-15 * mean.abs()
    return mean, (x.std() if dim is None else x.std(dim))


def range_bound(x: torch.Tensor, method: str, sigmas: float) -> float:
    """SigmaMax bound |mean| + k*std (robust to outliers) or the plain max |x|."""
    x = x.detach().float()
    if method == "max":
        return float(x.abs().max())
    mean, std = _mean_std(x, None)
    return float(mean.abs() + sigmas * std)


def channel_bounds(w: torch.Tensor, method: str, sigmas: float) -> torch.Tensor:
    """range_bound of each output channel (dim 0) of a weight tensor."""
    rows = w.detach().float().flatten(1)
    if method == "max":
        return rows.abs().amax(1)
    mean, std = _mean_std(rows, 1)
    return mean.abs() + sigmas * std


def weight_exponent(p: torch.Tensor, bits: int, method: str, sigmas: float, per_channel: bool) -> torch.Tensor:
    """The exponent(s) a parameter is stored with: one per output channel for conv/linear weights when
    `per_channel`, else one for the tensor (biases and BN affines always)."""
    if per_channel and p.dim() >= 2:
        return power_of_two_exponents(channel_bounds(p, method, sigmas), bits)
    return torch.tensor(power_of_two_exponent(range_bound(p, method, sigmas), bits), dtype=torch.int64)


class ActivationQuantizer(nn.Module):
    """Rounds activations to `activation_bits` with a calibrated power-of-two exponent. While calibrating it
    tracks an EMA of their mean and std and, as Wave's SigmaMax quantizers do, already rounds with the exponent
    those statistics give, so later layers calibrate on the quantized values they will see."""

    def __init__(self, bits: int, sigmas: float = 18.0, method: str = "sigmamax", momentum: float = 0.01):
        super().__init__()
        self.activation_bits = int(bits)
        self.sigmas, self.method, self.momentum = float(sigmas), method, float(momentum)
        self.register_buffer("exponent", torch.tensor(0, dtype=torch.int64))
        self.calibrating = False
        self._mean: Optional[float] = None
        self._std: Optional[float] = None
        self._max = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
            self.exponent.fill_(power_of_two_exponent(self.bound(), self.activation_bits))
        return quantize_tensor(x, self.activation_bits, self.exponent)

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
        if self._mean is None:
            self._mean, self._std = mean, std
        else:
            self._mean += self.momentum * (mean - self._mean)
            self._std += self.momentum * (std - self._std)
        self._max = max(self._max, float(x.abs().max()))

    def bound(self) -> float:
        """SigmaMax: |mean| + k * std of the running statistics; or the largest |x| seen."""
        return self._max if self.method == "max" else abs(self._mean) + self.sigmas * self._std

    def finish_calibration(self) -> None:
        if self._mean is None:
            raise MicronetError("an activation quantizer saw no data during calibration")
        self.exponent.fill_(power_of_two_exponent(self.bound(), self.activation_bits))
        self.calibrating = False

    def extra_repr(self) -> str:
        return f"bits={self.activation_bits}, exponent={int(self.exponent)}"


def _quantize_output(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, QUANTIZER_NAME)(output)


def _quantize_input(module: nn.Module, inputs: tuple) -> tuple:
    return (getattr(module, QUANTIZER_NAME)(inputs[0]),) + tuple(inputs[1:])


# ---- BatchNorm folding -----------------------------------------------------------------------------------


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: BatchNorm) -> None:
    """Fold an eval-mode BN that only reads `layer`'s output into `layer`'s weight and a (new) bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.reshape(shape))
    old_bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
    layer.bias = nn.Parameter(old_bias * scale + shift)


@torch.no_grad()
def batchnorm_to_affine(bn: BatchNorm) -> None:
    """Rewrite an unfoldable BN as the per-channel affine y = a*x + b it computes at eval (mean 0, var 1-eps),
    so its two stored parameters per channel are exactly what gets quantized and counted."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bn.bias.copy_(bn.bias - bn.running_mean * scale)
    bn.weight.copy_(scale)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)


def fold_batchnorms(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    folded = []
    for layer_name, bn_name in pairs:
        fold_batchnorm(model.get_submodule(layer_name), model.get_submodule(bn_name))
        replace_module(model, bn_name, nn.Identity())
        folded.append([layer_name, bn_name])
    return folded


# ---- whole-model quantization --------------------------------------------------------------------------------


EXPONENT_SUFFIX = "_exponent"  # `weight_exponent`, `bias_exponent`: buffers beside the parameters they scale


def layer_weight_bits(names: Iterable[str], default: int, patterns: dict[str, int]) -> dict[str, int]:
    """Bits per layer: the first `patterns` entry (fnmatch over the module name, e.g. "layers.*.conv2") that
    matches, else `default`."""
    return {name: next((b for pat, b in patterns.items() if fnmatch.fnmatchcase(name, pat)), default)
            for name in names}


def quantized_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]


def _register_exponent(module: nn.Module, pname: str, exponent: torch.Tensor) -> None:
    """The stored exponent(s) of parameter `pname`: in the state_dict, read by the counter (8 bits each)."""
    key = pname + EXPONENT_SUFFIX
    if key in module._buffers:
        module._buffers[key] = exponent
    else:
        module.register_buffer(key, exponent)


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: dict[str, int], method: str = "sigmamax", sigmas: float = 10.0,
                     per_channel: bool = False) -> dict[str, torch.Tensor]:
    """Round every parameter of the layers in `bits` (name -> weight bits) in place; returns the exponent(s)
    chosen per parameter, also kept as `<param>_exponent` buffers on the layer."""
    exponents: dict[str, torch.Tensor] = {}
    for name, layer_bits in bits.items():
        module = model.get_submodule(name)
        for pname, p in module.named_parameters(recurse=False):
            exponent = weight_exponent(p, layer_bits, method, sigmas, per_channel).to(p.device)
            p.copy_(quantize_tensor(p, layer_bits, exponent))
            _register_exponent(module, pname, exponent)
            exponents[f"{name}.{pname}" if name else pname] = exponent
        module.weight_bits = layer_bits
    return exponents


PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)


def layer_activation_points(model: nn.Module) -> list[str]:
    """The network input ("") and every conv, linear, BN and pool output."""
    pools = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d)
    return [""] + [n for n, m in model.named_modules() if n and isinstance(m, QUANTIZED_LAYERS + pools)]


@torch.no_grad()
def computed_activation_points(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Wave quantizes the input and the output of every leaf module (conv, BN, ReLU, ShakeDrop, pool, linear).
    Generalized: the input and the output of every module whose forward computes its output itself, rather than
    returning its input or a submodule's output. That covers every leaf, and residual blocks whose sum is made in
    their own forward (so the next block reads activation-width values, not a 32-bit sum). Found with one pass."""
    calls: dict[str, tuple[tuple, object]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:  # returns None: the output stays
            calls.setdefault(name, (args, output))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    points = [""]
    for name, module in model.named_modules():
        if not name or name not in calls or isinstance(module, PASS_THROUGH):
            continue
        args, out = calls[name]
        if not isinstance(out, torch.Tensor) or any(out is a for a in args):
            continue
        children = [f"{name}.{child}" for child, _ in module.named_children()]
        if any(c in calls and calls[c][1] is out for c in children):
            continue
        points.append(name)
    return points


def add_activation_quantizers(model: nn.Module, names: list[str], bits: int, **kwargs: Any) -> None:
    for name in names:
        module = model.get_submodule(name) if name else model
        module.add_module(QUANTIZER_NAME, ActivationQuantizer(bits, **kwargs))
        if name:
            module.register_forward_hook(_quantize_output)
        else:
            module.register_forward_pre_hook(_quantize_input)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for q in quantizers:
        q.calibrating = True
    model.eval()
    seen = 0
    for images in batches:
        model(images)
        seen += 1
    for q in quantizers:
        q.finish_calibration()
    return seen


# ---- what the checkpoint records, and how a fresh model gets the same structure back -----------------------


def quantization_spec(model: nn.Module) -> Optional[dict[str, Any]]:
    spec = getattr(model, "_quantization_spec", None)
    return dict(spec) if spec else None


def apply_quantization_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Recreate folded biases, affine BNs, bit widths, exponent buffers and quantizers so a saved state_dict loads
    strictly. A spec without `layer_weight_bits` (older checkpoints) has one width and no exponent buffers."""
    for layer_name, bn_name in spec["folded"]:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        replace_module(model, bn_name, nn.Identity())
    per_layer = spec.get("layer_weight_bits")
    per_channel = spec.get("weight_exponents") == "per_channel"
    for name in spec["weight_layers"]:
        module = model.get_submodule(name)
        module.weight_bits = per_layer[name] if per_layer else spec["weight_bits"]
        if per_layer:
            for pname, p in module.named_parameters(recurse=False):
                shape = (p.shape[0],) if per_channel and p.dim() >= 2 else ()
                _register_exponent(module, pname, torch.zeros(shape, dtype=torch.int64))
    add_activation_quantizers(model, spec["activation_layers"], spec["activation_bits"])
    model._quantization_spec = spec
    return model


def quantize_model(
    model: nn.Module,
    fold_pairs: Iterable[tuple[str, str]],
    calibration_batches: Iterable[torch.Tensor],
    *,
    weight_bits: int,
    activation_bits: int,
    layer_bits: Optional[dict[str, int]] = None,
    per_channel: bool = False,
    method: str = "sigmamax",
    weight_sigmas: float = 10.0,
    activation_sigmas: float = 18.0,
    momentum: float = 0.01,
    points: str = "every_op",
    example: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """Post-training quantization (no retraining), in the Wave order: fold BN, round weights, calibrate.
    `layer_bits`: {module-name pattern: weight bits} over the default `weight_bits`; `per_channel`: one exponent
    per output channel of each conv/linear weight (Wave: one per tensor).
    `points`: every_op (Wave; found with `example`, default the first calibration image) or layers."""
    model.eval()
    folded = fold_batchnorms(model, fold_pairs)
    for m in model.modules():
        if isinstance(m, BatchNorm):
            batchnorm_to_affine(m)
    bits = layer_weight_bits(quantized_layers(model), weight_bits, layer_bits or {})
    exponents = quantize_weights(model, bits, method, weight_sigmas, per_channel)
    if points == "every_op":
        if example is None:  # one example from the first calibration batch finds the computed outputs
            batches = iter(calibration_batches)
            first = next(batches, None)
            if first is None:
                raise MicronetError("quantization needs at least one calibration batch")
            calibration_batches = itertools.chain([first], batches)
            example = first[:1]
        names = computed_activation_points(model, example)
    else:
        names = layer_activation_points(model)
    add_activation_quantizers(
        model, names, activation_bits, sigmas=activation_sigmas, method=method, momentum=momentum
    )
    batches = calibrate(model, calibration_batches)
    spec = {
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "folded": folded,
        "weight_layers": list(bits),
        "layer_weight_bits": bits,
        "weight_exponents": "per_channel" if per_channel else "per_tensor",
        "activation_layers": names,
    }
    model._quantization_spec = spec
    return {"spec": spec, "weight_exponents": exponents, "calibration_batches": batches}


# ---- quantization-aware fine-tuning --------------------------------------------------------------------------


class WeightQuantizer(nn.Module):
    """A parametrization: the layer computes with its parameter on the grid, the optimizer moves the float value
    underneath (straight-through gradient). The exponent(s) are the ones post-training quantization chose."""

    def __init__(self, bits: int, exponent: torch.Tensor):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("exponent", exponent.detach().clone(), persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_tensor(w, self.bits, self.exponent)


class QuantizationAware(nn.Module):
    """What the one training loop fine-tunes: the quantized net, weights behind `WeightQuantizer`s (each layer's
    bits and stored exponents), activation quantizers at their calibrated exponents. train() leaves every BatchNorm
    in eval mode: after quantization a BN is folded away or is the fixed affine map its statistics gave, never batch
    statistics again."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for module in list(net.modules()):
            bits = getattr(module, "weight_bits", None)
            if bits is None:
                continue
            for pname, _ in list(module.named_parameters(recurse=False)):
                exponent = module.get_buffer(pname + EXPONENT_SUFFIX)
                parametrize.register_parametrization(module, pname, WeightQuantizer(bits, exponent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> "QuantizationAware":
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, BatchNorm):
                m.eval()
        return self

    def masks(self, zeros_of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sparsity masks (net parameter name -> 0/1) renamed to the float parameters the optimizer moves."""
        renamed = {}
        for key, mask in zeros_of.items():
            layer, _, name = key.rpartition(".")
            module = self.net.get_submodule(layer)
            inner = f"parametrizations.{name}.original" if parametrize.is_parametrized(module, name) else name
            renamed[f"net.{layer}.{inner}"] = mask
        return renamed

    @torch.no_grad()
    def finish(self) -> nn.Module:
        """The net with every parameter replaced by its value on the grid (a masked float weight is 0, and so is
        its rounding): what the checkpoint stores and the counter counts."""
        for m in list(self.net.modules()):
            if parametrize.is_parametrized(m):
                for name in list(m.parametrizations):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        return self.net.eval()


@torch.no_grad()
def off_grid(model: nn.Module) -> list[str]:
    """Quantized parameters not exactly on the grid they declare (their layer's `weight_bits`, their stored
    exponents, per output channel where there are several): what a checkpoint claims, checked value by value."""
    bad = []
    for name, module in model.named_modules():
        bits = getattr(module, "weight_bits", None)
        for pname, p in module.named_parameters(recurse=False) if bits is not None else ():
            exponent = module._buffers.get(pname + EXPONENT_SUFFIX)
            if exponent is None or not torch.equal(quantize_tensor(p, bits, exponent), p):
                bad.append(f"{name}.{pname}" if name else pname)
    return bad


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv/linear weights with exact zeros (a sparsified model) -> their 0/1 masks; dense weights need none."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and bool((m.weight == 0).any()):
            masks[f"{name}.weight"] = (m.weight != 0).to(m.weight.dtype).detach().clone()
    return masks


@torch.no_grad()
def predictions(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels of every evaluation image, in loader order."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        raise MicronetError("quantize: the evaluation split holds no images to compare the models on")
    return torch.cat(logits), torch.cat(labels)


def fidelity(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How closely quantized logits follow the float model's where labels say little (e.g. synthetic data): the
    share of images with the same top-1 class, and ||z_q - z_f|| / ||z_f|| over all logits."""
    agreement = float((reference.argmax(1) == logits.argmax(1)).double().mean())
    norm = float(reference.double().norm())
    error = float((logits.double() - reference.double()).norm()) / norm if norm else math.nan
    return {"agreement": agreement, "logit_relative_error": error}
