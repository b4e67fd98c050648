"""Wave's prune schedule (mhariat/MicroNet@611cfb1, Pruning/main_prune.py): which step comes next from the
compression reached, the per-compression batches, and the runner that plays such a plan."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from micronet import runner
from micronet.compression.eigendamage import next_step_kind, step_batches, step_kinds
from micronet.config import BatchRule, OptimConfig, Params, PruneConfig


def test_prune_steps_repeat_until_the_network_is_smaller_then_alternate_with_bring_back():
    # main_prune.py L140-146, L168-169: pool.it is reset to 0 (prune again) until compression > 0 once
    compressions = [-0.11, -0.05, 0.2, 0.15, 0.35, 0.3, 0.5]
    assert step_kinds(compressions) == ["prune", "prune", "prune", "bring_back", "prune", "bring_back", "prune"]


def test_bring_back_follows_every_prune_once_triggered_even_if_compression_falls_back():
    # trigger_back is sticky: a later step at compression <= 0 does not restart the prune-only phase
    assert step_kinds([0.1, -0.02, -0.01, 0.2]) == ["prune", "bring_back", "prune", "bring_back"]
    assert step_kinds([0.0, 0.0, 0.01]) == ["prune", "prune", "prune"]  # 0 is not smaller (strict 0 <)


def test_without_back_ratio_every_step_prunes():
    assert step_kinds([0.2, 0.3, 0.4], brings_back=False) == ["prune"] * 3
    assert next_step_kind([], []) == "prune"
    with pytest.raises(ValueError):
        next_step_kind(["prune"], [])


WAVE_BATCHES = [BatchRule(above=0.0, finetune=168, kfac=128), BatchRule(above=0.3, finetune=176, kfac=128),
                BatchRule(above=0.6, finetune=176, kfac=128)]


@pytest.mark.parametrize("compressions, expected", [
    ([], (128, 100)),                 # main_prune.py L79-81: batch 128, K-FAC 100 at the start
    ([-0.1, -0.05], (128, 100)),
    ([-0.1, 0.05], (168, 128)),       # L140-146: batches_no_skip[0] once compression > 0
    ([0.31], (176, 128)),             # L148-153
    ([0.31, 0.29], (176, 128)),       # sticky: the loaders are rebuilt only when a threshold is first crossed
    ([0.7], (176, 128)),              # L155-160
])
def test_batches_follow_the_largest_compression_reached(compressions, expected):
    assert step_batches(compressions, WAVE_BATCHES, 128, 100) == expected


def test_root_params_carry_wave_batches_as_params():
    from micronet.config import load_params

    p = load_params(__import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml").prune
    assert p.finetune.batch_size == 128 and p.kfac_batch_size == 100 and p.negative_compression_epochs == 50
    assert [(r.above, r.finetune, r.kfac) for r in p.batch_schedule] == [(0.0, 168, 128), (0.3, 176, 128),
                                                                          (0.6, 176, 128)]


class _Track:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None, parent=False):
        self.metrics.append((step, metrics))

    def set_tags(self, tags, parent=False):
        pass


def test_a_callable_plan_decides_each_step_from_the_rows_and_refine_sets_its_batch(tmp_path):
    """The runner asks the plan for each step with the rows so far, and refine sees the compressed model."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    splits = SimpleNamespace(train=data, val=None, test=None)
    params = Params.model_validate({"data": {"workers": 0}})
    recipe = OptimConfig(epochs=1, lr=0.01, precision="fp32", batch_size=8)
    section = PruneConfig(steps=4, finetune=recipe)
    compressions = iter([-0.1, 0.2, 0.1, 0.4])
    seen = []

    def plan(step, rows):
        seen.append([r["kind"] for r in rows])
        kind = next_step_kind([r["kind"] for r in rows], [r["compression"] for r in rows])
        return runner.Step(0.5, recipe, kind, {"planned": step})

    def refine(step, spec, model, rows):
        return runner.Step(spec.target, spec.finetune.model_copy(update={"batch_size": 4 if step else 8}),
                           spec.kind, spec.extra)

    state = {}
    (tmp_path / "in.pt").write_bytes(b"")

    def compress(model, step, target):
        state["c"] = next(compressions)

    model, rows = runner.compress_in_steps(
        "prune", nn.Linear(4, 3), {"arch": "x", "args": {}}, section, compress,
        lambda m, t: {"compression": state["c"]}, params=params, input=tmp_path / "in.pt", splits=splits,
        runtime=SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=1, rank=0, distributed=False),
        track=_Track(), output=tmp_path / "out.pt", plan=plan, refine=refine, recipes=[recipe])
    assert [r["kind"] for r in rows] == ["prune", "prune", "bring_back", "prune"]
    assert [r["compression"] for r in rows] == [-0.1, 0.2, 0.1, 0.4]
    assert [r["finetune_batch"] for r in rows] == [8, 4, 4, 4]
    assert [r["planned"] for r in rows] == [0, 1, 2, 3]
    assert seen[2] == ["prune", "prune"]


def test_prune_and_sparsify_stages_report_kinds_compressions_and_what_they_reached(tmp_path):
    """The prune stage's rows show each step's kind and compression, decided by Wave's rule; its metrics (and
    sparsify's) carry what was reached beside what was asked, and a stage that ends short says so."""
    import csv
    import json

    import yaml
    from typer.testing import CliRunner

    from micronet.cli import app
    from micronet.data.cifar import write_synthetic_cifar100
    from tests.test_reliability import TINY

    write_synthetic_cifar100(tmp_path / "data", 48, 16, seed=0)
    params = {**TINY, "data": {**TINY["data"], "root": str(tmp_path / "data"), "augment": {}},
              "train": {**TINY["train"], "epochs": 1, "mixing": {"kind": "none"}},
              "prune": {**TINY["prune"], "rate": 0.9, "steps": 3, "finetune": {"epochs": 1, "lr": 0.01},
                        "kfac_batch_size": 8, "batch_schedule": [{"above": 0.0, "finetune": 24, "kfac": 16}]},
              "sparsify": {**TINY["sparsify"], "finetune": {"epochs": 1, "lr": 0.005}},
              "tracking": {"enabled": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    runner_ = CliRunner()
    out = {}
    for stage, source in (("train", None), ("prune", "train"), ("sparsify", "prune")):
        args = [stage, "--params", str(tmp_path / "p.yaml"), "--output", str(tmp_path / f"{stage}.pt"),
                "--metrics", str(tmp_path / f"{stage}.json"), "--plots", str(tmp_path / f"{stage}.csv")]
        args += ["--input", str(tmp_path / f"{source}.pt")] if source else []
        args += ["--layers", str(tmp_path / "layers.json")] if stage == "sparsify" else []
        result = runner_.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[stage] = result.output.strip().splitlines()[-1]
    rows = list(csv.DictReader((tmp_path / "prune.csv").open()))
    kinds, compressions = [r["kind"] for r in rows], [float(r["compression"]) for r in rows]
    assert kinds == step_kinds(compressions) and len(rows) == 3
    assert [int(r["finetune_batch"]) for r in rows] == [24 if max(compressions[: k + 1]) > 0 else 16
                                                         for k in range(3)]
    assert all(int(r["kfac_batch"]) == (16 if k and max(compressions[:k]) > 0 else 8)
               for k, r in enumerate(rows) if r["kind"] == "prune")
    metrics = json.loads((tmp_path / "prune.json").read_text())
    assert metrics["target_rate"] == 0.9 and metrics["reached_rate"] == metrics["rate"] < 0.9
    assert metrics["steps_used"] == metrics["steps"] == 3 and metrics["target_reached"] is False
    assert metrics["step_kinds"] == ",".join(kinds)
    assert "target 0.9 not reached" in out["prune"]
    sparsified = json.loads((tmp_path / "sparsify.json").read_text())
    assert sparsified["target_sparsity"] == 0.5 and sparsified["target_reached"] is True
    assert sparsified["reached_sparsity"] == sparsified["sparsity"] and "not reached" not in out["sparsify"]


def test_each_step_reseeds_a_gpu_style_loader_from_seed_and_step_and_gives_it_the_step_batch(tmp_path):
    """data.loader: gpu: the runner gives the loader (seed, step)'s seed and the step's batch before each
    fine-tuning, so step 2 does not replay step 1's batches."""
    from micronet.training import derived_seed

    class Loader:
        def __init__(self):
            self.seed, self.batch, self.calls = 0, 8, []

        def set_seed(self, seed):
            self.seed = seed
            self.calls.append(("seed", seed))

        def set_batch_size(self, batch):
            self.batch = batch
            self.calls.append(("batch", batch))

        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 2

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed % 2**63)
            return iter([(torch.randn(self.batch, 4, generator=g), torch.randint(0, 3, (self.batch,), generator=g))
                         for _ in range(2)])

    (tmp_path / "in.pt").write_bytes(b"")
    loader = Loader()
    recipe = OptimConfig(epochs=1, lr=0.01, precision="fp32", batch_size=6)
    params = Params.model_validate({"data": {"workers": 0}, "train": {"seed": 5}})
    runner.compress_in_steps(
        "sparsify", nn.Linear(4, 3), {"arch": "x", "args": {}}, PruneConfig(steps=2, finetune=recipe),
        lambda m, s, t: None, lambda m, t: {}, params=params, input=tmp_path / "in.pt",
        splits=SimpleNamespace(train=None, val=None, test=None),
        runtime=SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=1, rank=0, distributed=False),
        track=_Track(), output=tmp_path / "out.pt", train=loader, plan=[runner.Step(0.5, recipe)] * 2)
    assert loader.calls == [("seed", derived_seed(5, 0)), ("batch", 6), ("seed", derived_seed(5, 1)), ("batch", 6)]
