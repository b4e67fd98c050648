"""The submissions' pipelines at toy scale, each through `make demo PIPELINE=...` (its toy.yaml applied, then DVC)
in a copy of the repository: the stages run, the score is the counter's figure for the final checkpoint, MLflow
holds one parent run with a child per stage, and what each pipeline is about shows in its outputs. The CIFAR
pipelines run on real images (`DATA=digits`: scikit-learn's handwritten digits, 10 classes, chance 0.10): the final
model is far above chance and no compression stage loses more than a few points against its input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from e2e import (LEARNED, STAGE_LOSS, accuracy_on_test, environment, make_demo, mlflow_stage_runs, repository_copy,
                 run, stages_run)

pytestmark = pytest.mark.e2e


def assert_learned(pipeline_dir, chain: list[str]) -> dict[str, float]:
    """Each checkpoint of the chain on the test digits: the last far above chance, compression losing little; the
    score stage measured the same accuracy."""
    accuracy = accuracy_on_test(pipeline_dir, chain)
    print(pipeline_dir.name, "test accuracy after each stage:", accuracy)
    score = json.loads((pipeline_dir / "metrics/score.json").read_text())
    assert score["accuracy"] == pytest.approx(accuracy[chain[-1]], abs=1e-6) and score["chance"] < 0.11
    assert accuracy[chain[-1]] >= LEARNED, accuracy
    return accuracy


def score_matches_checkpoint(pipeline_dir, checkpoint: str, input_size=(3, 32, 32), task="cifar100") -> dict:
    from micronet.checkpoint import load_model
    from micronet.scoring import count

    score = json.loads((pipeline_dir / "metrics/score.json").read_text())
    counted = count(load_model(pipeline_dir / checkpoint)[0], input_size, freebie=True)
    assert (score["params"], score["flops"]) == (counted.params, counted.flops)
    assert score["score"] == float(f"{counted.score(task):.6g}")
    return score


def test_kaist_toy_pipeline_learns_digits(tmp_path):
    repo = repository_copy(tmp_path / "repo", "kaist")
    env = environment()
    out = make_demo(repo, "kaist", env, data="digits")
    assert stages_run(out) == ["train", "sparsify", "score"]
    kaist = repo / "pipelines/kaist"
    score = score_matches_checkpoint(kaist, "models/sparsify.pt")
    # make demo ends with `dvc metrics show` and the per-layer table's totals
    assert "metrics/score.json" in out and f"score       {score['score']:.6f}  (cifar100)" in out
    accuracy = assert_learned(kaist, ["train", "sparsify"])
    assert accuracy["sparsify"] >= accuracy["train"] - STAGE_LOSS, accuracy
    # KAIST's schedule: linear rounds (15, 30, 45, 60 %) of one global magnitude threshold over every >=2-D weight
    rows = (kaist / "metrics/plots/sparsify.csv").read_text().splitlines()
    header = rows[0].split(",")
    targets = [float(r.split(",")[header.index("target_rate")]) for r in rows[1:]]
    assert targets == pytest.approx([0.15, 0.3, 0.45, 0.6])
    ckpt = torch.load(kaist / "models/sparsify.pt", map_location="cpu", weights_only=True)["state_dict"]
    weights = [v for k, v in ckpt.items() if k.endswith("weight") and v.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.002)
    assert score["qualifies"] is True and score["total"] == 297
    parent, children = mlflow_stage_runs(repo, "demo-kaist-micronet")
    assert sorted(children) == ["score", "sparsify", "train"] and parent.data.tags["micronet.pipeline"] == "kaist"
    train = json.loads((kaist / "metrics/train.json").read_text())
    assert train["best_epoch"] == 6  # no validation split: the last epoch


def test_fastai_wrn_toy_pipeline_learns_digits(tmp_path):
    repo = repository_copy(tmp_path / "repo", "fastai-wrn")
    env = environment()
    out = make_demo(repo, "fastai-wrn", env, data="digits")
    assert stages_run(out) == ["train", "train_more", "score"]
    fastai = repo / "pipelines/fastai-wrn"
    score_matches_checkpoint(fastai, "models/train_more.pt")
    assert_learned(fastai, ["train", "train_more"])
    curves = (fastai / "metrics/plots/train.csv").read_text().splitlines()
    lrs = [float(line.split(",")[1]) for line in curves[1:]]
    assert lrs[0] == pytest.approx(5e-3 / 25, rel=1e-6)  # one-cycle starts at lr / div_factor
    # learn.save/load: the first run's AdamW moments go into train_more, which continues their step count
    saved = [torch.load(fastai / f"models/{name}.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
             for name in ("train", "train_more")]
    assert saved[0] and all(int(b["step"]) > int(a["step"]) > 0 for a, b in zip(saved[0].values(), saved[1].values()))
    parent, children = mlflow_stage_runs(repo, "demo-fastai-wrn22-6")
    assert sorted(children) == ["score", "train", "train_more"]


def test_uci_teacher_chain_learns_digits_and_what_a_change_reruns(tmp_path):
    repo = repository_copy(tmp_path / "repo", "uci")
    env = environment()
    out = make_demo(repo, "uci", env, data="digits")
    chain = ["train_b3", "refine_b3", "train_b0", "train_ex"]
    assert stages_run(out) == [*chain, "score"]
    uci = repo / "pipelines/uci"
    score_matches_checkpoint(uci, "models/train_ex.pt")
    assert_learned(uci, chain)  # each student learned from its teacher's soft labels alone
    parent, children = mlflow_stage_runs(repo, "demo-uci-efficientnet")
    assert sorted(children) == sorted([*chain, "score"])
    for student, teacher in zip(chain[1:], chain):  # the student's run names its teacher's run
        assert children[student].data.tags["micronet.teacher_run_id"] == children[teacher].info.run_id
    assert "micronet.teacher_run_id" not in children["train_b3"].data.tags

    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "toy baseline"], repo, env)
    # A change to a link re-runs that link and what follows it (its checkpoint is the next one's teacher), never
    # the teachers before it.
    params = yaml.safe_load((uci / "params.yaml").read_text())
    params["train_b0"]["lr"] = 0.05
    (uci / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], uci, env)
    assert "train_b0:" in status and not any(f"{s}:" in status for s in ("train_b3", "refine_b3", "train_ex"))
    out = run(["dvc", "repro", "--dry", "--force-downstream"], uci, env)
    assert stages_run(out) == ["train_b0", "train_ex", "score"]
    # A knob of the last student touches only that stage (and, through its checkpoint, the score).
    run(["git", "checkout", "params.yaml"], uci, env)
    params["train_b0"]["lr"] = yaml.safe_load((uci / "params.yaml").read_text())["train_b0"]["lr"]
    params["train_ex"]["grad_clip"] = 5.0
    (uci / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], uci, env)
    assert "train_ex:" in status and not any(f"{s}:" in status for s in ("train_b3", "refine_b3", "train_b0"))


def test_dnw_toy_pipeline(tmp_path):
    def shrink(toy: dict) -> None:
        toy["data"]["synthetic"].update(classes=5, train=30, test=10)
        toy["data"].update(val_size=30)
        toy["train"].update(epochs=2)

    repo = repository_copy(tmp_path / "repo", "dnw", shrink, file="toy.yaml")
    env = environment()
    out = make_demo(repo, "dnw", env)
    assert stages_run(out) == ["train", "score"]
    dnw = repo / "pipelines/dnw"
    score = score_matches_checkpoint(dnw, "models/train.pt", task="imagenet")
    assert score["total"] == 50  # the official val folder: 5 classes x 10
    table = (dnw / "metrics/score_layers.txt").read_text()
    assert table.rstrip().endswith(f"score       {score['score']:.6f}  (imagenet)") and "(cifar100)" not in table
    layers = json.loads((dnw / "metrics/train_layers.json").read_text())
    assert layers.pop("conv1")["density"] == 1.0 and len(layers) == 53  # the stem stays dense; the rest sparse
    for name, row in layers.items():
        assert row["nonzero"] == row["numel"] - int(0.9 * row["numel"]), name  # exactly k = 10 % per layer
    train = json.loads((dnw / "metrics/train.json").read_text())
    assert train["density"] == pytest.approx(0.1, abs=0.001)


def test_kaist_wave_toy_pipeline(tmp_path):
    """A released KAIST file (here a random one in their layout, 60 % masked) imported, quantized with Wave's
    method (per-channel exponents, depthwise convs at 12 bits) and fine-tuned quantization-aware: score under the
    winner's 0.0044, KAIST's zeros kept, every weight on the grid its layer declares, fidelity metrics, one MLflow
    parent run."""
    from micronet.checkpoint import load_model
    from micronet.compression.quantize import off_grid

    def shrink(toy: dict) -> None:
        toy["data"]["synthetic"].update(train=60, test=50)  # the real MicroNet: every image costs
        toy["data"].update(val_size=20, batch_size=20, eval_batch_size=50)
        toy["quantize"]["finetune"].update(max_steps_per_epoch=2)

    repo = repository_copy(tmp_path / "repo", "kaist-wave", shrink, file="toy.yaml")
    env = environment()
    out = make_demo(repo, "kaist-wave", env)
    assert stages_run(out) == ["import", "sparsify", "quantize", "score"]
    pipeline = repo / "pipelines/kaist-wave"
    score = score_matches_checkpoint(pipeline, "models/quantize.pt")
    assert score["score"] < 0.0044
    ckpt = torch.load(pipeline / "models/quantize.pt", map_location="cpu", weights_only=True)
    weights = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight") and v.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.002)
    spec = ckpt["quantization"]
    assert spec["weight_bits"] == 9 and spec["weight_exponents"] == "per_channel"
    bits = spec["layer_weight_bits"]  # KAIST's depthwise convs at 12 bits, the rest at 9
    assert {b for n, b in bits.items() if n.startswith("layers.") and n.endswith(".conv2")} == {12}
    assert bits["conv1"] == 9 and bits["linear"] == 9 and bits["layers.0.conv1"] == 9
    assert off_grid(load_model(pipeline / "models/quantize.pt")[0]) == []  # each channel on its declared grid
    quantize = json.loads((pipeline / "metrics/quantize.json").read_text())
    assert 0.5 <= quantize["agreement"] <= 1 and 0 < quantize["logit_relative_error"] < 0.5
    assert {"val_accuracy_ptq", "agreement_ptq"} <= set(quantize)
    parent, children = mlflow_stage_runs(repo, "demo-kaist-wave")
    assert sorted(children) == ["quantize", "score"]  # import logs nothing; sparsify is switched off
    assert parent.data.tags["micronet.pipeline"] == "kaist-wave" and parent.data.metrics["score"] == score["score"]
