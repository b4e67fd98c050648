import base64
import io
from pathlib import Path

import pytest
import typer
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from micronet import report
from micronet.errors import MicronetError
from micronet.plots import compression_steps, training_curves
from micronet.tracking import (
    MODEL_NAME_TAG, MODEL_VERSION_TAG, PIPELINE_RUN_TAG, PIPELINE_TAG, QUALIFIES_TAG, SELECT_TAG, tracking_uri,
)
from stages.report import report_command

BASE_PARAMS = {"train.epochs": "3", "prune.rate": "0.65", "score.task": "cifar100", "tracking.experiment": "x"}


def _parent(client, experiment_id, name, pipeline, params, metrics, qualifies="true", commit="ab638e1aaaa",
            tags=None):
    run = client.create_run(
        experiment_id, run_name=name,
        tags={PIPELINE_RUN_TAG: name, PIPELINE_TAG: pipeline, "mlflow.source.git.commit": commit,
              **({QUALIFIES_TAG: qualifies, MODEL_NAME_TAG: f"micronet-{pipeline}", MODEL_VERSION_TAG: "2"}
                 if metrics else {}), **(tags or {})},
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    if metrics:  # the score stage's child run carries the same metrics: it must not become a row
        child = client.create_run(experiment_id, run_name="score", tags={"mlflow.parentRunId": run.info.run_id})
        for key, value in metrics.items():
            client.log_metric(child.info.run_id, key, value)
    return run.info.run_id


def _store(tmp_path) -> MlflowClient:
    """Two pipeline experiments (wave at full scale, a kaist demo), a run that has no score yet, and an
    experiment whose runs are not pipeline runs."""
    client = MlflowClient(tracking_uri())
    art = lambda name: (tmp_path / "art" / name).as_uri()  # noqa: E731
    wave = client.create_experiment("wave", artifact_location=art("wave"))
    demo = client.create_experiment("demo-kaist", artifact_location=art("demo"))
    other = client.create_experiment("scratch", artifact_location=art("scratch"))
    metrics = lambda acc, score: {"accuracy": acc, "top5": 0.95, "params": 400000.0, "flops": 3.9e8,  # noqa: E731
                                  "score": score}
    _parent(client, wave, "wave-rate50", "wave", {**BASE_PARAMS, "prune.rate": "0.5"}, metrics(0.8102, 0.061))
    _parent(client, wave, "wave-rate65", "wave", BASE_PARAMS, metrics(0.8031, 0.047))
    _parent(client, wave, "wave-rate80", "wave", {**BASE_PARAMS, "prune.rate": "0.8"}, metrics(0.7702, 0.039),
            qualifies="false", tags={SELECT_TAG: "test"})
    _parent(client, wave, "wave-rate90", "wave", {**BASE_PARAMS, "prune.rate": "0.9"}, {})  # unfinished
    _parent(client, demo, "demo-a", "kaist", BASE_PARAMS, metrics(0.02, 0.0061))
    _parent(client, demo, "demo-b", "kaist", BASE_PARAMS, metrics(0.03, 0.0063), commit="ffff000")
    client.create_run(other, run_name="unrelated", tags={"note": "no micronet.pipeline tag"})
    return client


def test_report_writes_plot_tables_and_html_and_logs_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report experiment's artifacts go beside the repository root found from here
    with pytest.raises(MicronetError, match="no pipeline runs .* in sqlite:///.*make demo"):
        report.make_report(tmp_path / "empty")
    client = _store(tmp_path)
    app = typer.Typer()
    app.command()(report_command)
    result = CliRunner().invoke(app, ["--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"

    summary = (out / "summary.md").read_text()
    runs_section = summary.split("## Runs")[1].split("## Published figures")[0]
    run_lines = [line for line in runs_section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(run_lines) == 6  # parents only: no child run, nothing from "scratch"
    row = {line.split(" | ")[2]: line for line in run_lines}
    assert "prune.rate=0.5" in row["wave-rate50"] and "prune.rate=0.65" in row["wave-rate65"]
    assert "prune.rate=0.9" in row["wave-rate90"] and "unfinished" in row["wave-rate90"]
    assert "train.epochs" not in summary and "commit=" not in row["wave-rate50"]  # equal values are not changes
    assert "commit=ab638e1" in row["demo-a"] and "commit=ffff000" in row["demo-b"]
    assert "| 0.8031 | 400,000 | 390,000,000 | 0.047 | yes | 0.0456 (submission 3) |" in row["wave-rate65"]
    # each run links to its MLflow run page and to the model version its score stage registered
    wave_id = client.get_experiment_by_name("wave").experiment_id
    run_id = client.search_runs([wave_id], "attributes.run_name = 'wave-rate65'")[0].info.run_id
    assert row["wave-rate65"].endswith(
        f"| [{run_id[:8]}](http://127.0.0.1:5000/#/experiments/{wave_id}/runs/{run_id}) "
        "| [micronet-wave v2](http://127.0.0.1:5000/#/models/micronet-wave/versions/2) |")
    assert f"/#/experiments/{wave_id}/runs/" in row["wave-rate90"] and row["wave-rate90"].endswith(") | - |")  # none
    assert "| 0.7702 (selected on test, as published) |" in row["wave-rate80"]
    assert "selected on test" not in row["wave-rate65"]
    assert "| no |" in row["wave-rate80"] and "kaist (demo)" in row["demo-a"] and "0.0054 (ver1 60%)" in row["demo-a"]
    # runs in report order: by pipeline, then experiment, finished by score, unfinished last
    assert [line.split(" | ")[2] for line in run_lines] == [
        "demo-a", "demo-b", "wave-rate80", "wave-rate65", "wave-rate50", "wave-rate90"]
    assert "| uci * | UCI/Qualcomm | ex | cifar100 | 0.8012 | 2,793,064 | 382,885,052 | 0.074762 | 0.12541 |" in summary

    png = (out / "pareto.png").read_bytes()
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and 800 <= image.width <= 2500 and 400 <= image.height <= 1500
    page = (out / "index.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    assert "wave-rate50" in page and "prune.rate=0.5" in page and "Discovering Neural Wirings" in page
    assert f'<a href="http://127.0.0.1:5000/#/experiments/{wave_id}/runs/{run_id}">{run_id[:8]}</a>' in page

    experiment = client.get_experiment_by_name(report.REPORT_EXPERIMENT)
    (logged,) = client.search_runs([experiment.experiment_id])
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id)) == sorted(report.REPORT_FILES)
    assert logged.data.metrics == {"runs": 6.0, "finished": 5.0, "qualifying": 4.0}
    assert logged.info.run_id in result.output

    with pytest.raises(MicronetError, match="no experiment 'wav'.*demo-kaist, micronet-report, scratch, wave"):
        report.make_report(tmp_path / "again", ["wav"])
    files, _ = report.make_report(tmp_path / "only-demo", ["demo-kaist"])
    assert "wave-rate50" not in files["summary.md"].read_text()
    assert len(client.search_runs([experiment.experiment_id])) == 2  # one report run per call


def test_runs_of_both_tasks_get_one_panel_each(tmp_path):
    run = lambda name, task, acc, score: report.PipelineRun(  # noqa: E731
        run_id=name, experiment="e", name=name, pipeline="dnw" if task == "imagenet" else "wave", task=task,
        params={}, metrics={"accuracy": acc, "score": score}, qualifies=True, commit="")
    runs = [run("a", "cifar100", 0.81, 0.05), run("b", "imagenet", 0.76, 0.9)]
    one = Image.open(report.draw_pareto(runs[:1], report.published_figures(), tmp_path / "one.png"))
    two = Image.open(report.draw_pareto(runs, report.published_figures(), tmp_path / "two.png"))
    assert two.width > one.width * 1.5 and two.height == one.height


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [(0.05, 0.80), (0.04, 0.79), (0.06, 0.79), (0.03, 0.70), (0.05, 0.80), (0.10, 0.81), (0.04, 0.60)]
    # (0.06, 0.79) loses to (0.05, 0.80); (0.04, 0.60) to (0.04, 0.79); the second (0.05, 0.80) repeats the first
    assert report.pareto_front(points) == [3, 1, 0, 5]
    assert report.pareto_front([]) == []


def test_changed_params_are_per_experiment_and_count_missing_keys():
    run = lambda rid, exp, params: report.PipelineRun(  # noqa: E731
        run_id=rid, experiment=exp, name=rid, pipeline="wave", task="cifar100", params=params, metrics={},
        qualifies=None, commit="")
    runs = [run("a", "e1", {"p": "1", "q": "x"}), run("b", "e1", {"p": "2", "q": "x"}), run("c", "e1", {"q": "x"}),
            run("d", "e2", {"p": "9"})]
    assert report.changed_params(runs) == {"a": {"p": "1"}, "b": {"p": "2"}, "c": {"p": "-"}, "d": {}}


def test_published_figures_hold_the_submissions_numbers():
    published = report.published_figures()
    assert sorted(published) == ["dnw", "fastai-wrn", "kaist", "uci", "wave"]
    wave = {e.name: e for e in published["wave"].entries}
    assert published["wave"].reproduced is wave["submission 3"]
    assert (wave["submission 3"].accuracy, wave["submission 3"].params, wave["submission 3"].ops) == (
        0.8001, 324670, 384.8e6)
    assert [e.leaderboard for e in published["wave"].entries] == [0.0456, 0.0464, 0.0467]
    assert [e.name for e in published["kaist"].entries] == ["ver1 60%", "ver2 60%"]
    assert [e.name for e in published["uci"].entries] == ["ex", "exx"]
    assert published["dnw"].task == "imagenet" and published["dnw"].reproduced.ops_unit == "MACs"

    # each team's own arithmetic gives its own score from its own figures, to the last digit it published
    def team_score(name: str, params_factor: float = 1.0, ops_factor: float = 1.0) -> float:
        figures = published[name]
        entry, ref = figures.reproduced, report.TASKS[figures.task]
        return params_factor * entry.params / ref["params_ref"] + ops_factor * entry.ops / ref["ops_ref"]

    def own(name: str) -> float:
        return published[name].reproduced.score

    assert team_score("wave") == pytest.approx(own("wave"), abs=1e-5) and own("wave") == 0.04558
    assert team_score("kaist") == pytest.approx(own("kaist"), abs=1e-7) and own("kaist") == 0.0054454
    assert team_score("uci", params_factor=0.5) == pytest.approx(own("uci"), abs=1e-6) and own("uci") == 0.074762
    assert team_score("fastai-wrn") == pytest.approx(own("fastai-wrn"), abs=1e-6) and own("fastai-wrn") == 0.463465
    assert team_score("dnw", ops_factor=2) == pytest.approx(own("dnw"), abs=1e-6) and own("dnw") == 1.251568
    assert team_score("dnw", params_factor=0.5, ops_factor=1.5) == pytest.approx(0.8460, abs=1e-4)
    assert published["dnw"].reproduced.leaderboard == 0.8460


def test_a_published_file_is_validated_when_read(tmp_path):
    good = (Path(report.__file__).parent / "assets" / "published" / "wave.yaml").read_text()
    bad = tmp_path / "wave.yaml"
    bad.write_text(good.replace("accuracy: 0.8001", "accuracy: 80.01"))
    with pytest.raises(MicronetError, match=r"wave.yaml: key 'entries.0.accuracy' = 80.01: .*less than or equal"):
        report.read_published(bad)
    bad.write_text(good.replace("reproduces: submission 3", "reproduces: submission 4"))
    with pytest.raises(MicronetError, match="reproduces = 'submission 4' names no entry"):
        report.read_published(bad)
    renamed = tmp_path / "kaist.yaml"
    renamed.write_text(good)
    with pytest.raises(MicronetError, match="key 'pipeline' = 'wave': must be the file name 'kaist'"):
        report.read_published(renamed)
    bad.write_text(good + "extra: 1\n")
    with pytest.raises(MicronetError, match="key 'extra'"):
        report.read_published(bad)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def test_training_curves_draw_whatever_the_rows_hold(tmp_path):
    rows = [{"epoch": e, "lr": 0.1 / e, "train_loss": 4.0 / e, "train_acc": 0.1 * e, "val_loss": 4.2 / e,
             "val_acc": 0.09 * e, "seconds": 1.5} for e in range(1, 6)]
    width, height = _png_size(training_curves(rows, tmp_path / "train.png"))
    assert 1000 <= width <= 2000 and 300 <= height <= 700
    no_validation = [{"epoch": str(r["epoch"]), "lr": str(r["lr"]), "train_loss": r["train_loss"], "val_acc": ""}
                     for r in rows]  # as read back from the CSV, without a validation split
    assert _png_size(training_curves(no_validation, tmp_path / "csv.png")) == (width, height)
    assert training_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_compression_steps_plot_accuracy_against_parameters_or_sparsity(tmp_path):
    prune = [{"step": s, "target_rate": 0.3 * s, "rate": 0.29 * s, "parameters": 1000 - 290 * s,
              "val_accuracy": 0.8 - 0.02 * s} for s in (1, 2, 3)]
    width, height = _png_size(compression_steps(prune, tmp_path / "prune.png"))
    assert 500 <= width <= 1000 and 300 <= height <= 700
    sparsify = [{"step": 1, "target_rate": 0.3, "sparsity": 0.3, "val_accuracy": 0.79}]
    assert _png_size(compression_steps(sparsify, tmp_path / "sparsify.png", x="sparsity")) == (width, height)
    with pytest.raises(MicronetError, match="no row has both 'parameters' and 'val_accuracy'.*sparsity"):
        compression_steps(sparsify, tmp_path / "bad.png")
    with pytest.raises(MicronetError, match="x = 'epochs'"):
        compression_steps(prune, tmp_path / "bad.png", x="epochs")
    assert compression_steps([], tmp_path / "none.png") is None


def test_a_bit_width_sweep_of_kaist_wave_is_one_colour_with_its_changed_param(tmp_path):
    """kaist-wave has no published figures of its own: its runs still get a fixed colour, a panel and the swept
    param in their rows."""
    run = lambda bits, acc, score: report.PipelineRun(  # noqa: E731
        run_id=f"r{bits}", experiment="kaist-wave", name=f"bits{bits}", pipeline="kaist-wave", task="cifar100",
        params={"quantize.weight_bits": str(bits)}, metrics={"accuracy": acc, "score": score}, qualifies=acc >= 0.8,
        commit="")
    runs = [run(9, 0.801, 0.00415), run(8, 0.799, 0.0039), run(7, 0.79, 0.0037)]
    assert report._colours(["kaist-wave", "someone-new"])["kaist-wave"] == "tab:brown"
    assert report.changed_params(runs)["r8"] == {"quantize.weight_bits": "8"}
    rows = {r["run"]: r for r in report.run_rows(runs, report.published_figures())}
    assert rows["bits8"]["changed params"] == "quantize.weight_bits=8" and rows["bits8"]["score"] == "0.0039"
    assert rows["bits9"]["qualifies"] == "yes" and rows["bits7"]["published score"] == "-"
    png = report.draw_pareto(runs, report.published_figures(), tmp_path / "sweep.png")
    assert Image.open(png).format == "PNG"


def test_a_scored_release_is_re_measured_beside_its_published_entry():
    """A run whose score stage scored KAIST's released file as imported (tag micronet.released) fills that entry's
    "re-measured here" cell; demo runs and unfinished runs do not, and other entries keep "-"."""
    run = lambda name, released, acc, exp="kaist-released": report.PipelineRun(  # noqa: E731
        run_id=name, experiment=exp, name=name, pipeline="kaist", task="cifar100", params={},
        metrics={"accuracy": acc, "score": 0.00539376} if acc else {}, qualifies=True, commit="", released=released)
    runs = [run("v1", "micronet_v1_pr_60.t7", 0.8007), run("toy", "micronet_v2_pr_60.t7", 0.01, "demo-kaist"),
            run("v2-unfinished", "micronet_v2_pr_60.t7", None)]
    rows = {r["entry"]: r for r in report.published_rows(report.published_figures(), runs)}
    assert rows["ver1 60%"]["re-measured here"] == "0.8007 at 0.00539376 (kaist-released/v1)"
    assert rows["ver2 60%"]["re-measured here"] == "-" and rows["ex"]["re-measured here"] == "-"


def test_toy_panels_hold_no_published_entries_and_labels_do_not_overlap(tmp_path):
    points = [(0.30 + 0.0005 * i, 0.0100 + 0.00002 * i) for i in range(4)] + [(0.6, 0.03)]  # 4 on one spot
    runs = [report.PipelineRun(run_id=f"r{i}", experiment=f"{report.DEMO_PREFIX}wave", name=f"demo-wave-run-{i}",
                               pipeline="wave", task="cifar100", params={}, metrics={"accuracy": a, "score": sc},
                               qualifies=False, commit="")
            for i, (a, sc) in enumerate(points)]
    assert all(r.demo for r in runs)
    fig = report.pareto_figure(runs, report.published_figures())
    (ax,) = fig.axes
    assert "toy" in ax.get_title() and "not comparable" in ax.get_title()
    assert ax.get_ylim()[1] < 0.7 and ax.get_ylim()[0] > 0.2  # no published entry nor gate squash them
    names = {t.get_text() for t in ax.texts}
    teams = {p.team for p in report.published_figures().values()}
    assert not names & teams, names & teams  # no published entry's label in a toy panel
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 5
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlapping, "labels overlap"


def test_a_front_of_one_run_is_drawn(tmp_path):
    one = report.PipelineRun(run_id="a", experiment="wave", name="wave-one", pipeline="wave", task="cifar100",
                             params={}, metrics={"accuracy": 0.81, "score": 0.05}, qualifies=True, commit="")
    fig = report.pareto_figure([one], report.published_figures())
    ax = fig.axes[0]
    assert "one run" in ax.get_title()
    rings = [c for c in ax.collections if len(c.get_offsets()) == 1 and not c.get_facecolors().any()
             and tuple(c.get_offsets()[0]) == (0.05, 0.81)]
    assert rings, "no front drawn around the single run"
    assert "wave-one" in {t.get_text() for t in ax.texts}
    assert Image.open(report.draw_pareto([one], report.published_figures(), tmp_path / "one.png")).format == "PNG"
