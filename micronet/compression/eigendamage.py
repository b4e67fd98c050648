"""EigenDamage low-rank pruning in the K-FAC eigenbasis, with "bring-back", as Wave Computing pruned
PyramidNet-272 (docs/submissions.md section 3, Step 2). One prune step:

1. `collect_kfac`: K-FAC factors of every conv and linear (A: input covariance, G: output-gradient covariance)
   over a loader of the training split, with labels drawn from the model's own softmax (true Fisher); their
   eigenbases; and EKFAC-corrected eigenvalues s = E[(Q_G^T grad_n Q_A)^2] from per-example gradients.
2. `prune_step`: rotate each weight into its eigenbasis (M' = Q_G^T W Q_A per kernel tap), score output and
   input eigen-directions by the Fisher-weighted damage s * M'^2, remove the step_rate fraction with the
   smallest scores under one global threshold (at most max_layer_rate of a layer's rows or columns), and
   replace each layer by input rotation -> core -> output rotation (micronet.compression.factorized).
3. `bring_back_step` (alternating with prune steps): grow the layers again by back_ratio of what the last prune
   step deleted, allocated across layers in proportion to the damage their deletions caused.
Fine-tuning between steps is the caller's job.

Choices where Wave's code is not followed, and why:
- Truncation is direct: the kept eigen-directions (selected by saliency) form the rotations and the core is
  M' restricted to them. Wave ran tensorly's partial_tucker with random init on M' and used only the counts
  of the selection, so the Fisher picked how many directions survive but not which. Direct truncation uses the
  saliency for both, is deterministic, costs no iterative solve, and is exact when nothing is cut.
- Statistics are collected in eval mode by default: BN uses its running statistics and ShakeDrop its
  expectation, which is the function being pruned and deployed; per-example gradients are then exact (batch
  statistics couple the examples of a batch), and BN running statistics are never touched. `train_mode=True`
  reproduces Wave (BN batch statistics, stochastic ShakeDrop) and restores the BN buffers afterwards.
- The eigenvalue correction replays the first batch (same inputs, same sampled labels, same RNG state) after
  the eigendecomposition instead of keeping every layer's per-example activations and gradients from it.
- The per-layer cap is water-filled: a layer at its cap keeps its own quantile (as Wave) and the global
  threshold rises over the other layers until step_rate of all entries is removed (Wave's total fell short
  whenever a cap bound). Exactly int(step_rate * N) entries are removed (Wave: ties and one more).
- Bring-back draws an independent perturbation for every copied row/column (Wave drew one per call, so all
  n copies were identical and stayed identical under SGD), and never grows a rank past the layer's full size.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from micronet.compression import check_layer_names, count_parameters, replace_module
from micronet.compression.factorized import Factorized, FactorizedConv2d, FactorizedLinear, set_factors
from micronet.errors import MicronetError

DAMPING = 1e-3  # lambda, split between A and G by pi
EMA = 0.9  # moving average of the factors over batches (Wave's ma): the last ~10 batches dominate
POOL_MOMENTUM = 0.5
NOISE = 0.01  # relative perturbation of brought-back rows and columns
EPS = 1e-15  # Wave's floor for traces and eigenvalues

Unit = Union[nn.Conv2d, nn.Linear, FactorizedConv2d, FactorizedLinear]


# ---- which layers, and how each one's weight reads as (out, in, taps) ----------------------------------


def prunable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, Unit]:
    """Every Conv2d and Linear (the factorized ones as one unit each), minus the excluded module names."""
    exclude = set(exclude)
    check_layer_names(exclude, [name for name, _ in model.named_modules()][1:], "prune.exclude")
    units: dict[str, Unit] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, Factorized):
            inside.append(name)
        elif not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if name in exclude:
            continue
        conv = m.core if isinstance(m, FactorizedConv2d) else m
        if isinstance(conv, nn.Conv2d):
            if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise MicronetError(f"layer {name!r} is a conv with groups={conv.groups}, padding={conv.padding!r},"
                                    f" padding_mode={conv.padding_mode!r}: EigenDamage factorizes only ungrouped, "
                                    f"integer zero-padded convs; add it to exclude")
        units[name] = m
    return units


def _core(unit: Unit) -> nn.Module:
    return unit.core if isinstance(unit, Factorized) else unit


def _folds_bias(unit: Unit) -> bool:
    """A plain Linear's bias joins its weight as a ones input column (Wave's use_bias)."""
    return isinstance(unit, nn.Linear) and unit.bias is not None


def _core_matrix(unit: Unit) -> torch.Tensor:
    """The weight K-FAC sees, as (out, in, taps); a plain Linear's bias is its last input column."""
    core = _core(unit)
    w = core.weight.detach()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    if _folds_bias(unit):
        w = torch.cat([w, unit.bias.detach().reshape(-1, 1, 1)], 1)
    return w


def _input_map(unit: Unit) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W, b): what maps the layer's input x to the core's input space (W x + b); identity for a plain layer,
    [I; 0] and e_last for a plain Linear with a bias (the ones coordinate)."""
    if isinstance(unit, Factorized):
        w = unit.input.weight.detach()
        b = unit.input.bias
        return w.reshape(w.shape[0], -1), None if b is None else b.detach()
    w = unit.weight
    cin = w.shape[1]
    eye = torch.eye(cin, device=w.device, dtype=w.dtype)
    if not _folds_bias(unit):
        return eye, None
    b = torch.zeros(cin + 1, device=w.device, dtype=w.dtype)
    b[-1] = 1
    return torch.cat([eye, torch.zeros(1, cin, device=w.device, dtype=w.dtype)]), b


def _output_map(unit: Unit) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(unit, Factorized):
        w = unit.output.weight.detach()
        b = unit.output.bias
        return w.reshape(w.shape[0], -1), None if b is None else b.detach()
    w = unit.weight
    bias = None if _folds_bias(unit) or unit.bias is None else unit.bias.detach()
    return torch.eye(w.shape[0], device=w.device, dtype=w.dtype), bias


# ---- K-FAC statistics ------------------------------------------------------------------------------------


@dataclass
class LayerFactors:
    """Kronecker factors of one layer's Fisher. A and G are undamped; the eigenbasis is of the damped ones."""

    kind: str  # "conv" or "linear"
    A: torch.Tensor  # (in, in) input covariance summed over positions and kernel taps, per example
    G: torch.Tensor  # (out, out) output-gradient covariance, per example, averaged over positions
    Q_A: Optional[torch.Tensor] = None  # (in, in) eigenvectors as columns
    Q_G: Optional[torch.Tensor] = None
    l_A: Optional[torch.Tensor] = None  # eigenvalues, ascending
    l_G: Optional[torch.Tensor] = None
    s: Optional[torch.Tensor] = None  # (out, in, taps) eigenvalues of the Fisher in the Kronecker eigenbasis


@dataclass
class KFAC:
    layers: dict[str, LayerFactors]
    batches: int  # batches this process averaged
    examples: int  # examples behind the factors, over all processes
    correction_examples: int = 0  # examples behind s, over all processes
    seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _collection_mode(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Eval mode, or train mode with the BN running statistics put back afterwards; modes restored."""
    modes = {m: m.training for m in model.modules()}
    bn_buffers = [
        (buf, buf.detach().clone())
        for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]
    model.train(train_mode)
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, saved in bn_buffers:
                buf.copy_(saved)
        for m, training in modes.items():
            m.training = training


class _Capture:
    """Hooks on each unit's core for one forward/backward pass. Forward: hand the core's input to `on_input`
    (its A contribution) or keep it for `on_grad`. Backward: hand (input, output gradient) to `on_grad` as soon
    as the gradient exists, so no layer's gradient outlives its own use."""

    def __init__(self, units: dict[str, Unit], on_grad: Callable[[str, Optional[torch.Tensor], torch.Tensor], None],
                 on_input: Optional[Callable[[str, nn.Module, torch.Tensor], None]] = None):
        self.units, self.on_grad, self.on_input = units, on_grad, on_input
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.done: set[str] = set()
        self.handles = [_core(u).register_forward_hook(self._hook(n)) for n, u in units.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in self.outputs:
                raise MicronetError(f"layer {name!r} runs more than once per forward pass: K-FAC needs one "
                                    f"call per layer; add it to exclude")
            self.outputs[name] = output
            x = inputs[0].detach()
            if _folds_bias(self.units[name]):
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
            if self.on_input is None:
                self.inputs[name] = x
            else:
                with torch.no_grad():
                    self.on_input(name, module, x)
            output.register_hook(lambda g: self._grad(name, g))

        return hook

    def _grad(self, name: str, g: torch.Tensor) -> None:
        with torch.no_grad():
            self.on_grad(name, self.inputs.pop(name, None), g.detach())
        self.done.add(name)

    def backward(self, loss: torch.Tensor, x: torch.Tensor) -> None:
        """Differentiate down to the network input `x` (requires_grad): every layer's output gradient passes
        through the hooks and no weight gradient is computed or stored."""
        for n, out in self.outputs.items():
            if out._version != 0:
                raise MicronetError(f"the output of layer {n!r} is modified in place (an inplace activation?): "
                                    f"its gradient cannot be read; use inplace=False or exclude the layer")
        self.outputs.clear()
        torch.autograd.grad(loss, x)
        if missing := [n for n in self.units if n not in self.done]:
            raise MicronetError(f"layers {missing[:3]} got no gradient from the loss (unused, or not downstream "
                                f"of the input); add them to exclude")
        self.inputs.clear()
        self.done.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _patch_counts(conv: nn.Conv2d, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """How many (output position, kernel tap) pairs read each input pixel: summing x x^T over unfolded patches
    equals weighting each pixel's x x^T by this count, without materializing the k*k-times larger patches."""
    ones = like.new_ones(1, 1, height, width)
    args = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return F.fold(F.unfold(ones, **args), (height, width), **args)


def _input_covariance(core: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A for one batch: sum over positions (and kernel taps) of x x^T, divided by the batch size."""
    n = x.shape[0]
    x = x.float()
    if isinstance(core, nn.Conv2d):
        plain = core.kernel_size == (1, 1) and core.stride == (1, 1) and core.padding == (0, 0)
        weighted = x if plain else x * _patch_counts(core, x.shape[2], x.shape[3], x)
        cols = x.transpose(0, 1).reshape(x.shape[1], -1)
        return weighted.transpose(0, 1).reshape(x.shape[1], -1) @ cols.t() / n
    a = x.reshape(-1, x.shape[-1])
    return a.t() @ a / n


def _gradient_covariance(g: torch.Tensor) -> torch.Tensor:
    """G for one batch, from the gradient of the batch-mean loss: (g^T g) * n / positions, as Wave scaled it
    (= the per-example gradient covariance averaged over examples and positions)."""
    n = g.shape[0]
    g = g.float()
    if g.dim() == 4:
        positions = g.shape[2] * g.shape[3]
        cols = g.transpose(0, 1).reshape(g.shape[1], -1)
    else:
        positions = g[0].numel() // g.shape[-1]
        cols = g.reshape(-1, g.shape[-1]).t()
    return cols @ cols.t() * n / positions


def _batches(loader: Iterable, batches: Optional[int]) -> Iterator[tuple[int, Any]]:
    for i, batch in enumerate(loader):
        if batches is not None and i >= batches:
            return
        yield i, batch


def _labels(logits: torch.Tensor, targets: Optional[torch.Tensor], fisher: str,
            generator: torch.Generator) -> torch.Tensor:
    if fisher == "true":
        probs = logits.detach().float().softmax(1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if targets is None:
        raise MicronetError("fisher='empirical' needs a loader that yields (inputs, labels)")
    return targets


def _split(batch: Any, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (tuple, list)):
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    else:
        x, y = batch, None
    return x.to(device, non_blocking=True), None if y is None else y.to(device, non_blocking=True)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_kfac(
    model: nn.Module,
    loader: Iterable,
    device: Union[torch.device, str],
    batches: Optional[int] = None,
    *,
    exclude: Iterable[str] = (),
    fisher: str = "true",
    train_mode: bool = False,
    seed: int = 0,
) -> KFAC:
    """K-FAC factors, their eigenbases and corrected eigenvalues for every prunable layer of `model` (already
    on `device`), over `batches` batches of `loader` (all of it by default).

    fisher "true" samples each label from the model's softmax (Wave); "empirical" uses the loader's labels.
    Under torch.distributed every process passes its own shard: A, G and s are averaged over the processes
    and the eigenbases are rank 0's, so every process prunes identically."""
    if fisher not in ("true", "empirical"):
        raise MicronetError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    device = torch.device(device)
    units = prunable_layers(model, exclude)
    if not units:
        raise MicronetError("no conv or linear layer left to prune (check exclude)")
    rank, world = _world()
    generator = torch.Generator(device=device).manual_seed(seed + rank)
    cuda = [device] if device.type == "cuda" else []

    start = time.perf_counter()
    factors: dict[str, LayerFactors] = {}
    batch_A: dict[str, torch.Tensor] = {}
    batch_G: dict[str, torch.Tensor] = {}

    def on_input(name: str, core: nn.Module, x: torch.Tensor) -> None:
        batch_A[name] = _input_covariance(core, x)

    def on_grad(name: str, _x: Optional[torch.Tensor], g: torch.Tensor) -> None:
        batch_G[name] = _gradient_covariance(g)

    first: Optional[tuple[torch.Tensor, torch.Tensor, Any]] = None
    examples = seen = 0
    capture = _Capture(units, on_grad, on_input)
    try:
        with _collection_mode(model, train_mode):
            for i, batch in _batches(loader, batches):
                x, y = _split(batch, device)
                x = x.detach().requires_grad_(True)  # differentiate down to it, never into the weights
                rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda])
                logits = model(x)
                labels = _labels(logits, y, fisher, generator)
                if first is None:
                    first = (x.detach(), labels, rng)
                capture.backward(F.cross_entropy(logits, labels), x)
                for name, unit in units.items():
                    A, G = batch_A.pop(name), batch_G.pop(name)
                    if name not in factors:
                        factors[name] = LayerFactors("conv" if isinstance(_core(unit), nn.Conv2d) else "linear", A, G)
                    else:
                        f = factors[name]
                        f.A.mul_(EMA).add_(A, alpha=1 - EMA)
                        f.G.mul_(EMA).add_(G, alpha=1 - EMA)
                examples += x.shape[0]
                seen = i + 1
    finally:
        capture.remove()
    if first is None:
        raise MicronetError("the K-FAC loader yielded no batch")
    counts = torch.tensor([examples], dtype=torch.float64, device=device)
    if world > 1:
        for f in factors.values():
            dist.all_reduce(f.A)
            dist.all_reduce(f.G)
            f.A /= world
            f.G /= world
        dist.all_reduce(counts)
    stats = KFAC(factors, seen, int(counts.item()))
    stats.seconds["factors"] = time.perf_counter() - start

    start = time.perf_counter()
    eigendecompose(stats)
    stats.seconds["eigendecomposition"] = time.perf_counter() - start

    start = time.perf_counter()
    _correct_eigenvalues(model, units, stats, first, train_mode, cuda)
    stats.seconds["correction"] = time.perf_counter() - start
    return stats


def eigendecompose(stats: KFAC, damping: float = DAMPING) -> None:
    """Damp A and G by pi-split Tikhonov (pi = (tr A / dim A) / (tr G / dim G); A + sqrt(lambda pi) I,
    G + sqrt(lambda / pi) I) and take their eigenbases. Damping shifts eigenvalues only, so it matters for
    the uncorrected eigenvalues l_G x l_A, not for the EKFAC-corrected s."""
    _, world = _world()
    for f in stats.layers.values():
        pi = ((torch.trace(f.A) + EPS) / f.A.shape[0]) / ((torch.trace(f.G) + EPS) / f.G.shape[0])
        eye_a = torch.eye(f.A.shape[0], device=f.A.device, dtype=f.A.dtype)
        eye_g = torch.eye(f.G.shape[0], device=f.G.device, dtype=f.G.dtype)
        f.l_A, f.Q_A = torch.linalg.eigh(f.A + torch.sqrt(damping * pi) * eye_a)
        f.l_G, f.Q_G = torch.linalg.eigh(f.G + torch.sqrt(damping / pi) * eye_g)
        f.l_A.clamp_(min=EPS)
        f.l_G.clamp_(min=EPS)
        if world > 1:  # eigenvectors are unique only up to sign and rotation within repeated eigenvalues
            for t in (f.Q_A, f.Q_G, f.l_A, f.l_G):
                dist.broadcast(t, src=0)


def _correct_eigenvalues(model: nn.Module, units: dict[str, Unit], stats: KFAC,
                         first: tuple[torch.Tensor, torch.Tensor, Any], train_mode: bool,
                         cuda: list[torch.device]) -> None:
    """EKFAC: s = E_n[(Q_G^T grad_n Q_A)^2] over the first batch's per-example gradients, from a replay of
    that batch (same inputs, labels and RNG state, so ShakeDrop draws the same in train mode)."""
    x, labels, (cpu_state, cuda_states) = first
    x = x.detach().requires_grad_(True)

    def on_grad(name: str, inputs: Optional[torch.Tensor], g: torch.Tensor) -> None:
        f = stats.layers[name]
        f.s = _rotated_gradient_squares(_core(units[name]), inputs, g, f.Q_A, f.Q_G)

    capture = _Capture(units, on_grad)
    try:
        with _collection_mode(model, train_mode), torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(cpu_state)
            for d, state in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(state, d)
            capture.backward(F.cross_entropy(model(x), labels), x)
    finally:
        capture.remove()
    n = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
    _, world = _world()
    if world > 1:
        for f in stats.layers.values():
            dist.all_reduce(f.s)
        dist.all_reduce(n)
    for f in stats.layers.values():
        f.s.div_(float(n.item())).clamp_(min=EPS)
    stats.correction_examples = int(n.item())


def _rotated_gradient_squares(core: nn.Module, x: torch.Tensor, g: torch.Tensor, Q_A: torch.Tensor,
                              Q_G: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Sum over examples of (Q_G^T grad_n Q_A)^2 as (out, in, taps), where grad_n = n * g_n^T x_n is example
    n's own weight gradient (g is the gradient of the batch-mean loss). Rotating x and g first turns it into
    one batched matmul per chunk of examples."""
    n = x.shape[0]
    x, g = x.float(), g.float()
    if isinstance(core, nn.Conv2d):
        x = torch.einsum("nchw,cj->njhw", x, Q_A)
        g = torch.einsum("nop,oi->nip", g.flatten(2), Q_G)  # (n, out, positions)
        args = dict(kernel_size=core.kernel_size, dilation=core.dilation, padding=core.padding, stride=core.stride)
        taps = core.kernel_size[0] * core.kernel_size[1]
    else:
        x = (x.reshape(n, -1, x.shape[-1]) @ Q_A).transpose(1, 2)  # (n, in, positions)
        g = (g.reshape(n, -1, g.shape[-1]) @ Q_G).transpose(1, 2)  # (n, out, positions)
        taps = 1
    out, inp = Q_G.shape[1], Q_A.shape[1]
    total = x.new_zeros(out, inp * taps)
    step = max(1, chunk_elements // max(1, out * inp * taps))
    pointwise = not isinstance(core, nn.Conv2d) or (
        core.kernel_size == (1, 1) and core.stride == (1, 1) and core.padding == (0, 0))
    for i in range(0, n, step):
        cols = x[i : i + step].flatten(2) if pointwise else F.unfold(x[i : i + step], **args)
        grad = torch.bmm(g[i : i + step], cols.transpose(1, 2)) * n  # (chunk, out, in * taps)
        total += grad.square().sum(0)
    return total.reshape(out, inp, taps)


# ---- saliency and selection -----------------------------------------------------------------------------


def layer_saliency(unit: Unit, f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(M', S): the weight in the eigenbasis, (out, in, taps), and the damage s * M'^2 summed over taps,
    (out, in); row sums score output eigen-directions, column sums input ones."""
    w = _core_matrix(unit).float()
    if f.s is None or f.Q_A is None or f.s.shape != w.shape:
        raise MicronetError(f"K-FAC statistics of shape {None if f.s is None else tuple(f.s.shape)} do not fit "
                            f"the layer's weight {tuple(w.shape)}: collect them again after changing the model")
    rotated = torch.einsum("oi,oct,cj->ijt", f.Q_G, w, f.Q_A)
    return rotated, (f.s * rotated.square()).sum(-1)


def select_removals(saliencies: list[torch.Tensor], rate: float, max_layer_rate: float,
                    count: Optional[int] = None) -> list[torch.Tensor]:
    """Boolean removal masks for groups of scores (a layer's rows, a layer's columns): the int(rate * N)
    smallest of all N scores (or the `count` smallest), except that no group loses more than
    int(max_layer_rate * size) entries and every group keeps one. Equal scores go in the order given, so a
    smaller count removes a subset of what a larger one removes."""
    if not 0.0 <= rate < 1.0 or not 0.0 <= max_layer_rate < 1.0:
        raise MicronetError(f"prune rates must be in [0, 1): step rate {rate}, max layer rate {max_layer_rate}")
    sizes = torch.tensor([s.numel() for s in saliencies])
    values = torch.cat([s.detach().flatten().double().cpu() for s in saliencies])
    if not torch.isfinite(values).all():
        raise MicronetError("EigenDamage saliencies are not finite (diverged model or statistics)")
    group = torch.repeat_interleave(torch.arange(len(saliencies)), sizes)
    cap = torch.minimum((max_layer_rate * sizes.double()).floor().long(), sizes - 1)
    k = int(rate * values.numel()) if count is None else count
    order = torch.argsort(values, stable=True)  # ascending
    by_group = torch.argsort(group[order], stable=True)  # ascending value within each group
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_group = torch.empty_like(group)
    rank_in_group[order[by_group]] = torch.arange(values.numel()) - starts[group[order[by_group]]]
    allowed = (rank_in_group < cap[group])[order]
    removed_sorted = allowed & (torch.cumsum(allowed.long(), 0) <= k)
    removed = torch.empty_like(removed_sorted)
    removed[order] = removed_sorted
    return list(removed.split(sizes.tolist()))


# ---- the bring-back pool ----------------------------------------------------------------------------------


class BringBackPool:
    """Per layer: how many rows (output directions) and columns (input directions) the last prune step deleted,
    and the damage they carried as a fraction of all saliency, moving-averaged over prune steps (momentum 0.5)."""

    def __init__(self, momentum: float = POOL_MOMENTUM):
        self.momentum = float(momentum)
        self.row_score: dict[str, float] = {}
        self.col_score: dict[str, float] = {}
        self.deleted_rows: dict[str, int] = {}
        self.deleted_cols: dict[str, int] = {}

    def record(self, layer: str, row_score: float, col_score: float, rows: int, cols: int) -> None:
        if layer in self.row_score:
            m = self.momentum
            row_score = m * self.row_score[layer] + (1 - m) * row_score
            col_score = m * self.col_score[layer] + (1 - m) * col_score
        self.row_score[layer], self.col_score[layer] = float(row_score), float(col_score)
        self.deleted_rows[layer], self.deleted_cols[layer] = int(rows), int(cols)

    def total_deleted(self) -> int:
        return sum(self.deleted_rows.values()) + sum(self.deleted_cols.values())

    def allocate(self, back_ratio: float, room: dict[str, tuple[int, int]],
                 generator: Optional[torch.Generator] = None) -> dict[str, tuple[int, int]]:
        """(rows, cols) to add per layer: int(back_ratio * deleted) categorical draws in proportion to the
        scores; a draw that would grow a layer past `room` (rows, cols) is drawn again among the others."""
        names = list(self.row_score)
        scores = torch.tensor([self.row_score[n] for n in names] + [self.col_score[n] for n in names],
                              dtype=torch.float64)
        limit = torch.tensor([room[n][0] for n in names] + [room[n][1] for n in names], dtype=torch.long)
        added = torch.zeros_like(limit)
        remaining = int(back_ratio * self.total_deleted())
        while remaining > 0:
            weights = scores * (added < limit)
            if not weights.sum() > 0:
                break
            draws = torch.multinomial(weights, remaining, replacement=True, generator=generator)
            added += torch.bincount(draws, minlength=len(weights))
            over = (added - limit).clamp(min=0)
            added -= over
            remaining = int(over.sum())
        half = len(names)
        return {n: (int(added[i]), int(added[half + i])) for i, n in enumerate(names)}

    def to_state(self) -> dict[str, Any]:
        """Plain floats and ints (loads with weights_only=True)."""
        return {"momentum": self.momentum, "row_score": dict(self.row_score), "col_score": dict(self.col_score),
                "deleted_rows": dict(self.deleted_rows), "deleted_cols": dict(self.deleted_cols)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "BringBackPool":
        pool = cls(state["momentum"])
        pool.row_score = {k: float(v) for k, v in state["row_score"].items()}
        pool.col_score = {k: float(v) for k, v in state["col_score"].items()}
        pool.deleted_rows = {k: int(v) for k, v in state["deleted_rows"].items()}
        pool.deleted_cols = {k: int(v) for k, v in state["deleted_cols"].items()}
        return pool


# ---- the steps ----------------------------------------------------------------------------------------------


def _build(unit: Unit, input_weight: torch.Tensor, input_bias: Optional[torch.Tensor], core: torch.Tensor,
           output_weight: torch.Tensor, output_bias: Optional[torch.Tensor]) -> nn.Module:
    """A factorized layer with these factors, on the unit's device and dtype. `core` is (out, in, taps)."""
    conv = _core(unit)
    out_rank, in_rank = core.shape[:2]
    biases = dict(input_bias=input_bias is not None, output_bias=output_bias is not None)
    if isinstance(conv, nn.Conv2d):
        new = FactorizedConv2d(input_weight.shape[1], output_weight.shape[0], in_rank, out_rank, conv.kernel_size,
                               conv.stride, conv.padding, conv.dilation, conv.padding_mode, **biases)
    else:
        new = FactorizedLinear(input_weight.shape[1], output_weight.shape[0], in_rank, out_rank, **biases)
    new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    set_factors(new, input_weight, input_bias, core, output_weight, output_bias)
    return new


def _factorized_size(unit: Unit, out_rank: int, in_rank: int, taps: int) -> int:
    """Parameters of the factorized layer `_build` makes of `unit` at these ranks."""
    in_w, in_b = _input_map(unit)
    out_w, out_b = _output_map(unit)
    return (in_rank * (in_w.shape[1] + (in_b is not None)) + out_rank * in_rank * taps + out_w.shape[0] * out_rank
            + (0 if out_b is None else out_b.numel()))


def _count_for_parameters(groups: list[torch.Tensor], sizes: Callable[[list[torch.Tensor]], int], most: int,
                          max_layer_rate: float, max_parameters: int) -> int:
    """The fewest removals (at most `most`) that leave at most max_parameters: the model's size falls as the
    count grows (each count removes a superset of a smaller one's), so bisect it."""
    size = lambda k: sizes(select_removals(groups, 0.0, max_layer_rate, k))  # noqa: E731
    if size(most) > max_parameters:
        return most
    low, high = 0, most
    while low < high:
        mid = (low + high) // 2
        if size(mid) <= max_parameters:
            high = mid
        else:
            low = mid + 1
    return low


def prune_step(
    model: nn.Module,
    stats: KFAC,
    step_rate: float,
    max_layer_rate: float = 0.5,
    pool: Optional[BringBackPool] = None,
    max_parameters: Optional[int] = None,
) -> dict[str, Any]:
    """Remove step_rate of all layers' output and input eigen-directions (lowest saliency first, at most
    max_layer_rate of any layer's rows or columns) and make every layer in `stats` factorized; rotations of an
    already factorized layer are composed with the new ones, so it stays three layers deep. With
    `max_parameters`, remove only as many as bring the model to that size (the last step of a pruning run
    lands on its rate instead of overshooting by up to a whole step). Records the deleted directions in
    `pool`. Returns a JSON-ready report."""
    names = list(stats.layers)
    units = {n: model.get_submodule(n) for n in names}
    before = count_parameters(model)
    rotated, rows, cols = {}, [], []
    with torch.no_grad():
        for name in names:
            rotated[name], saliency = layer_saliency(units[name], stats.layers[name])
            rows.append(saliency.sum(1).double().cpu())
            cols.append(saliency.sum(0).double().cpu())
        groups = [t for pair in zip(rows, cols) for t in pair]
        count = int(step_rate * sum(t.numel() for t in groups))
        if max_parameters is not None:
            taps = {n: rotated[n].shape[-1] for n in names}
            fixed = before - sum(p.numel() for n in names for p in units[n].parameters())

            def sizes(masks: list[torch.Tensor]) -> int:
                return fixed + sum(_factorized_size(units[n], rows[i].numel() - int(masks[2 * i].sum()),
                                                    cols[i].numel() - int(masks[2 * i + 1].sum()), taps[n])
                                   for i, n in enumerate(names))

            count = _count_for_parameters(groups, sizes, count, max_layer_rate, max_parameters)
        removed = select_removals(groups, step_rate, max_layer_rate, count)
        total = float(sum(t.sum() for t in groups)) or 1.0
        removed_values = torch.cat([t[m] for t, m in zip(groups, removed)])
        layers: dict[str, dict[str, int]] = {}
        for i, name in enumerate(names):
            unit, f = units[name], stats.layers[name]
            row_gone, col_gone = removed[2 * i], removed[2 * i + 1]
            keep_rows = _kept_by_saliency(rows[i], row_gone).to(f.Q_G.device)
            keep_cols = _kept_by_saliency(cols[i], col_gone).to(f.Q_A.device)
            q_a = f.Q_A[:, keep_cols]
            q_g = f.Q_G[:, keep_rows]
            in_w, in_b = _input_map(unit)
            out_w, out_b = _output_map(unit)
            dtype = in_w.dtype
            core = rotated[name][keep_rows][:, keep_cols].to(dtype)
            new = _build(
                unit,
                q_a.t().to(dtype) @ in_w,
                None if in_b is None else q_a.t().to(dtype) @ in_b,
                core,
                out_w @ q_g.to(dtype),
                out_b,
            )
            replace_module(model, name, new)
            if pool is not None:
                pool.record(name, float(rows[i][row_gone].sum()) / total, float(cols[i][col_gone].sum()) / total,
                            int(row_gone.sum()), int(col_gone.sum()))
            layers[name] = {"out_rank_before": rows[i].numel(), "in_rank_before": cols[i].numel(),
                            "out_rank": len(keep_rows), "in_rank": len(keep_cols)}
    entries = sum(t.numel() for t in removed)
    gone = int(sum(int(t.sum()) for t in removed))
    return {
        "parameters_before": before,
        "parameters_after": count_parameters(model),
        "entries": entries,
        "entries_removed": gone,
        "entry_rate": gone / entries,
        "threshold": float(removed_values.max()) if gone else None,
        "layers": layers,
    }


def _kept_by_saliency(saliency: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Indices of the kept directions, most salient first (so a layer's last row/column is its weakest)."""
    kept = torch.nonzero(~removed).flatten()
    return kept[torch.argsort(saliency[kept], descending=True, stable=True)]


def _room(unit: Unit) -> tuple[int, int]:
    """How many rows and columns a factorized layer can gain before a rank reaches the full size."""
    full_in = unit.input.weight.shape[1] + (unit.input.bias is not None)
    return unit.output.weight.shape[0] - unit.out_rank, full_in - unit.in_rank


def _copies(last: torch.Tensor, n: int, dim: int, generator: Optional[torch.Generator], noise: float = NOISE,
            shared: bool = False) -> torch.Tensor:
    """n copies of a slice (size 1 along `dim`), each last + noise * |last| * U[0, 1) (Wave's perturbation, which
    nudges every entry upwards), each with its own draw, or with `shared` one draw for all n (Wave's code:
    mhariat/MicroNet@611cfb1 Pruning/utils/prune_utils.py L420-L428, new rows = ones * one perturbed last row, so
    the copies are identical)."""
    shape = list(last.shape)
    shape[dim] = 1 if shared else n
    draw = torch.rand(shape, generator=generator, dtype=torch.float32).to(last.device, last.dtype)
    out = last + noise * last.abs() * draw
    return out.expand(*[n if d == dim else -1 for d in range(out.dim())]).clone() if shared else out


def bring_back_step(
    model: nn.Module,
    pool: BringBackPool,
    back_ratio: float = 0.25,
    generator: Optional[torch.Generator] = None,
    noise: float = NOISE,
    shared_noise: bool = False,
) -> dict[str, Any]:
    """Grow the factorized layers by int(back_ratio * what the last prune step deleted) rows and columns, drawn
    across layers in proportion to the pool's scores (a CPU `generator` makes it reproducible). A new core
    row/column is a perturbed copy of the layer's last (weakest) one (relative `noise`, per copy or, with
    `shared_noise`, one draw per layer and side as Wave), and the rotations gain matching rows/columns the same
    way. A layer grows at most to full rank (its room); what does not fit is drawn again elsewhere. Empties the pool's deleted counts. Returns a JSON-ready report."""
    if not 0.0 <= back_ratio <= 1.0:
        raise MicronetError(f"back_ratio must be in [0, 1], got {back_ratio}")
    units = {}
    for name in pool.row_score:
        try:
            unit = model.get_submodule(name)
        except AttributeError:
            unit = None
        if not isinstance(unit, Factorized):
            raise MicronetError(f"bring-back pool names layer {name!r}, which is not a factorized layer of this model")
        units[name] = unit
    requested = int(back_ratio * pool.total_deleted())
    added = pool.allocate(back_ratio, {n: _room(u) for n, u in units.items()}, generator)
    before = count_parameters(model)
    layers = {}
    with torch.no_grad():
        for name, (n_rows, n_cols) in added.items():
            unit = units[name]
            if n_rows or n_cols:
                replace_module(model, name, _grown(unit, n_rows, n_cols, generator, noise, shared_noise))
            layers[name] = {"rows_added": n_rows, "cols_added": n_cols, "out_rank": unit.out_rank + n_rows,
                            "in_rank": unit.in_rank + n_cols}
    pool.deleted_rows = {n: 0 for n in pool.deleted_rows}
    pool.deleted_cols = {n: 0 for n in pool.deleted_cols}
    return {
        "parameters_before": before,
        "parameters_after": count_parameters(model),
        "entries_requested": requested,
        "entries_added": sum(r + c for r, c in added.values()),
        "layers": layers,
    }


def _grown(unit: Unit, n_rows: int, n_cols: int, generator: Optional[torch.Generator], noise: float = NOISE,
           shared: bool = False) -> nn.Module:
    core = unit.core.weight.detach()
    core = core.reshape(core.shape[0], core.shape[1], -1)
    in_w, in_b = _input_map(unit)
    out_w, out_b = _output_map(unit)
    if n_cols:
        core = torch.cat([core, _copies(core[:, -1:], n_cols, 1, generator, noise, shared)], 1)
        # the input rotation's rows, bias included, are the input directions: [W | b] grows as one matrix
        rows = in_w if in_b is None else torch.cat([in_w, in_b[:, None]], 1)
        rows = torch.cat([rows, _copies(rows[-1:], n_cols, 0, generator, noise, shared)], 0)
        in_w, in_b = (rows, None) if in_b is None else (rows[:, :-1], rows[:, -1])
    if n_rows:
        core = torch.cat([core, _copies(core[-1:], n_rows, 0, generator, noise, shared)], 0)
        out_w = torch.cat([out_w, _copies(out_w[:, -1:], n_rows, 1, generator, noise, shared)], 1)
    return _build(unit, in_w, in_b, core, out_w, out_b)


# ---- Wave's schedule: which step comes next, and at which batch ----------------------------------------------


def next_step_kind(kinds: Sequence[str], compressions: Sequence[float], brings_back: bool = True) -> str:
    """The kind of the next step ("prune" or "bring_back") from the kinds of the steps so far and the compression
    (1 - params/params0) each left. Wave (Pruning/main_prune.py, mhariat/MicroNet@611cfb1, L140-146 and L168-169):
    a prune step sets pool.it odd, so the next one brings back, unless no step has yet left the network smaller
    than it started (`trigger_back` false: pool.it reset to 0), in which case it prunes again; a bring-back step
    sets pool.it even, so a prune follows (improved_eigen_damage_multi.py L429-438)."""
    if len(kinds) != len(compressions):
        raise ValueError(f"{len(kinds)} kinds but {len(compressions)} compressions")
    if not brings_back or not kinds or kinds[-1] == "bring_back":
        return "prune"
    return "bring_back" if any(c > 0 for c in compressions) else "prune"


def step_kinds(compressions: Sequence[float], brings_back: bool = True) -> list[str]:
    """The kinds of steps 1..n when step k leaves compressions[k] (next_step_kind applied step by step)."""
    kinds: list[str] = []
    for k in range(len(compressions)):
        kinds.append(next_step_kind(kinds, compressions[:k], brings_back))
    return kinds


def step_batches(compressions: Sequence[float], rules: Sequence[Any], finetune: int, kfac: int) -> tuple[int, int]:
    """(fine-tune batch, K-FAC batch) once the steps so far left `compressions`: the last of `rules` (objects with
    above, finetune, kfac) whose `above` the largest compression so far exceeds, else the defaults. Sticky, as
    Wave's loaders are rebuilt only the first time a threshold is crossed (main_prune.py L140-160)."""
    reached = max(compressions, default=float("-inf"))
    for rule in rules:
        if reached > rule.above:
            finetune, kfac = rule.finetune, rule.kfac
    return finetune, kfac
