"""Nothing lost, nothing silent (issue 19): a stage killed with SIGKILL and re-run ends bit-identical to an
uninterrupted run, and its MLflow run is taken over."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from typer.testing import CliRunner

from micronet.checkpoint import safe_load
from micronet.cli import app
from micronet.training import KILL_AFTER_BATCHES_ENV

REPO = Path(__file__).resolve().parents[1]
BATCHES_PER_EPOCH = 3  # 48 synthetic images, no validation split (so the last epoch is kept) = 3 batches of 16

# A toy Wave pipeline that still draws from every random source: FAA + crop + flip + cutout on the main
# process, ShakeDrop, mixup, EigenDamage with bring-back (its own generator), masked fine-tuning.
TINY = {
    "data": {"dataset": "cifar100", "root": "data", "val_size": 0, "batch_size": 16, "eval_batch_size": 64,
             "workers": 0, "augment": {"autoaugment": "fa_shake26_2x96d_cifar100", "cutout": 8}},
    "model": {"arch": "pyramidnet", "args": {"depth": 11, "alpha": 8, "num_classes": 100, "shakedrop": 0.5}},
    "train": {"epochs": 3, "lr": 0.05, "grad_clip": 5.0, "seed": 0, "mixing": {"kind": "mixup"}},
    "prune": {"method": "eigendamage", "rate": 0.3, "steps": 4, "step_rate": 0.5, "back_ratio": 0.25,
              "kfac_batches": 2, "finetune": {"epochs": 2, "lr": 0.01}},
    "sparsify": {"rate": 0.5, "steps": 2, "exclude": ["conv1"], "finetune": {"epochs": 2, "lr": 0.005}},
    "distributed": {"device": "cpu", "threads": 1},
    "tracking": {"experiment": "reliability"},
}

# stage -> (its input stage, batches before the kill: mid-epoch 2 of train; mid-epoch 2 of step 2 otherwise)
STAGES = {"train": (None, BATCHES_PER_EPOCH + 2), "prune": ("train", 3 * BATCHES_PER_EPOCH + 2),
          "sparsify": ("prune", 3 * BATCHES_PER_EPOCH + 2)}


def stage_args(stage: str, folder: Path, tag: str) -> list[str]:
    source = STAGES[stage][0]
    args = [stage, "--params", str(folder / f"{tag}.yaml"), "--output", str(folder / f"{stage}-{tag}.pt"),
            "--metrics", str(folder / f"{stage}-{tag}.json"), "--plots", str(folder / f"{stage}-{tag}.csv")]
    if source:
        args += ["--input", str(folder / f"{source}-reference.pt")]
    if stage == "sparsify":
        args += ["--layers", str(folder / f"{stage}-{tag}-layers.json")]
    return args


def run_in_process(args: list[str]) -> str:
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline run once, uninterrupted, stage by stage: the reference every resumed run must equal."""
    from micronet.data.cifar import write_synthetic_cifar100

    folder = tmp_path_factory.mktemp("pipeline")
    write_synthetic_cifar100(folder / "data", 48, 16, seed=0)
    params = {**TINY, "data": {**TINY["data"], "root": str(folder / "data")}}
    (folder / "resumed.yaml").write_text(yaml.safe_dump(params))
    # the same work (a resume file's fingerprint leaves tracking out), untracked: MLflow costs seconds per stage
    (folder / "reference.yaml").write_text(yaml.safe_dump({**params, "tracking": {"enabled": False}}))
    for stage in STAGES:
        run_in_process(stage_args(stage, folder, "reference"))
    return folder


def tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_mid_epoch_resumes_bit_identical(pipeline, stage, monkeypatch):
    """SIGKILL after N training batches (mid-epoch; for prune and sparsify inside step 2), re-run: every tensor
    of the final checkpoint equals the uninterrupted run's, and the killed MLflow run is ended as KILLED with
    its curves carried into the run that finished the work."""
    from mlflow.tracking import MlflowClient

    from micronet.tracking import RESUMED_FROM_TAG, tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{pipeline / 'mlflow.db'}")  # created once: faster
    monkeypatch.setenv("MICRONET_RUN", f"resumed-{stage}")
    args = stage_args(stage, pipeline, "resumed")
    env = {**os.environ, KILL_AFTER_BATCHES_ENV: str(STAGES[stage][1]), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    output = pipeline / f"{stage}-resumed.pt"
    assert not output.exists() and list(pipeline.glob(f"{stage}-resumed*.resume.pt"))

    log = run_in_process(args)
    print(log)
    assert "resuming after epoch 1 from" in log  # the run went on from the killed one's epoch, not from scratch
    reference, resumed = tensors(safe_load(pipeline / f"{stage}-reference.pt")), tensors(safe_load(output))
    assert reference.keys() == resumed.keys()
    differing = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differing, f"{len(differing)} of {len(reference)} tensors differ, e.g. {differing[:3]}"
    print(f"{stage}: {len(reference)} tensors equal")
    assert not list(pipeline.glob(f"{stage}-resumed*.resume.pt"))

    client = MlflowClient(tracking_uri())
    experiment = [client.get_experiment_by_name("reliability").experiment_id]
    parent = client.search_runs(experiment, filter_string=f"tags.`micronet.pipeline_run` = 'resumed-{stage}'")
    runs = client.search_runs(experiment, filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    by_status = {r.info.status: r for r in runs}
    assert sorted(by_status) == ["FINISHED", "KILLED"] and len(runs) == 2
    finished = by_status["FINISHED"]
    assert finished.data.tags[RESUMED_FROM_TAG] == by_status["KILLED"].info.run_id
    curve = "train_loss" if stage == "train" else "finetune_train_loss"
    epochs = {m.step for m in client.get_metric_history(finished.info.run_id, curve)}
    total = TINY["train"]["epochs"] if stage == "train" else None
    assert total is None or epochs == set(range(1, total + 1))
    assert 1 in epochs  # the killed run's first epoch is in the run that finished


# ---- no stage guesses: malformed params are one line, exit 2, before any work, nothing overwritten ------------


def cli_error(argv: list[str], monkeypatch, capsys) -> str:
    """Run `micronet ...` in-process as the console script does; return its one-line error (exit 2 asserted)."""
    from micronet import cli

    monkeypatch.setattr(sys, "argv", ["micronet", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def drop(section: str):
    return lambda text: "\n".join(line for line in _without_section(text.splitlines(), section))


def _without_section(lines: list[str], section: str):
    inside = False
    for line in lines:
        if line and not line[0].isspace():
            inside = line.startswith(f"{section}:")
        if not inside:
            yield line


def sub(old: str, new: str):
    return lambda text: text.replace(old, new, 1)


MALFORMED_PARAMS = [  # pipeline, stage, edit of its params.yaml, what the message must say
    ("demo", "prune", drop("prune"), "key 'prune' is missing"),
    ("kaist", "sparsify", drop("sparsify"), "key 'sparsify' is missing"),
    ("demo", "train", sub("  lr: 0.1\n", "  lr: .inf\n"), "'train.lr' = inf: Input should be a finite number"),
    ("demo", "train", sub("  lr: 0.1\n", "  lr: 0.1\n  lr: 0.2\n"), "key 'lr' given twice (lines"),
    ("demo", "train", sub("  depth: 11\n", "  depth: -5\n"), "'args.depth' = -5: input should be greater than or"),
    ("uci", "train", sub("{arch: efficientnet_ex, args: {num_classes: 100}}",
                         "{arch: efficientnet_cifar, args: {num_classes: 100, width: -0.3}}"),
     "'args.width' = -0.3: input should be greater than 0"),
    ("demo", "train", sub("  batch_size: 32\n", "  batch_size: 32\n  std: [0, 0, 0]\n"), "'data.std.0' = 0"),
    ("demo", "train", sub("  epochs: 10\n", "  epochs: [10\n"), "line"),
    ("demo", "train", sub("arch: pyramidnet", "arch: pyramidnot"), "arch 'pyramidnot' is not registered"),
    ("demo", "train", sub("autoaugment: fa_shake26_2x96d_cifar100", "autoaugment: nope"),
     "'data.augment.autoaugment' = 'nope': unknown Fast AutoAugment policy; choose one of"),
    ("demo", "train", sub("root: data/synth", "root: /nonexistent/synth"), "key 'data.root' = '/nonexistent/synth'"),
]


@pytest.mark.parametrize("pipeline, stage, edit, expected", MALFORMED_PARAMS,
                         ids=[f"{p}-{s}-{e.split(':')[0][:30]}" for p, s, _, e in MALFORMED_PARAMS])
def test_malformed_params_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, pipeline, stage, edit, expected):
    original = (REPO / "pipelines" / pipeline / "params.yaml").read_text()
    text = edit(original)
    assert text != original
    params = tmp_path / "params.yaml"
    params.write_text(text)
    outputs = {name: tmp_path / name for name in ("out.pt", "metrics.json", "plots.csv")}
    for path in outputs.values():
        path.write_text("previous")
    section = ["--section", "train_ex"] if pipeline == "uci" else []
    argv = [stage, "--params", str(params), "--output", str(outputs["out.pt"]), "--metrics",
            str(outputs["metrics.json"]), "--plots", str(outputs["plots.csv"]), *section]
    if stage != "train":
        argv += ["--input", str(tmp_path / "in.pt")]
    err = cli_error(argv, monkeypatch, capsys)
    assert str(params) in err and expected in err, err
    assert all(path.read_text() == "previous" for path in outputs.values())


def test_every_dvc_stage_lists_exactly_the_params_its_command_requires():
    """runner.STAGE_PARAMS is what a stage refuses to run without; each pipeline's dvc.yaml lists the same keys,
    and each pipeline's params file has them all."""
    import shlex

    from micronet import runner
    from micronet.config import load_params

    checked = 0
    for dvc in [REPO / "dvc.yaml", *sorted((REPO / "pipelines").glob("*/dvc.yaml"))]:
        for name, stage in yaml.safe_load(dvc.read_text())["stages"].items():
            cmd = shlex.split(stage["cmd"])
            if cmd[:1] != ["micronet"] or cmd[1] not in runner.STAGE_PARAMS:
                continue
            options = dict(zip(cmd[2::2], cmd[3::2]))
            path, section = dvc.parent / options.get("--params", "params.yaml"), options.get("--section", "train")
            params = load_params(path)
            assert stage.get("params") == runner.stage_params(params, cmd[1], section), f"{dvc}: {name}"
            runner.require_params(params, path, cmd[1], section)
            checked += 1
    assert checked >= 20


# ---- outputs are a unit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_leaves_every_previous_output(tmp_path, monkeypatch, code):
    """The metrics write fails after the checkpoint's temporary is written: the old checkpoint and metrics stay,
    no temporary is left, and the error is one line naming the file."""
    from micronet import runner
    from micronet.errors import MicronetError

    checkpoint, metrics = tmp_path / "model.pt", tmp_path / "metrics" / "m.json"
    metrics.parent.mkdir()
    checkpoint.write_text("old checkpoint")
    metrics.write_text("old metrics")
    real = runner.write_temporary

    def failing(path, write):
        if path == metrics:
            raise OSError(code, os.strerror(code), str(metrics))
        return real(path, write)

    monkeypatch.setattr(runner, "write_temporary", failing)
    with pytest.raises(MicronetError) as err:
        runner.write_outputs({checkpoint: {"w": torch.zeros(2)}, metrics: {"accuracy": 0.5}})
    assert str(metrics) in str(err.value) and "\n" not in str(err.value) and "previous outputs" in str(err.value)
    assert checkpoint.read_text() == "old checkpoint" and metrics.read_text() == "old metrics"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "metrics", "model.pt"]


def test_a_stage_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch, capsys):
    """A read-only metrics folder (simulated: the tests may run as root, whom permissions do not stop): exit 2
    before the params are even used for work, both old outputs in place."""
    from micronet import runner

    real = runner.write_temporary
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()

    def read_only(path, write):
        if path.parent == metrics_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, write)

    monkeypatch.setattr(runner, "write_temporary", read_only)
    (tmp_path / "quantize.pt").write_text("previous")
    (metrics_dir / "quantize.json").write_text("previous")
    err = cli_error(["quantize", "--params", str(REPO / "pipelines/demo/params.yaml"), "--input",
                     str(tmp_path / "none.pt"), "--output", str(tmp_path / "quantize.pt"), "--metrics",
                     str(metrics_dir / "quantize.json")], monkeypatch, capsys)
    assert "quantize.json: cannot write (the file system is read-only)" in err
    assert (tmp_path / "quantize.pt").read_text() == (metrics_dir / "quantize.json").read_text() == "previous"


def test_outputs_keep_the_users_umask(tmp_path):
    from micronet import runner
    from micronet.checkpoint import atomic_save

    old = os.umask(0o022)
    try:
        runner.write_outputs({tmp_path / "a.json": {"x": 1}, tmp_path / "b.csv": [{"epoch": 1}]})
        atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {n: 0o644 for n in ("a.json", "b.csv",
                                                                                                   "c.pt")}


# ---- checkpoints are data ----------------------------------------------------------------------------------


def _good_checkpoint() -> dict:
    from micronet.checkpoint import make_checkpoint
    from micronet.nets import create_model

    args = {"depth": 11, "alpha": 4, "num_classes": 10}
    torch.manual_seed(0)
    return make_checkpoint(create_model("pyramidnet", **args), "pyramidnet", args)


def _with(**changes):
    def edit(ckpt: dict) -> dict:
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = ckpt
            for key in parents:
                node = node[key]
            if value is None:
                del node[last]
            else:
                node[last] = value
        return ckpt

    return edit


QUANT_SPEC = {"weight_bits": 8, "activation_bits": 8, "folded": [], "weight_layers": [], "activation_layers": ["nope"]}
MALFORMED_CHECKPOINTS = {
    "missing channel_plan": (_with(channel_plan=None), "field 'channel_plan' is missing"),
    "unknown builder argument": (_with(args__width=2), "field 'args.width': pyramidnet takes no argument 'width'"),
    "bad builder argument": (_with(args__depth=-5), "field 'args.depth' = -5: input should be greater than or equal"),
    "negative channel plan": (_with(channel_plan__conv1__out_channels=-3),
                              "field 'channel_plan.conv1.out_channels' = -3: input should be greater than or equal"),
    "quantization spec naming a missing layer": (_with(quantization=QUANT_SPEC),
                                                 "field 'quantization' names a layer pyramidnet lacks"),
    "unknown architecture": (_with(arch="nonet"), "field 'arch' = 'nonet': unknown architecture"),
    "foreign format": (_with(format="other/2"), "field 'format' = 'other/2': input should be 'micronet-checkpoint/1'"),
    "weights that are not tensors": (lambda ckpt: {**ckpt, "state_dict": {**ckpt["state_dict"], "conv1.weight": [1.0]}},
                                     "field 'state_dict.conv1.weight' = [1.0]: input should be an instance of tensor"),
    "a tensor, not a checkpoint": (lambda ckpt: torch.zeros(3), "not a micronet-checkpoint/1 file (holds a Tensor"),
}


@pytest.mark.parametrize("case", list(MALFORMED_CHECKPOINTS))
def test_malformed_checkpoint_is_one_line_naming_file_and_field(tmp_path, monkeypatch, capsys, case):
    edit, expected = MALFORMED_CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    torch.save(edit(_good_checkpoint()), path)
    err = cli_error(["count", "--checkpoint", str(path)], monkeypatch, capsys)
    assert err.startswith(f"error: {path}: ") and expected in err, err


def test_pickled_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    from micronet.checkpoint import safe_load
    from micronet.errors import MicronetError

    path = tmp_path / "evil.pt"
    torch.save({"payload": Path("x")}, path)  # any class outside the allow-list: loading it would unpickle code
    with pytest.raises(MicronetError) as err:
        safe_load(path)
    assert "refused" in str(err.value) and "weights_only" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"\x00garbage", "tensor", "foreign"])
def test_a_corrupt_or_foreign_resume_file_is_set_aside(tmp_path, capsys, content):
    """The stage warns in one line, renames the file aside and trains from the last good state (here: scratch)."""
    import torch.nn as nn
    from torch.utils.data import TensorDataset

    from micronet.config import OptimConfig
    from micronet.training import Runtime, fit

    resume = tmp_path / "train.resume.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), resume)
    elif content == "foreign":
        torch.save({"epoch": 3, "weights": torch.zeros(3)}, resume)
    else:
        resume.write_bytes(content)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    result = fit(nn.Linear(4, 2), data, None, OptimConfig(epochs=1, lr=0.1), Runtime(torch.device("cpu")),
                 batch_size=16, resume_path=resume, fingerprint="k")
    assert len(result.history) == 1 and (tmp_path / "train.resume.pt.corrupt").is_file()
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "moved it to train.resume.pt.corrupt" in warning[0]


class NoisyBlobs(torch.utils.data.Dataset):
    """Augmentation drawn from Python's `random` and torch's RNG, as the real transforms do, inside the workers."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + 2.0 * (self.y[:, None] * 2 - 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        import random

        return self.x[i] * random.uniform(0.5, 1.5) + torch.rand(8), self.y[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_dataloader_workers_is_exact(tmp_path, workers):
    """Interrupted after epoch 1 and resumed: the weights equal 3 uninterrupted epochs', with the augmentation
    drawn in the main process or in DataLoader workers (seeded per epoch from (seed, epoch))."""
    import torch.nn as nn

    from micronet.config import OptimConfig
    from micronet.training import Runtime, fit

    cfg = OptimConfig(epochs=3, lr=0.1, mixing={"kind": "mixup"})

    def run(resume: Path, stop_after: Optional[int] = None) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))

        def on_epoch(row):
            if row["epoch"] == stop_after:
                raise KeyboardInterrupt

        fit(model, NoisyBlobs(), None, cfg, Runtime(torch.device("cpu")), batch_size=16, workers=workers, seed=3,
            num_classes=2, resume_path=resume, fingerprint="k", on_epoch=on_epoch)
        return model

    reference = run(tmp_path / "a.resume.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.resume.pt", stop_after=1)
    torch.manual_seed(1234)  # a new process starts wherever: nothing may depend on it
    resumed = run(tmp_path / "b.resume.pt")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))
