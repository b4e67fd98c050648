"""`make gpu-check`: one command that runs every CUDA path of the project on one GPU in under 8 minutes and
records what it measured, so the first (short) GPU session measures instead of debugging.

Parts, each with a time cap (a part that fails or runs out of time is recorded and the rest still runs):

  pipelines    every pipeline's toy configuration (demo = Wave, kaist, fastai-wrn, uci, dnw) through its real
               stages: the `micronet` commands of its dvc.yaml, in a temporary folder (never the user's pipeline
               folders), with `distributed.device` set to the device and MLflow tracking off
  bench        bench/bench_train.py's throughput cells at the real model sizes for paths (a) workers + PIL +
               fp32, (b) bf16 + channels_last, (c) GPU loader + bf16 + channels_last, (d) = (c) + torch.compile:
               images/s, ratio to (a), peak memory, TFLOP/s (torch's FlopCounterMode) against the bf16 peak
  checks       bf16 and fp32 runs of one toy recipe reach comparable loss; a sparsity mask and a DNW top-k stay
               exact under bf16 + channels_last; a quantized model gives the same logits on the device as on CPU
  distributed  the one-process NCCL DDP path of the training loop, and EigenDamage's K-FAC collection, on
               PyramidNet-272

Writes <out>/results.json and <out>/summary.md (one Markdown table per part) and logs/<pipeline>.log; exits 1
naming the failed checks in one line, 2 without CUDA (unless --device cpu). `--device cpu` runs the same code at
tiny sizes (`--size tiny`, a few minutes); `--size test` is the test suite's (smaller still, ~1 min). On the CPU
the stages run through the same Typer app in this process (an interpreter start per stage would take most of the
time); on CUDA each is a process, as DVC runs it.

    python bench/gpu_check.py [--device cuda|cpu] [--size full|tiny|test] [--out reports/gpu-check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import bench_train  # noqa: E402
from bench_eigendamage import calibrate_batchnorm  # noqa: E402
from bench_train import Net  # noqa: E402
from micronet.errors import MicronetError  # noqa: E402
from micronet.training import Runtime  # noqa: E402

PIPELINES = ("demo", "kaist", "fastai-wrn", "uci", "dnw")
# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets), matched in order against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))
# Tolerances of the checks (also printed in the summary).
# Compiling takes far longer for deep nets (PyramidNet-272: hundreds of layers): the (d) row compiles the quick
# ones first, so the part's time cap leaves out the slow ones rather than everything.
COMPILE_ORDER = ("fastai_wrn22_6", "kaist_micronet_v1", "resnet50_dnw@224", "efficientnet_ex", "pyramidnet272")
COMPILE_MIN_SECONDS = 30  # a compiled cell starts only with this much of the part's time left
LOSS_RTOL = 0.05  # |loss(bf16) - loss(fp32)| <= 5 % of the fp32 loss after the same steps
LOGIT_RTOL = 0.01  # quantized model, fp32 convs (no TF32): max |logit(device) - logit(cpu)| <= 1 % of max |logit(cpu)|


@dataclass(frozen=True)
class Size:
    """How big each part runs. `shrink` None keeps each pipeline's toy.yaml as it is (a few epochs)."""

    nets: dict[str, Net]
    batch: int
    steps: int
    workers: int
    image_size: int
    compile: bool
    caps: dict[str, float]  # seconds per part
    check_images: int  # synthetic images of the checks' runs
    check_epochs: int
    kfac_net: Net
    kfac_batches: int
    kfac_batch: int
    ddp_steps: int
    shrink: Optional[dict[str, int]] = None  # images, epochs, batch (and copies: training-set copies kept)
    in_process: bool = False  # stages through the Typer app in this process instead of subprocesses
    jobs: int = 1  # pipelines run side by side (subprocesses only)
    threads: Optional[int] = None  # torch CPU threads here and in the stages (None: torch's default)


TINY_NETS = bench_train.CPU_NETS
SIZES = {
    "full": Size(bench_train.GPU_NETS, batch=256, steps=8, workers=min(8, os.cpu_count() or 1), image_size=224,
                 compile=True, caps={"pipelines": 150, "bench": 200, "checks": 40, "distributed": 50},
                 check_images=2048, check_epochs=3, kfac_net=Net("pyramidnet272"), kfac_batches=2, kfac_batch=64,
                 ddp_steps=6, jobs=len(PIPELINES)),
    "tiny": Size(TINY_NETS, batch=8, steps=2, workers=1, image_size=32, compile=False,
                 caps={"pipelines": 600, "bench": 240, "checks": 120, "distributed": 120},
                 check_images=256, check_epochs=2, kfac_net=Net("pyramidnet", {"depth": 20, "alpha": 48}),
                 kfac_batches=2, kfac_batch=16, ddp_steps=2, shrink={"images": 60, "epochs": 1, "batch": 20},
                 in_process=True, threads=1),
    "test": Size(TINY_NETS, batch=4, steps=1, workers=0, image_size=32, compile=False,
                 caps={"pipelines": 240, "bench": 120, "checks": 60, "distributed": 60},
                 check_images=64, check_epochs=2, kfac_net=Net("pyramidnet", {"depth": 11, "alpha": 24}),
                 kfac_batches=1, kfac_batch=8, ddp_steps=2,
                 shrink={"images": 40, "epochs": 1, "batch": 10, "copies": 1}, in_process=True, threads=1),
}


class PartTimeout(BaseException):
    """A part's time cap: a BaseException, so the `except Exception` that records a failed stage or cell lets it
    through to the part."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`: a part stops between two Python operations."""
    def expire(*_):
        raise PartTimeout(f"time cap of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- pipelines ---------------------------------------------------------------------------------------------------


def pipeline_params(pipeline: str, device: str, size: Size) -> dict[str, Any]:
    """The pipeline's params.yaml with its toy.yaml applied (as `make demo` does), on `device`, untracked."""
    from stages.params import merge

    folder = REPO / "pipelines" / pipeline
    params = yaml.safe_load((folder / "params.yaml").read_text())
    if (folder / "toy.yaml").is_file():
        merge(params, yaml.safe_load((folder / "toy.yaml").read_text()))
    params["distributed"].update(device=device, nproc_per_node=1)
    if device == "cuda" or size.threads:  # the toys' 2 threads are for a shared CPU box; here the CPUs are shared
        params["distributed"]["threads"] = size.threads or max(1, (os.cpu_count() or 1) // size.jobs)
    params.setdefault("tracking", {})["enabled"] = False
    if size.shrink:
        shrink_params(params, **size.shrink)
    return params


def shrink_params(params: dict[str, Any], images: int, epochs: int, batch: int, copies: int = 0) -> None:
    """Fewer images (and training-set copies), at most `epochs` per training section (an SGDR section keeps one
    per round), few K-FAC batches."""
    data = params["data"]
    if copies and data.get("copies"):
        data["copies"] = data["copies"][:copies]
    if data.get("dataset") == "imagenet":  # synthetic ImageNet counts images per class
        data["synthetic"].update(train=max(2, images // data["synthetic"]["classes"]), test=1)
    else:
        (params.get("synth") or data["synthetic"]).update(train=images, test=images // 2)
    data.update(val_size=images // 4, batch_size=batch, eval_batch_size=images)

    def cap(section: Any) -> None:
        if isinstance(section, dict):
            if isinstance(section.get("epochs"), int):
                rounds = (section.get("schedule") or {}).get("rounds") or 1
                section["epochs"] = max(min(section["epochs"], epochs), rounds)
            for value in section.values():
                cap(value)

    cap(params)
    if "prune" in params:
        params["prune"]["kfac_batches"] = min(params["prune"].get("kfac_batches", 2), 2)


def stage_commands(pipeline: str, params: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(stage, micronet arguments) in dvc.yaml's order, `${section.key}` filled in from params as DVC does."""
    stages = yaml.safe_load((REPO / "pipelines" / pipeline / "dvc.yaml").read_text())["stages"]

    def value(match: re.Match) -> str:
        node: Any = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    commands = []
    for name, stage in stages.items():
        args = shlex.split(re.sub(r"\$\{([\w.]+)\}", value, stage["cmd"]))
        if args[0] != "micronet":
            raise MicronetError(f"pipelines/{pipeline}/dvc.yaml: stage {name} runs {args[0]!r}, not micronet")
        commands.append((name, args[1:]))
    return commands


def run_stage(args: list[str], cwd: Path, log: Path, in_process: bool, timeout: float) -> int:
    """One `micronet` command, as DVC runs it (a process in the pipeline folder), or through the same Typer app
    in this process (the suite's size: no interpreter start per stage). Output goes to `log`."""
    with open(log, "a") as out:
        out.write(f"\n$ micronet {shlex.join(args)}\n")
        out.flush()
        if not in_process:
            env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            try:
                return subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=cwd, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
            except subprocess.TimeoutExpired:
                out.write("gpu-check: stage stopped at the pipelines' time cap\n")
                return 124
        from micronet.cli import app

        here = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                app(args, prog_name="micronet", standalone_mode=False)
            return 0
        except MicronetError as exc:
            out.write(f"error: {exc}\n")
            return 2
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:
            out.write(traceback.format_exc())
            return 1
        finally:
            os.chdir(here)


def run_pipeline(pipeline: str, device: str, size: Size, logs: Path, deadline: float, row: dict[str, Any]) -> None:
    """Fills `row` as the stages finish, so a pipeline stopped at the time cap still shows how far it got."""
    started = time.perf_counter()
    row.update(pipeline=pipeline, stages=[], accuracy=None, score=None, ok=False)
    log = logs / f"{pipeline}.log"
    log.write_text("")
    try:
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{pipeline}-") as tmp:
            params = pipeline_params(pipeline, device, size)
            (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            for stage, args in stage_commands(pipeline, params):
                rc = run_stage(args, Path(tmp), log, size.in_process, deadline - time.perf_counter())
                if rc != 0:
                    tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
                    row["error"] = f"stage {stage} exited {rc}: {tail[0][:200] if tail else ''} (see {log})"
                    break
                row["stages"].append(stage)
            else:
                score = json.loads((Path(tmp) / "metrics/score.json").read_text())
                row.update(accuracy=score["accuracy"], score=score["score"], ok=True)
    except PartTimeout:
        row["error"] = f"stopped at the time cap (see {log})"
        raise
    except Exception as exc:  # a bad dvc.yaml or params file: the row says so, the other pipelines still run
        row["error"] = first_line(exc)
    finally:
        row["seconds"] = time.perf_counter() - started


def part_pipelines(device: torch.device, size: Size, out: Path, deadline: float, rows: list) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows += [{"pipeline": p} for p in PIPELINES]
    if size.in_process:  # the Typer app works in the current folder: one pipeline at a time
        for pipeline, row in zip(PIPELINES, rows):
            run_pipeline(pipeline, device.type, size, logs, deadline, row)
        return
    with ThreadPoolExecutor(size.jobs) as pool:
        list(pool.map(lambda a: run_pipeline(a[0], device.type, size, logs, deadline, a[1]), zip(PIPELINES, rows)))


# ---- training throughput ---------------------------------------------------------------------------------------


def bf16_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def training_flops(net: Net, device: torch.device, image_size: int) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    model = bench_train.build(net).to(device)
    x = torch.randn(2, 3, image_size if net.imagenet else 32, image_size if net.imagenet else 32, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops() / 2


def part_bench(device: torch.device, size: Size, out: Path, deadline: float, rows: list) -> None:
    """Every path x net cell that fits before the deadline; later cells are recorded as skipped."""
    cuda = device.type == "cuda"
    runtime = Runtime(device)
    paths = bench_train.paths(cuda, False)
    if size.compile:
        paths["(d) = (c) + compile"] = (*paths[list(paths)[-1]][:3], True)
    peak = bf16_peak(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as tmp:
        bench_train.write_data(Path(tmp), size.steps * size.batch + size.batch, size.image_size)
        base: dict[str, float] = {}
        flops: dict[str, float] = {}
        for path_name, path in paths.items():
            compiled = path[3]
            order = list(size.nets)
            if compiled:
                order.sort(key=lambda n: COMPILE_ORDER.index(n) if n in COMPILE_ORDER else 0)
            for label in order:
                net = size.nets[label]
                row: dict[str, Any] = {"path": path_name, "net": label, "ok": True}
                rows.append(row)
                if time.perf_counter() > deadline - (COMPILE_MIN_SECONDS if compiled else 0):
                    row["note"] = "skipped: time cap"
                    continue
                try:
                    if label not in flops:
                        flops[label] = training_flops(net, device, size.image_size)
                    row.update(bench_train.cell(net, path, Path(tmp), runtime, batch=size.batch,
                                                workers=size.workers, steps=size.steps, image_size=size.image_size))
                except PartTimeout:
                    row["note"] = "stopped: time cap"
                    raise
                except Exception as exc:
                    if time.perf_counter() > deadline:  # e.g. the cap's alarm inside torch.compile, re-raised as
                        row["note"] = "stopped: time cap"  # the compiler's own error
                        continue
                    row.update(ok=False, error=first_line(exc))
                    (out / "logs").mkdir(parents=True, exist_ok=True)
                    with open(out / "logs" / "bench.log", "a") as log:
                        log.write(f"{path_name} {label}\n{traceback.format_exc()}\n")
                    continue
                if path_name.startswith("(a)"):
                    base[label] = row["images_s"]
                row["ratio_to_a"] = row["images_s"] / base[label] if label in base else None
                row["tflops"] = row["images_s"] * flops[label] / 1e12
                row["of_bf16_peak"] = row["tflops"] / peak if peak else None
                if net.imagenet and path[0] == "gpu":
                    row["note"] = "data on workers: the GPU loader is CIFAR-only"


# ---- checks -------------------------------------------------------------------------------------------------------


def toy_setup(size: Size, root: Path):
    """The demo pipeline's recipe and model (Wave at toy scale) on synthetic data, no validation split."""
    from micronet.config import load_params
    from micronet.data import build_splits, write_synthetic_cifar100

    params = load_params(REPO / "pipelines/demo/params.yaml")
    write_synthetic_cifar100(root, size.check_images, 10, seed=0)
    data = params.data.model_copy(update={"root": str(root), "val_size": 0, "workers": 0,
                                          "batch_size": min(64, size.check_images // 4)})
    return params, build_splits(data).train, data.batch_size


def toy_model(params) -> torch.nn.Module:
    from micronet.nets import create_model

    torch.manual_seed(0)
    return create_model(params.model.arch, **params.model.args)


def check_bf16_loss(device: torch.device, size: Size, root: Path) -> dict[str, Any]:
    """The same toy recipe and seed in fp32 (contiguous) and at the device default (bf16 + channels_last on CUDA)."""
    from micronet.runner import seed_everything
    from micronet.training import fit

    params, train, batch = toy_setup(size, root)
    losses = {}
    for name, update in (("fp32", {"precision": "fp32", "channels_last": False}),
                         ("auto", {"precision": "auto", "channels_last": None})):
        seed_everything(0)  # the same weights, batches and augmentation draws
        recipe = params.train.model_copy(update={"epochs": size.check_epochs, **update})
        result = fit(toy_model(params), train, None, recipe, Runtime(device), batch_size=batch, seed=0)
        losses[name] = result.history[-1]["train_loss"]
    gap = abs(losses["auto"] - losses["fp32"]) / losses["fp32"]
    label = "bf16 + channels_last" if device.type == "cuda" else "auto (fp32 on CPU)"
    return {"check": "bf16 vs fp32 loss", "ok": gap <= LOSS_RTOL,
            "measured": f"train loss after {size.check_epochs} epochs: fp32 {losses['fp32']:.4f}, "
                        f"{label} {losses['auto']:.4f} (gap {gap:.2%})",
            "tolerance": f"gap <= {LOSS_RTOL:.0%} of the fp32 loss"}


def check_masks(device: torch.device, size: Size, root: Path) -> list[dict[str, Any]]:
    """Fine-tune with a 50 % sparsity mask, and train with DNW's top-10 %, in bf16 + channels_last: the masked
    weights stay exactly zero and every DNW layer keeps exactly its top-k count."""
    from micronet.compression.dnw import apply_dnw, density_report, kept_count
    from micronet.compression.sparsity import apply_masks, global_magnitude_masks, prunable_weights
    from micronet.training import fit

    params, train, batch = toy_setup(size, root)
    bf16 = "bf16" if device.type == "cuda" else "fp32"
    recipe = params.train.model_copy(update={"epochs": 1, "precision": bf16, "channels_last": True})
    model = toy_model(params)
    masks = global_magnitude_masks(prunable_weights(model), 0.5)
    apply_masks(model, masks)
    fit(model, train, None, recipe, Runtime(device), batch_size=batch, masks=masks)
    weights = dict(model.named_parameters())
    leaked = sum(int(weights[n].detach().cpu()[m == 0].count_nonzero()) for n, m in masks.items())
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    rows = [{"check": "sparsity mask exact (bf16, channels_last)", "ok": leaked == 0,
             "measured": f"{leaked} of {pruned:,} masked weights nonzero after 1 epoch", "tolerance": "0"}]

    model = toy_model(params)
    layers = apply_dnw(model, 0.1)
    fit(model, train, None, recipe, Runtime(device), batch_size=batch)
    report = density_report(model.cpu())
    wrong = [n for n in layers if report[n]["nonzero"] != kept_count(report[n]["numel"], 0.1)]
    rows.append({"check": "DNW top-k exact (bf16, channels_last)", "ok": not wrong,
                 "measured": f"{len(layers) - len(wrong)} of {len(layers)} layers keep exactly their top 10 %"
                             + (f"; wrong: {', '.join(wrong[:3])}" if wrong else ""),
                 "tolerance": "every layer exact"})
    return rows


def check_quantized(device: torch.device, size: Size) -> dict[str, Any]:
    """Wave's quantization (fold BN, 9-bit weights, 12-bit activations) of the toy model on CPU, saved and rebuilt
    as the score stage does, then run on CPU and on the device."""
    from micronet.checkpoint import build_from_checkpoint, make_checkpoint
    from micronet.compression.quantize import quantize_model
    from micronet.config import load_params
    from micronet.scoring import foldable_batchnorms

    params = load_params(REPO / "pipelines/demo/params.yaml")
    q = params.quantize
    model = toy_model(params)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(64, 3, 32, 32, generator=g)
    calibrate_batchnorm(model, images)
    quantize_model(model, foldable_batchnorms(model, (3, 32, 32)), [images[:32], images[32:]],
                   weight_bits=q.weight_bits, activation_bits=q.activation_bits, method=q.range,
                   weight_sigmas=q.weight_sigmas, activation_sigmas=q.activation_sigmas, momentum=q.momentum,
                   points=q.activation_points)
    checkpoint = make_checkpoint(model, params.model.arch, params.model.args, stage="quantize")
    on_device = build_from_checkpoint(checkpoint).to(device).eval()
    with torch.no_grad():
        cpu = build_from_checkpoint(checkpoint).eval()(images)
        gaps = {}
        for name, tf32 in (("fp32", False), ("default", torch.backends.cudnn.allow_tf32)):
            saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32  # TF32 convs (torch's default on CUDA) round to 10-bit mantissas
            try:
                logits = on_device(images.to(device)).cpu()
            finally:
                torch.backends.cudnn.allow_tf32 = saved
            gaps[name] = (float((logits - cpu).abs().max()) / float(cpu.abs().max()),
                          float((logits.argmax(1) == cpu.argmax(1)).float().mean()))
    (gap, agree), (tf32_gap, tf32_agree) = gaps["fp32"], gaps["default"]
    return {"check": f"quantized logits {device.type} vs cpu", "ok": gap <= LOGIT_RTOL,
            "measured": f"fp32 convs: max abs diff {gap:.2e} of max abs logit, same top-1 {agree:.0%}; torch's default "
                        f"convs (TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}): {tf32_gap:.2e}, "
                        f"{tf32_agree:.0%} ({len(images)} images, random-init model)",
            "tolerance": f"fp32 convs: max abs diff <= {LOGIT_RTOL:.0%} of max abs logit"}


def part_checks(device: torch.device, size: Size, out: Path, deadline: float, rows: list) -> None:
    checks: list[tuple[str, Callable[[Path], Any]]] = [
        ("bf16 vs fp32 loss", lambda root: check_bf16_loss(device, size, root)),
        ("masks exact", lambda root: check_masks(device, size, root)),
        (f"quantized logits {device.type} vs cpu", lambda root: check_quantized(device, size)),
    ]
    for name, run in checks:
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
                result = run(Path(tmp))
        except PartTimeout:
            raise
        except Exception as exc:
            result = {"check": name, "ok": False, "error": first_line(exc)}
        for row in result if isinstance(result, list) else [result]:
            rows.append({**row, "seconds": time.perf_counter() - started})


# ---- one-process DDP and K-FAC ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OneProcessGroup(Runtime):
    """World size 1 inside an initialized process group, taken as distributed: `fit` runs its DDP branch
    (DistributedSampler, the DDP wrapper, all-reduces, barriers) as each rank of a torchrun job does."""

    @property
    def distributed(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_fit(device: torch.device, size: Size, root: Path) -> dict[str, Any]:
    """setup_runtime as under torchrun (NCCL on CUDA, gloo on CPU), then a few DDP steps of the real network."""
    from micronet.config import DistributedConfig, OptimConfig
    from micronet.data import build_splits, write_synthetic_cifar100
    from micronet.training import broadcast_object, fit, setup_runtime, teardown_runtime
    import torch.distributed as dist

    batch = size.kfac_batch
    write_synthetic_cifar100(root / "cifar", batch * (size.ddp_steps + 1), batch, seed=0)
    params = bench_train.params_for(root, "workers", batch, 0, False)
    splits = build_splits(params.data.model_copy(update={"val_size": batch}))
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    runtime = None
    try:
        started = time.perf_counter()
        plain = setup_runtime(DistributedConfig(device=device.type))
        runtime = OneProcessGroup(plain.device, plain.rank, plain.world_size)
        backend = dist.get_backend()
        assert broadcast_object({"step": 1}, runtime) == {"step": 1}
        recipe = OptimConfig(epochs=1, lr=0.05, max_steps_per_epoch=size.ddp_steps)
        result = fit(bench_train.build(size.kfac_net), splits.train, splits.val, recipe, runtime, batch_size=batch)
        synchronize(runtime.device)
        seconds = time.perf_counter() - started
    finally:
        if runtime is not None:
            teardown_runtime(runtime)
        elif dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    loss = result.history[-1]["train_loss"]
    return {"what": f"DDP fit, 1 process ({backend})", "ok": bool(torch.isfinite(torch.tensor(loss))),
            "seconds": seconds, "detail": f"{size.ddp_steps} steps x {batch} + validation of {batch}, "
                                          f"train loss {loss:.3f}"}


def kfac(device: torch.device, size: Size) -> dict[str, Any]:
    """EigenDamage's statistics as the prune stage collects them: factors, eigendecompositions, correction."""
    from micronet.compression.eigendamage import collect_kfac

    model = bench_train.build(size.kfac_net).to(device)
    g = torch.Generator().manual_seed(1)
    n = size.kfac_batch
    data = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g))
            for _ in range(size.kfac_batches)]
    calibrate_batchnorm(model, data[0][0].to(device))
    started = time.perf_counter()
    stats = collect_kfac(model, data, device)
    synchronize(device)
    seconds = time.perf_counter() - started
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in stats.seconds.items())
    finite = all(bool(torch.isfinite(f.A).all() and torch.isfinite(f.G).all()) for f in stats.layers.values())
    return {"what": "EigenDamage K-FAC collection", "ok": finite, "seconds": seconds,
            "detail": f"{len(stats.layers)} layers, {size.kfac_batches} x {size.kfac_batch} images: {phases}"}


def part_distributed(device: torch.device, size: Size, out: Path, deadline: float, rows: list) -> None:
    for what, run in ((f"DDP fit, 1 process ({'nccl' if device.type == 'cuda' else 'gloo'})", ddp_fit),
                      ("EigenDamage K-FAC collection", lambda d, s, _root: kfac(d, s))):
        try:
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
                row = run(device, size, Path(tmp))
        except PartTimeout:
            raise
        except Exception as exc:
            row = {"what": what, "ok": False, "error": first_line(exc)}
        rows.append({"net": size.kfac_net.arch, **row})


# ---- report -------------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table of `rows`: (header, key, format spec) per column; a row's error or note goes last."""
    head = [h for h, _, _ in columns] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        status = "ok" if row.get("ok") else f"FAILED: {row.get('error', '')}"
        if row.get("note"):
            status = f"{status}; {row['note']}"
        cells = [fmt(row.get(key), spec) for _, key, spec in columns] + [status]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    parts = results["parts"]
    peak = results["bf16_peak_tflops"]
    text = [f"# gpu-check: {results['device']} ({results['size']} size), {results['date']}", "",
            f"torch {results['torch']}; {results['seconds']:.0f} s in all; "
            f"{'all checks passed' if not results['failed'] else 'FAILED: ' + '; '.join(results['failed'])}", ""]
    sections = [
        ("pipelines", "Pipelines (toy configurations through their real stages)",
         [("pipeline", "pipeline", ""), ("stages run", "stages", ""), ("accuracy", "accuracy", ".4f"),
          ("score", "score", ".4g"), ("seconds", "seconds", ".1f")]),
        ("bench", "Training throughput (bench/bench_train.py cells; bf16 peak "
         f"{f'{peak:.0f} TFLOP/s dense' if peak else 'unknown for this device'})",
         [("path", "path", ""), ("net", "net", ""), ("images/s", "images_s", ",.1f"),
          ("ratio to (a)", "ratio_to_a", ".2f"), ("peak GiB", "peak_gib", ".2f"), ("TFLOP/s", "tflops", ".2f"),
          ("of bf16 peak", "of_bf16_peak", ".1%")]),
        ("checks", "Checks", [("check", "check", ""), ("measured", "measured", ""), ("tolerance", "tolerance", ""),
                              ("seconds", "seconds", ".1f")]),
        ("distributed", "One-process DDP and K-FAC", [("what", "what", ""), ("net", "net", ""),
                                                      ("seconds", "seconds", ".2f"), ("detail", "detail", "")]),
    ]
    for key, title, columns in sections:
        if key not in parts:  # --parts left it out
            continue
        part = parts[key]
        text += [f"## {title}", "", f"{part['seconds']:.0f} s (cap {part['cap']:.0f} s)"
                 + (f"; part stopped: {part['error']}" if part.get("error") else ""), "",
                 table(part["rows"], columns), ""]
    return "\n".join(text)


def failures(parts: dict[str, Any]) -> list[str]:
    """One name per failed check: a part that stopped, a pipeline, a bench cell, a check, a DDP/K-FAC row."""
    names = [f"{key}: {part['error']}" for key, part in parts.items() if part.get("error")]
    for key, part in parts.items():
        for row in part["rows"]:
            if not row.get("ok"):
                name = (row.get("pipeline") or row.get("check") or row.get("what")
                        or f"{row.get('path')} {row.get('net')}")
                names.append(f"{key} {name}: {row.get('error', 'out of tolerance')}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: full on cuda, tiny on cpu")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu-check")
    parser.add_argument("--parts", default="pipelines,bench,checks,distributed", help="comma-separated subset")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              f"`make gpu-check DEVICE=cpu` runs the same checks at tiny sizes on the CPU", file=sys.stderr)
        return 2
    size_name = args.size or ("full" if args.device == "cuda" else "tiny")
    size = SIZES[size_name]
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if size.threads:
        torch.set_num_threads(size.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runners = {"pipelines": part_pipelines, "bench": part_bench, "checks": part_checks,
               "distributed": part_distributed}
    parts: dict[str, Any] = {}
    for key in args.parts.split(","):
        cap = size.caps[key]
        part_started = time.perf_counter()
        print(f"gpu-check: {key} (cap {cap:.0f} s) ...", flush=True)
        part: dict[str, Any] = {"cap": cap, "rows": []}
        try:
            # pipelines stop at their stage timeouts; every other part at the alarm (a little after the soft
            # deadline its loops check between cells)
            with (time_cap(cap + 5) if key != "pipelines" or size.in_process else contextlib.nullcontext()):
                runners[key](device, size, args.out, part_started + cap, part["rows"])
        except PartTimeout as exc:
            part["error"] = str(exc)
        except Exception as exc:
            part["error"] = first_line(exc)
            print(traceback.format_exc(), file=sys.stderr)
        part["seconds"] = time.perf_counter() - part_started
        parts[key] = part
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "size": size_name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "bf16_peak_tflops": bf16_peak(device), "parts": parts,
        "seconds": time.perf_counter() - started,
    }
    results["failed"] = failures(parts)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "summary.md").write_text(summary(results))
    print(summary(results))
    if results["failed"]:
        print(f"gpu-check: {len(results['failed'])} failed: " + " | ".join(results["failed"]), file=sys.stderr)
        return 1
    print(f"gpu-check: all passed in {results['seconds']:.0f} s -> {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
