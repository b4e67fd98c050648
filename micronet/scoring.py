"""The MicroNet Challenge counter: parameter storage and math ops of one example, by the official rules.

One forward pass of a single example runs under a `TorchFunctionMode`, so every op is seen at the
function level with real tensors (F.relu counts exactly like nn.ReLU, `x + y` like a residual add).
Module hooks only supply row names and find activation quantizers. Rules and op table:
docs/micronet-scoring.md; the reference is google-research `micronet_challenge/counting.py`.

Conventions this module fixes (the rules leave them open):
- A tensor is "dynamic" if it depends on the example. Ops whose tensor inputs are all static
  (parameters, buffers, constants, fake-quantized or masked weights) are constant-folded: free.
- Storage is charged for the static tensors that counted ops actually read (each tensor once), so
  `torch.nn.utils.prune` masks and fake-quant weights are charged as the weight the op really uses.
- BatchNorm folds into a conv/linear whose output only it consumes (the conv gains a bias);
  any other BatchNorm costs 1 mult + 1 add per element and 2 params per channel.
- Quantized models: every tensor carries a bit width through the pass. Arithmetic outputs are 32-bit
  accumulators; data movement and comparison-only ops (ReLU, ReLU6/clamp, max pool) keep their input's
  width; an activation quantizer (a module with an int `activation_bits`) sets it and costs one shift
  per element. Each quantized tensor (weight or bias of a `weight_bits` module, each quantizer) stores
  one 8-bit exponent, or as many as its `<name>_exponent` buffer holds (one per output channel).
- A transcendental (the square root of a norm) is one op, counted as a multiply, as the reference
  counter counts ReLU, so it takes the freebie and the multiply bit width.
- A 2-norm of R elements costs R mults (squares) + 1 mult (sqrt) and R - 1 adds per norm;
  F.normalize is that norm, one comparison per norm (clamp_min eps) and one division per element.
- Division by an activation is one mult per element when the divisor is broadcast (one value per
  vector or channel, as in a normalization); a quotient of two full activations is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from micronet.errors import MicronetError

# Normalizers (32-bit params / ops of the reference models) and accuracy gates (correct of total).
TASKS: dict[str, dict[str, Any]] = {
    "cifar100": {"params_ref": 36.5e6, "ops_ref": 10.49e9, "gate": (8000, 10000)},
    "imagenet": {"params_ref": 6.9e6, "ops_ref": 1170e6, "gate": (37500, 50000)},
}

EXPONENT_BITS = 8  # each stored power-of-two exponent (one per tensor, or per output channel) ("anything needed at inference")


def _task(task: str) -> dict[str, Any]:
    if task not in TASKS:
        raise MicronetError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


@dataclass
class LayerCount:
    """One counted op. `bits` is the bit width its multiplies are charged at: for a conv/linear the wider of
    `weight_bits` (its stored weights) and `activation_bits` (its input); None where the op has no such operand."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    sparsity: float
    bits: float
    param_bits: float
    mults: float
    adds: float
    weight_bits: Optional[float] = None
    activation_bits: Optional[float] = None


@dataclass
class Count:
    """Per-example totals; `params` and `flops` are in 32-bit equivalents (what the score uses)."""

    param_bits: float
    mults: float
    adds: float
    params: float
    flops: float
    layers: list[LayerCount] = field(default_factory=list)
    quantized: bool = False
    freebie: bool = False

    def score(self, task: str) -> float:
        ref = _task(task)
        return self.params / ref["params_ref"] + self.flops / ref["ops_ref"]

    def qualifies(self, task: str, correct: int, total: int) -> bool:
        """Hard accuracy gate, in integers so 7999/10000 can never round up to 80%."""
        gate_correct, gate_total = _task(task)["gate"]
        if total <= 0 or not 0 <= correct <= total:
            raise MicronetError(f"accuracy {correct}/{total} is not a valid count")
        return correct * gate_total >= gate_correct * total

    def to_dict(self) -> dict[str, Any]:
        return {
            "param_bits": float(self.param_bits),
            "params": float(self.params),
            "mults": float(self.mults),
            "adds": float(self.adds),
            "flops": float(self.flops),
            "quantized": bool(self.quantized),
            "freebie": bool(self.freebie),
        }

    def table(self, tasks: Sequence[str] = ("cifar100", "imagenet")) -> str:
        """Per-layer summary in the organizers' style, then the totals and the score on each of `tasks` (the
        normalizers differ per track: a score without its task means nothing)."""
        head = ("name", "kind", "in shape", "out shape", "sparsity", "weight bits", "act bits", "bits", "param bits",
                "mults", "adds")
        rows = [
            (
                l.name,
                l.kind,
                "x".join(map(str, l.input_shape)),
                "x".join(map(str, l.output_shape)),
                f"{l.sparsity:.4f}",
                "-" if l.weight_bits is None else _fmt(l.weight_bits),
                "-" if l.activation_bits is None else _fmt(l.activation_bits),
                _fmt(l.bits),
                _fmt(l.param_bits),
                _fmt(l.mults),
                _fmt(l.adds),
            )
            for l in self.layers
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        left = 4  # text columns are left-aligned, numbers right-aligned

        def line(r: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        out = [line(head), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]
        mode = "quantized" if self.quantized else ("freebie (16-bit params and mults)" if self.freebie else "32-bit")
        out += [
            "",
            f"precision   {mode}",
            f"param bits  {_fmt(self.param_bits)}",
            f"params      {_fmt(self.params)}  (32-bit equivalents)",
            f"mults       {_fmt(self.mults)}",
            f"adds        {_fmt(self.adds)}",
            f"flops       {_fmt(self.flops)}  (32-bit equivalents)",
        ]
        out += [f"score       {self.score(task):.6f}  ({task})" for task in tasks]
        return "\n".join(out)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


# ---------------------------------------------------------------------------------------------
# Internal records


@dataclass
class _Store:
    """A stored tensor: `key` makes each tensor count once, `masked` adds the 1-bit sparsity mask."""

    key: Any
    numel: int
    nnz: int
    bits: float
    masked: bool = False
    exponents: int = 0  # power-of-two exponents stored with it (one per tensor, or one per output channel)

    def bits_total(self) -> float:
        mask = self.numel if self.masked and self.nnz < self.numel else 0
        values = (self.nnz if mask else self.numel) * self.bits
        return values + mask + EXPONENT_BITS * self.exponents


@dataclass
class _Row:
    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mults: float
    adds: float
    mult_bits: float
    add_bits: float
    sparsity: float = 0.0
    storage: list[_Store] = field(default_factory=list)
    # conv/linear: whether a bias is already there, and the bits a folded-in BN bias is stored at
    has_bias: bool = False
    bias_bits: float = 32.0
    bias_quantized: bool = False
    # conv/linear: the stored weights' bits and the input's (their wider one is mult_bits when quantized)
    weight_bits: Optional[float] = None
    activation_bits: Optional[float] = None
    # the nn.Module whose own parameter the op used (conv/linear weight, BN running_mean), if any
    module: Optional[nn.Module] = None
    module_name: str = ""
    # batch_norm: the row that produced its input (a fold candidate), and the row it folded into
    source: Optional[int] = None
    folded_into: Optional[int] = None


@dataclass
class _Info:
    """What the trace knows about a dynamic tensor: its producing row and its bit width."""

    row: Optional[int]
    bits: float


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


# Python operators reach the mode as their method names (x + y -> add, x += y -> add_), but keep the
# dunder spellings too so nothing falls through to "unknown op".
_ADD = _names("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
              "__isub__", "rsub", "subtract")
_MUL = _names("mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply")
_DIV = _names("div", "div_", "__truediv__", "__itruediv__", "__div__", "true_divide", "divide")
# (mults, adds) per output element
_ELEMENTWISE: dict[str, tuple[str, int, int]] = {
    **{n: ("relu", 1, 0) for n in ("relu", "relu_")},
    **{n: ("relu6", 2, 0) for n in ("relu6", "relu6_")},
    **{n: ("sigmoid", 2, 1) for n in ("sigmoid", "sigmoid_")},
    **{n: ("silu", 3, 1) for n in ("silu", "silu_")},
    **{n: ("hardswish", 4, 1) for n in ("hardswish", "hardswish_")},
    **{n: ("hardsigmoid", 3, 1) for n in ("hardsigmoid", "hardsigmoid_")},
}
# Comparison-only ops: like max pool, their output is an input value (or a bound), so it keeps the
# input's bit width; every other arithmetic op outputs a 32-bit accumulator value.
_SELECTING = _names("relu", "relu6", "clamp", "hardtanh", "maxpool")
# Data movement: no arithmetic, output keeps the (max) bit width of its inputs.
_FREE = _names(
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "permute", "transpose", "transpose_", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
    "contiguous", "expand", "expand_as", "broadcast_to", "__getitem__", "narrow", "select", "index_select",
    "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "cat", "concat", "concatenate", "stack",
    "pad", "constant_pad_nd", "clone", "detach", "detach_", "to", "float", "double",
    "type", "type_as", "cpu", "cuda", "requires_grad_", "flip", "roll", "repeat", "tile", "channel_shuffle",
    "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "__get__", "identity", "copy_", "__setitem__",
)
_DROPOUT = _names("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
# Outputs that do not depend on the values of their tensor argument: constants.
_FACTORY = _names("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
                  "empty_like", "full_like", "rand_like", "randn_like", "randint_like")
_SOFTMAX = _names("softmax", "log_softmax")
_NORM = _names("norm", "linalg_vector_norm")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _adaptive_windows(n: int, out: int) -> list[int]:
    """Window sizes PyTorch's adaptive pooling uses along one dimension."""
    return [math.ceil((i + 1) * n / out) - (i * n) // out for i in range(out)]


def _int_attr(obj: Any, name: str) -> Optional[int]:
    v = getattr(obj, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class _Tracer(TorchFunctionMode):
    """Records one row per arithmetic op; the mode is popped while an op runs, so only the outermost
    call of nested ones (nn.Linear -> F.linear -> aten) is seen."""

    def __init__(self, model: nn.Module, freebie: bool, quantized: bool):
        super().__init__()
        self.quantized = quantized
        self.freebie = freebie and not quantized
        self.mult_default = 16.0 if self.freebie else 32.0  # freebie: params and mults at 16, adds at 32
        self.rows: list[_Row] = []
        self.consumers: list[int] = []
        self.info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.keep: list[torch.Tensor] = []  # static tensors charged for storage stay alive: ids stay unique
        self.stack: list[tuple[str, nn.Module]] = []
        self.suppress = 0  # inside an activation quantizer: its internals are one "requant" op
        self.quant_input: Optional[torch.Tensor] = None
        self.paused = False  # inside our own hooks
        self.softmax_outputs: list[tuple[torch.Tensor, str]] = []
        self.name_uses: dict[str, int] = {}
        # A leaf names its own rows; activation quantizers hooked onto a layer don't make it a container.
        self.leaves = {id(m) for m in model.modules() if all(self._is_quantizer(c) for c in m.children())}
        self.owner: dict[int, nn.Module] = {}
        self.exponent_count: dict[int, int] = {}  # quantized parameter -> exponents stored (its `_exponent` buffer)
        for m in model.modules():
            for pname, p in m.named_parameters(recurse=False):
                self.owner.setdefault(id(p), m)
                exponent = m._buffers.get(pname + "_exponent")
                if exponent is not None:
                    self.exponent_count[id(p)] = exponent.numel()
            for b in m.buffers(recurse=False):
                self.owner.setdefault(id(b), m)

    # -- torch function mode ------------------------------------------------------------------

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and not self.suppress:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", repr(func))
        if name == "__iter__" and any(t in self.info for t in _tensors(args)):
            raise MicronetError("counter does not know op __iter__ (iterating over an activation); use unbind")
        if name == "__setitem__" and args and any(t in self.info for t in _tensors(args[1:])):
            out = args[0]  # writing an activation into a buffer: the buffer now carries it
        outs = _tensors(out)
        if not outs:
            return  # metadata: shape, size, dim, item, ...
        inputs = _tensors((args, kwargs))
        dyn = [t for t in inputs if t in self.info]
        if not dyn or name in _FACTORY:
            return  # constant folding: weights, buffers and constants only
        if name in _FREE or name in _DROPOUT:
            if name in _DROPOUT and _arg(args, kwargs, 2, "training", True) and _arg(args, kwargs, 1, "p", 0.5) > 0:
                raise MicronetError(f"{name} is active at inference (training=True): pass training=self.training")
            if len(outs) == 1 and any(outs[0] is t for t in dyn):
                return  # returns its input unchanged (eval dropout, .float() on float32, identity)
            self._consume(dyn)
            bits = max(self.info[t].bits for t in dyn)
            for o in outs:
                self.info[o] = _Info(None, bits)
            return
        handler = self._handler(name)
        if handler is None:
            raise MicronetError(
                f"counter does not know op {name} (called in {self._module_name() or 'the model'}); "
                "add it to micronet/scoring.py with its MicroNet cost"
            )
        self._consume(dyn)
        handler(name, args, kwargs, outs[0], dyn)

    def _handler(self, name: str) -> Optional[Callable]:
        if name in ("conv1d", "conv2d", "conv3d", "linear"):
            return self._linear_op
        if name == "batch_norm":
            return self._batch_norm
        if name in _ADD or name in _MUL or name in _DIV:
            return self._arith
        if name in _ELEMENTWISE:
            return self._activation
        if name in ("hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
                    "clamp_max", "clamp_max_"):
            return self._clamp
        if name in ("avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "adaptive_max_pool2d"):
            return self._pool
        if name == "mean":
            return self._mean
        if name in _SOFTMAX:
            return self._softmax
        if name in _NORM:
            return self._vector_norm
        if name == "normalize":
            return self._normalize
        return None

    # -- bookkeeping --------------------------------------------------------------------------

    def _consume(self, dyn: list[torch.Tensor]) -> None:
        for r in {self.info[t].row for t in dyn} - {None}:
            self.consumers[r] += 1

    def _module_name(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def _row_name(self, kind: str) -> str:
        if self.stack and id(self.stack[-1][1]) in self.leaves and self.stack[-1][0]:
            base = self.stack[-1][0]
        else:
            base = f"{self._module_name()}.{kind}" if self._module_name() else kind
        n = self.name_uses.get(base, 0) + 1
        self.name_uses[base] = n
        return base if n == 1 else f"{base}#{n}"

    def _add_row(self, row: _Row, out: Optional[torch.Tensor]) -> int:
        self.rows.append(row)
        self.consumers.append(0)
        index = len(self.rows) - 1
        if out is not None:
            self.info[out] = _Info(index, 32.0)  # arithmetic outputs are accumulator-wide
        return index

    def _owning_module(self, t: Optional[torch.Tensor], attr: str) -> tuple[Optional[nn.Module], str]:
        """The module running this op, if `t` is its own `attr` (as in nn.Conv2d -> F.conv2d)."""
        if t is not None and self.stack and getattr(self.stack[-1][1], attr, None) is t:
            return self.stack[-1][1], self.stack[-1][0]
        return None, ""

    def _weight_bits(self, t: torch.Tensor) -> tuple[float, bool]:
        """Storage bits of a static tensor: its owner's (or the calling module's) `weight_bits`."""
        owner = self.owner.get(id(t))
        if owner is None and self.stack:
            owner = self.stack[-1][1]
        bits = _int_attr(owner, "weight_bits") if owner is not None else None
        if bits is not None:
            return float(bits), True
        return self.mult_default, False

    def _bits(self, t: torch.Tensor) -> float:
        return self.info[t].bits if t in self.info else self._weight_bits(t)[0]

    def _op_bits(self, tensors: list[torch.Tensor]) -> tuple[float, float]:
        """(mult bits, add bits) of a non-conv op: max of its inputs when quantized."""
        if not self.quantized:
            return self.mult_default, 32.0
        b = max(self._bits(t) for t in tensors)
        return b, b

    def _exponents(self, t: Optional[torch.Tensor], quantized: bool) -> int:
        """Exponents stored with a quantized tensor: its `_exponent` buffer's size, else one shared exponent."""
        return self.exponent_count.get(id(t), 1) if quantized else 0

    def _store(self, t: torch.Tensor, bits: float, masked: bool = False, quantized: bool = False) -> _Store:
        self.keep.append(t)
        numel = t.numel()
        nnz = int(torch.count_nonzero(t)) if masked else numel
        return _Store(id(t), numel, nnz, bits, masked, self._exponents(t, quantized))

    def _statics(self, inputs: list[torch.Tensor]) -> list[_Store]:
        """Storage for static tensors an elementwise op reads (e.g. a learned scale); never masked."""
        stores = []
        for t in inputs:
            if t not in self.info:
                bits, quant = self._weight_bits(t)
                stores.append(self._store(t, bits, quantized=quant))
        return stores

    # -- op handlers --------------------------------------------------------------------------

    def _linear_op(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        if w in self.info or (bias is not None and bias in self.info):
            raise MicronetError(f"counter does not know op {name} with an input-dependent weight")
        numel = w.numel()
        zeros = numel - int(torch.count_nonzero(w))
        s = zeros / numel
        # Reference counter: vector length (k*k*c_in/groups) * (1 - s) in float64, never rounded.
        v = float(numel // w.shape[0]) * (1.0 - s)
        n = out.numel()
        w_bits, w_quant = self._weight_bits(w)
        mult_bits = max(self.info[x].bits, w_bits) if self.quantized else self.mult_default
        storage = [self._store(w, w_bits, masked=True, quantized=w_quant)]
        if bias is not None:
            storage.append(self._store(bias, w_bits, quantized=w_quant))
        row = _Row(
            name=self._row_name("conv" if name.startswith("conv") else "linear"),
            kind="conv" if name.startswith("conv") else "linear",
            input_shape=tuple(x.shape),
            output_shape=tuple(out.shape),
            mults=v * n,
            adds=(v - 1) * n + (n if bias is not None else 0),
            mult_bits=mult_bits,
            add_bits=32.0,  # accumulators are 32-bit
            sparsity=s,
            storage=storage,
            has_bias=bias is not None,
            bias_bits=w_bits,
            bias_quantized=w_quant,
            weight_bits=w_bits,
            activation_bits=self.info[x].bits if self.quantized else None,
        )
        row.module, row.module_name = self._owning_module(w, "weight")
        self._add_row(row, out)

    def _batch_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        x = args[0]
        running_mean = _arg(args, kwargs, 1, "running_mean")
        if _arg(args, kwargs, 5, "training", False) or running_mean is None:
            raise MicronetError("batch_norm uses batch statistics at inference (track_running_stats=False)")
        gamma, beta = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        channels = x.shape[1]
        bits, quant = self._weight_bits(gamma if gamma is not None else running_mean)
        # gamma and beta (running stats fold into them); keyed by the tensors so a shared BN counts once
        storage = [
            _Store(id(gamma if gamma is not None else running_mean), channels, channels, bits,
                   exponents=self._exponents(gamma, quant)),
            _Store(id(beta) if beta is not None else ("beta", id(running_mean)), channels, channels, bits,
                   exponents=self._exponents(beta, quant)),
        ]
        self.keep += [t for t in (gamma, beta, running_mean) if t is not None]
        mult_bits, add_bits = self._op_bits([x, running_mean] + ([gamma] if gamma is not None else []))
        n = out.numel()
        row = _Row(self._row_name("bn"), "bn", tuple(x.shape), tuple(out.shape), n, n, mult_bits, add_bits,
                   storage=storage, source=self.info[x].row)
        row.module, row.module_name = self._owning_module(running_mean, "running_mean")
        self._add_row(row, out)

    def _arith(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        inputs = _tensors((args, kwargs))
        n = out.numel()
        divisor = _arg(args, kwargs, 1, "other")
        by_activation = name in _DIV and isinstance(divisor, torch.Tensor) and divisor in self.info
        if by_activation and _distinct(divisor) >= n:
            raise MicronetError(
                f"counter does not know op {name} by an activation with one value per element "
                "(only by constants, or by a broadcast divisor such as a norm)"
            )
        if name in _ADD:
            alpha = kwargs.get("alpha", 1)
            kind, mults, adds = "add", (n if alpha != 1 else 0), n
        elif by_activation:
            kind, mults, adds = "div", n, 0
        else:
            kind, mults, adds = "scale", n, 0
        mult_bits, add_bits = self._op_bits(inputs)
        row = _Row(self._row_name(kind), kind, tuple(dyn[0].shape), tuple(out.shape), mults, adds, mult_bits,
                   add_bits, storage=self._statics(inputs))
        self._add_row(row, out)

    def _activation(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        kind, m, a = _ELEMENTWISE[name]
        self._elementwise(kind, dyn[0], out, m, a)

    def _clamp(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        """One comparison per bound: ReLU6 / hardtanh / clamp(lo, hi) = 2 mults, clamp(min=0) = 1."""
        if name.startswith("hardtanh"):
            lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
            bounds = 2
        elif name.startswith("clamp_min"):
            lo, hi, bounds = _arg(args, kwargs, 1, "min"), None, 1
        elif name.startswith("clamp_max"):
            lo, hi, bounds = None, _arg(args, kwargs, 1, "max"), 1
        else:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            bounds = (lo is not None) + (hi is not None)
        if any(b is not None and isinstance(b, torch.Tensor) and b in self.info for b in (lo, hi)):
            raise MicronetError(f"counter does not know op {name} with activation-dependent bounds")
        numbers = all(b is None or isinstance(b, (int, float)) for b in (lo, hi))
        kind = "clamp"
        if numbers and (lo, hi) == (0, 6):
            kind = "relu6"
        elif numbers and bounds == 1 and lo == 0:
            kind = "relu"
        self._elementwise(kind, dyn[0], out, bounds, 0)

    def _elementwise(self, kind: str, x: torch.Tensor, out: torch.Tensor, mults: int, adds: int) -> None:
        n = out.numel()
        mult_bits, add_bits = self._op_bits([x])
        index = self._add_row(_Row(self._row_name(kind), kind, tuple(x.shape), tuple(out.shape), mults * n,
                                   adds * n, mult_bits, add_bits), out)
        if kind in _SELECTING:  # comparisons pick an input value or a bound: no wider than the input
            self.info[out] = _Info(index, self.info[x].bits)

    def _pool(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        x = args[0]
        h, w = x.shape[-2], x.shape[-1]
        oh, ow = out.shape[-2], out.shape[-1]
        channels = out.numel() // (oh * ow)
        if name.startswith("adaptive"):
            window_terms = sum(a * b - 1 for a in _adaptive_windows(h, oh) for b in _adaptive_windows(w, ow))
            per_channel = float(window_terms)  # (window - 1) per output, summed over the exact windows
            is_global = (oh, ow) == (1, 1)
        else:
            kh, kw = _pair(_arg(args, kwargs, 1, "kernel_size"))
            is_global = (oh, ow) == (1, 1) and kh >= h and kw >= w
            per_channel = float(h * w - 1) if is_global else float((kh * kw - 1) * oh * ow)
        n = out.numel()
        mult_bits, add_bits = self._op_bits([x])
        if "max" in name:
            kind, mults, adds = "maxpool", per_channel * channels, 0.0
        else:
            kind, mults, adds = ("gap" if is_global else "avgpool"), float(n), per_channel * channels
        index = self._add_row(_Row(self._row_name(kind), kind, tuple(x.shape), tuple(out.shape), mults, adds,
                                   mult_bits, add_bits), out)
        if kind in _SELECTING:  # a max of inputs is one of the inputs: keeps their bit width
            self.info[out] = _Info(index, self.info[x].bits)

    def _mean(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        """x.mean((2, 3)) is a global average pool: 1 mult per output, (R - 1) adds per output."""
        x = args[0]
        n = out.numel()
        reduce = x.numel() // n
        kind = "gap" if x.dim() == 4 and n == x.shape[0] * x.shape[1] else "mean"
        mult_bits, add_bits = self._op_bits([x])
        self._add_row(_Row(self._row_name(kind), kind, tuple(x.shape), tuple(out.shape), float(n),
                           float((reduce - 1) * n), mult_bits, add_bits), out)

    def _vector_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        """2-norm: per norm of R elements, R squares + 1 sqrt (mults) and R - 1 adds."""
        x = args[0]
        p = _arg(args, kwargs, 1, "ord" if name == "linalg_vector_norm" else "p", 2)
        if p not in (2, "fro", None):
            raise MicronetError(f"counter does not know op {name} with p={p!r} (only the 2-norm)")
        norms = out.numel()
        reduce = x.numel() // norms
        mult_bits, add_bits = self._op_bits([x])
        self._add_row(_Row(self._row_name("norm"), "norm", tuple(x.shape), tuple(out.shape),
                           float((reduce + 1) * norms), float((reduce - 1) * norms), mult_bits, add_bits), out)

    def _normalize(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        """F.normalize as the rows of its own code: x / norm(x).clamp_min(eps), the divisor broadcast."""
        x = args[0]
        p, dim = _arg(args, kwargs, 1, "p", 2.0), _arg(args, kwargs, 2, "dim", 1)
        if p != 2:
            raise MicronetError(f"counter does not know op normalize with p={p!r} (only the 2-norm)")
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        reduce = math.prod(x.shape[d] for d in dims)
        norms = x.numel() // reduce
        norm_shape = tuple(1 if i in {d % x.dim() for d in dims} else s for i, s in enumerate(x.shape))
        # the norm is an accumulator: the clamp and the division read a 32-bit value
        mult_bits, add_bits = self._op_bits([x])
        wide_mult, wide_add = (32.0, 32.0) if self.quantized else (self.mult_default, 32.0)
        rows = [
            ("norm", tuple(x.shape), norm_shape, (reduce + 1) * norms, (reduce - 1) * norms, mult_bits, add_bits),
            ("clamp", norm_shape, norm_shape, norms, 0, wide_mult, wide_add),
            ("div", tuple(x.shape), tuple(out.shape), out.numel(), 0, wide_mult, wide_add),
        ]
        for i, (kind, in_shape, out_shape, mults, adds, mb, ab) in enumerate(rows):
            row = _Row(self._row_name(kind), kind, in_shape, out_shape, float(mults), float(adds), mb, ab)
            self._add_row(row, out if i == len(rows) - 1 else None)

    def _softmax(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, dyn: list) -> None:
        """Free only on the final logits (checked after the pass)."""
        self.softmax_outputs.append((out, name))
        self.info[out] = _Info(None, 32.0)

    # -- activation quantizers (module hooks) -------------------------------------------------

    def pre_hook(self, name: str, module: nn.Module, args: tuple) -> None:
        self.paused = True
        try:
            self.stack.append((name, module))
            if self._is_quantizer(module):
                if not self.suppress:
                    self.quant_input = next((t for t in _tensors(args) if t in self.info), None)
                self.suppress += 1
        finally:
            self.paused = False

    def post_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self.paused = True
        try:
            if self._is_quantizer(module):
                self.suppress -= 1
                x = None
                if not self.suppress:  # the outermost quantizer is the op
                    x, self.quant_input = self.quant_input, None
                outs = _tensors(output)
                if x is not None and outs:
                    self._consume([x])
                    n = outs[0].numel()
                    bits = self.info[x].bits
                    exponent = _Store(("exponent", id(module)), 0, 0, 0.0, exponents=1)
                    row = _Row(self._row_name("requant"), "requant", tuple(x.shape), tuple(outs[0].shape),
                               float(n), 0.0, bits, bits, storage=[exponent])
                    index = self._add_row(row, None)
                    self.info[outs[0]] = _Info(index, float(module.activation_bits))
            self.stack.pop()
        finally:
            self.paused = False

    @staticmethod
    def _is_quantizer(module: nn.Module) -> bool:
        return _int_attr(module, "activation_bits") is not None and _int_attr(module, "weight_bits") is None

    # -- after the pass -----------------------------------------------------------------------

    def finish(self, outputs: list[torch.Tensor]) -> list[LayerCount]:
        self._consume([t for t in outputs if t in self.info])
        for t, name in self.softmax_outputs:
            if not any(t is o for o in outputs):
                raise MicronetError(f"counter does not know op {name} inside the network (free only on the logits)")
        self._fold_batch_norms()
        seen: set = set()
        layers = []
        for r in self.rows:
            if r.folded_into is not None:
                continue
            param_bits = 0.0
            for s in r.storage:
                if s.key not in seen:
                    seen.add(s.key)
                    param_bits += s.bits_total()
            layers.append(LayerCount(r.name, r.kind, r.input_shape, r.output_shape, r.sparsity, r.mult_bits,
                                     param_bits, r.mults, r.adds, r.weight_bits, r.activation_bits))
        return layers

    def _fold_batch_norms(self) -> None:
        """conv/linear -> BN with nothing else reading the conv output: BN becomes the conv's bias."""
        for r in self.rows:
            if r.kind != "bn" or r.source is None:
                continue
            src = self.rows[r.source]
            if src.kind not in ("conv", "linear") or self.consumers[r.source] != 1:
                continue
            r.folded_into = r.source
            src.name = f"{src.name}+{r.name.rsplit('.', 1)[-1]}"
            if not src.has_bias:
                src.has_bias = True
                channels = src.output_shape[1]
                n = math.prod(src.output_shape)
                src.adds += n
                src.storage.append(_Store(("folded_bias", id(r)), channels, channels, src.bias_bits,
                                          exponents=int(src.bias_quantized)))

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(layer, BN) module names of the folds, where both are modules called exactly once."""
        calls: dict[int, int] = {}
        for r in self.rows:
            if r.module is not None:
                calls[id(r.module)] = calls.get(id(r.module), 0) + 1
        pairs = []
        for r in self.rows:
            if r.folded_into is None or r.module is None:
                continue
            src = self.rows[r.folded_into]
            if src.module is not None and calls[id(src.module)] == 1 and calls[id(r.module)] == 1:
                pairs.append((src.module_name, r.module_name))
        return pairs


def _distinct(t: torch.Tensor) -> int:
    """Values a tensor really holds: a broadcast (expanded, stride-0) dimension repeats one value."""
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _is_quantized(model: nn.Module) -> bool:
    return any(_int_attr(m, "weight_bits") is not None or _int_attr(m, "activation_bits") is not None
               for m in model.modules())


def _trace(model: nn.Module, input_size: Sequence[int], freebie: bool) -> tuple[_Tracer, list[LayerCount]]:
    """One eval-mode, no-grad pass of a single zero example; the model's modes and threads are restored."""
    size = tuple(input_size)
    if not size or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
        raise MicronetError(f"input size must be positive ints (C, H, W), got {input_size!r}")
    tracer = _Tracer(model, freebie, _is_quantized(model))
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros((1, *size), device=device, dtype=dtype)

    modes = {m: m.training for m in model.modules()}
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: tracer.pre_hook(n, m, a)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: tracer.post_hook(n, m, a, o),
                                                    always_call=True))
    threads = torch.get_num_threads()
    try:
        model.eval()
        # One small example gains nothing from intra-op threads, and on a busy CPU OpenMP barriers
        # make a 0.2 s pass take tens of seconds.
        torch.set_num_threads(1)
        tracer.info[x] = _Info(None, 32.0)
        with torch.no_grad(), tracer:
            out = model(x)
        layers = tracer.finish(_tensors(out))
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return tracer, layers


def count(model: nn.Module, input_size: Sequence[int] = (3, 32, 32), freebie: bool = False) -> Count:
    """Count one example of shape `input_size` (C, H, W) through `model` by the MicroNet rules.

    `freebie` counts params and mults at 16 bits (adds stay 32); it is ignored for a quantized model
    (any module with an int `weight_bits` or `activation_bits`), as the rules require.
    """
    tracer, layers = _trace(model, input_size, freebie)
    rows = [r for r in tracer.rows if r.folded_into is None]
    param_bits = sum(l.param_bits for l in layers)
    return Count(
        param_bits=param_bits,
        mults=sum(l.mults for l in layers),
        adds=sum(l.adds for l in layers),
        params=param_bits / 32,
        flops=sum(r.mults * r.mult_bits / 32 + r.adds * r.add_bits / 32 for r in rows),
        layers=layers,
        quantized=tracer.quantized,
        freebie=tracer.freebie,
    )


def foldable_batchnorms(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> list[tuple[str, str]]:
    """(conv/linear, BatchNorm) module names that `count` folds, for a quantizer to fold for real.

    Only pairs of modules each called once in the pass (a shared conv can't absorb one caller's BN)."""
    tracer, _ = _trace(model, input_size, freebie=False)
    return tracer.fold_pairs()
