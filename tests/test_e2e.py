"""The Wave demo pipeline through DVC in a copy of the repository: `dvc repro`, then `dvc exp run -S prune.rate=...`
re-runs only what the change touches; metrics, checkpoints and MLflow runs are what the params asked for."""

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from e2e import LEARNED, REPO, STAGE_LOSS, accuracy_on_test, environment, repository_copy, run, stages_run

pytestmark = pytest.mark.e2e


def shrink(params: dict) -> None:
    """The demo as `make demo DATA=digits` runs it: real images (scikit-learn's digits, 10 classes)."""
    from stages.params import merge

    merge(params, yaml.safe_load((REPO / "pipelines/demo/digits.yaml").read_text()))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return repository_copy(tmp_path_factory.mktemp("e2e") / "repo", "demo", shrink)


def test_repro_then_experiment(repo, monkeypatch):
    env = environment()
    demo = repo / "pipelines/demo"
    out = run(["dvc", "repro"], demo, env)
    assert stages_run(out) == ["data", "train", "prune", "sparsify", "quantize", "score"]
    for line in ("train: val accuracy", "prune (eigendamage): ", "sparsify: 50.00% of the eligible weights zero",
                 "quantize: 9-bit", "score (cifar100, quantize): accuracy"):
        # every stage says in one line what it did
        assert line in out, (line, [s for s in out.splitlines() if ": " in s and not s.startswith(("> ", "WARN"))])

    # The score stage's figures are the counter's figures for the saved checkpoint, and its accuracy is the
    # checkpoint's on the test split.
    from micronet.checkpoint import load_model
    from micronet.config import load_params
    from micronet.data import build_splits
    from micronet.scoring import count
    from micronet.training import Runtime, evaluate, make_loader

    score = json.loads((demo / "metrics/score.json").read_text())
    model, _ = load_model(demo / "models/quantize.pt")
    counted = count(model, (3, 32, 32), freebie=True)
    assert score["params"] == counted.params and score["flops"] == counted.flops
    assert score["score"] == float(f"{counted.score('cifar100'):.6g}")  # 6 significant digits in the metrics file
    monkeypatch.chdir(demo)
    params = load_params(demo / "params.yaml")
    test = build_splits(params.data).test
    cpu = Runtime(torch.device("cpu"))
    result = evaluate(model, make_loader(test, 100, cpu, train=False, workers=0), cpu)
    assert (score["correct"], score["total"]) == (result.correct_top1, 297)
    assert score["qualifies"] is (result.correct_top1 >= 0.8 * 297)
    # Real images: the final model is far above chance (0.10) and no compression stage costs more than a few points.
    accuracy = accuracy_on_test(demo, ["train", "prune", "sparsify", "quantize"])
    print("demo test accuracy after each stage:", accuracy)
    assert accuracy["quantize"] >= LEARNED and score["chance"] < 0.11, accuracy
    for before, after in (("train", "prune"), ("prune", "sparsify"), ("sparsify", "quantize")):
        assert accuracy[after] >= accuracy[before] - STAGE_LOSS, (after, accuracy)
    assert (demo / "metrics/score_layers.txt").read_text().startswith("name")

    # EigenDamage: steps until a prune step reaches the rate; the checkpoint holds the factorization plan and a
    # plain rebuild computes what was saved
    prune = json.loads((demo / "metrics/prune.json").read_text())
    assert 0.3 <= prune["rate"] <= 0.31 and prune["parameters"] < prune["parameters_before"]  # lands on the rate
    assert set(prune) == {"rate", "parameters", "parameters_before", "val_accuracy", "steps",  # measured numbers
                          "target_rate", "reached_rate", "steps_used", "steps_allowed", "step_kinds", "target_reached"}
    assert prune["target_reached"] is True and prune["reached_rate"] == prune["rate"] and prune["target_rate"] == 0.3
    assert prune["steps_used"] == prune["steps"] == len(prune["step_kinds"].split(","))
    pruned = torch.load(demo / "models/prune.pt", map_location="cpu", weights_only=True)
    assert pruned["factorization"] and all(v["kind"] in ("conv", "linear") for v in pruned["factorization"].values())
    kinds = [line.split(",")[1] for line in (demo / "metrics/plots/prune.csv").read_text().splitlines()[1:]]
    assert kinds[0] == "prune" and kinds[-1] == "prune" and set(kinds) <= {"prune", "bring_back"}

    # The final checkpoint has the sparsity and bit widths the params asked for.
    ckpt = torch.load(demo / "models/quantize.pt", map_location="cpu", weights_only=True)
    assert ckpt["quantization"]["weight_bits"] == 9 and ckpt["quantization"]["activation_bits"] == 12
    layers = json.loads((demo / "metrics/sparsify_layers.json").read_text())
    kept_dense = [n for n in layers if n.startswith("conv1.")]  # sparsify.exclude [conv1], factorized by prune
    assert len(kept_dense) == 3 and all(layers[n]["zeros"] == 0 for n in kept_dense)
    eligible = [n for n in layers if n not in kept_dense]
    zeros = sum((ckpt["state_dict"][f"{n}.weight"] == 0).sum().item() for n in eligible)
    total = sum(ckpt["state_dict"][f"{n}.weight"].numel() for n in eligible)
    assert zeros / total == pytest.approx(0.5, abs=0.01)

    shown = run(["dvc", "metrics", "show"], demo, env)
    assert "metrics/score.json" in shown and "../../metrics" not in shown and "ERROR" not in shown

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("demo-wave-pyramidnet")
    assert client.get_experiment("0").lifecycle_stage == "deleted"  # no empty "Default" left behind
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name.startswith("wave-") and parent.data.tags["micronet.pipeline"] == "wave"
    assert len(parent.data.tags[MLFLOW_GIT_COMMIT]) == 40
    assert parent.data.tags["qualifies"] == str(score["qualifies"]).lower()
    assert "qualifies" not in parent.data.metrics  # a yes/no is a tag, not a 0/1 curve
    children = sorted(r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id)
    assert children == ["prune", "quantize", "score", "sparsify", "train"]
    for key in ("accuracy", "params", "flops", "score"):
        assert parent.data.metrics[key] == pytest.approx(score[key])

    # The score stage registered the quantized model: loaded by name it gives the checkpoint's logits on the test
    # images, bit for bit; the version carries what it scored.
    assert parent.data.tags["micronet.registered_model"] == "micronet-demo"
    version = client.get_model_version("micronet-demo", parent.data.tags["micronet.registered_model_version"])
    assert version.tags == {k: str(score[k]).lower() for k in ("accuracy", "score", "qualifies")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    registered = mlflow.pyfunc.load_model("models:/micronet-demo/latest")
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        logits = model.eval()(images)
    assert np.array_equal(registered.predict(images.numpy()), logits.numpy())
    assert (logits.argmax(1) == torch.tensor([test[i][1] for i in range(len(test))])).sum() == score["correct"]
    # the saved runs view (experiment tag) that `micronet views` links to shows the headline columns
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.micronet-scores"])["state"])
    assert view["selectedColumns"] == ["metrics.`accuracy`", "metrics.`params`", "metrics.`flops`",
                                       "metrics.`score`", "tags.`qualifies`"]
    train_run = next(r for r in runs if r.info.run_name == "train")
    assert len(client.get_metric_history(train_run.info.run_id, "val_acc")) == params.train.epochs  # one an epoch
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"train.json", "train.csv", "train.png"} <= artifacts
    assert not list(repo.rglob("mlruns"))

    # A code change re-runs the stages that import it: scoring.py is used by quantize (BN folding) and score.
    with open(repo / "micronet/scoring.py", "a") as f:
        f.write("\n# touched\n")
    status = run(["dvc", "status"], demo, env)
    changed = {s for s in ("data", "train", "prune", "sparsify", "quantize", "score") if f"{s}:" in status}
    assert changed == {"quantize", "score"}, status
    run(["git", "checkout", "micronet/scoring.py"], repo, env)

    # Change one knob: only the stages downstream of prune run again (here also the method: Torch-Pruning channels,
    # and, to keep the suite short, fine-tuning epochs of 4 batches: accuracy was checked above).
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    short = [f"-S+{stage}.finetune.max_steps_per_epoch=4" for stage in ("prune", "sparsify")]  # +: a new key
    out = run(["dvc", "exp", "run", "-S", "prune.rate=0.5", "-S", "prune.method=channels", *short], demo, env)
    assert stages_run(out) == ["prune", "sparsify", "quantize", "score"]
    prune = json.loads((demo / "metrics/prune.json").read_text())
    assert 0.5 <= prune["rate"] <= 0.51
    assert not torch.load(demo / "models/prune.pt", map_location="cpu", weights_only=True)["factorization"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 2
    # the experiment's parent run is named after the experiment DVC ran
    exp_parent = next(p for p in parents if not p.info.run_name.startswith("wave-"))
    exp_children = sorted(r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == exp_parent.info.run_id)
    assert exp_children == ["prune", "quantize", "score", "sparsify"]

    # The README's short view of the experiments fits a terminal and keeps what a run scored.
    shown = run(["make", "-s", "exp-show", "UV=/usr/bin/true", "RUN="], repo, env)
    assert max(len(line) for line in shown.splitlines()) <= 160, shown
    header = next(line for line in shown.splitlines() if "Experiment" in line)
    assert all(column in header for column in ("accuracy", "score", "prune.rate", "reached_rate")), shown
    assert "prune.rate" in header and "sparsify.rate" not in header  # params that differ between runs only

    # Sharing: the experiment goes to a git remote and its checkpoints to the pipeline's default DVC remote
    # (~/.cache/micronet/dvc-remote/demo, here under a temporary HOME); a fresh clone pulls them byte-identical.
    # Then the committed route: `dvc push` of the workspace, dvc.lock in git, `dvc pull` in another clone.
    share = {**env, "HOME": str(repo.parent / "home")}
    origin = repo.parent / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], repo.parent, env)
    run(["git", "remote", "add", "origin", str(origin)], repo, env)
    run(["git", "push", "-q", "origin", "HEAD"], repo, env)
    name = exp_parent.info.run_name  # DVC's name of the experiment
    run(["dvc", "exp", "push", "origin", name], demo, share)
    assert list((repo.parent / "home/.cache/micronet/dvc-remote/demo/files/md5").iterdir())
    checkpoints = {p.name: p.read_bytes() for p in (demo / "models").glob("*.pt")}
    assert set(checkpoints) == {"train.pt", "prune.pt", "sparsify.pt", "quantize.pt"}
    clone = repo.parent / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], repo.parent, env)
    run(["dvc", "exp", "pull", "origin", name], clone / "pipelines/demo", share)
    run(["dvc", "exp", "apply", name], clone / "pipelines/demo", share)
    assert {p.name: p.read_bytes() for p in (clone / "pipelines/demo/models").glob("*.pt")} == checkpoints
    run(["dvc", "push"], demo, share)
    run(["git", "add", "pipelines/demo/dvc.lock"], repo, env)
    run(["git", "commit", "-qm", "the experiment as the baseline"], repo, env)
    run(["git", "push", "-q", "origin", "HEAD"], repo, env)
    other = repo.parent / "other"
    run(["git", "clone", "-q", str(origin), str(other)], repo.parent, env)
    run(["dvc", "pull"], other / "pipelines/demo", share)
    assert {p.name: p.read_bytes() for p in (other / "pipelines/demo/models").glob("*.pt")} == checkpoints
