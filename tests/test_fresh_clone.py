"""What a new user meets around the stages: `make demo`'s thread count and its short summary table, one line on
Ctrl-C, one line for a duplicate key in an overlay, MLflow's noise kept out of a stage's output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from micronet import cli

REPO = Path(__file__).resolve().parents[1]


def micronet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_duplicate_key_in_an_overlay_is_one_line_and_params_stay(tmp_path):
    params = tmp_path / "params.yaml"
    original = (REPO / "pipelines/demo/params.yaml").read_text()
    params.write_text(original)
    overlay = tmp_path / "toy.yaml"
    overlay.write_text("prune:\n  rate: 0.3\n  rate: 0.4\n")
    proc = micronet("params", "apply", "toy.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "toy.yaml" in lines[0] and "'rate' given twice" in lines[0] and "line 3" in lines[0], lines
    assert params.read_text() == original


def test_ctrl_c_is_one_line_saying_how_to_resume_and_exit_130(monkeypatch, capsys):
    app = typer.Typer()

    @app.command()
    def slow() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # interrupted at once
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["micronet"])
    # A terminal's Ctrl-C: Python's own handler, whatever the runner inherited (started with `nohup ... &`, SIGINT
    # is ignored, and then main() rightly leaves it so)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert exit_info.value.code == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [cli.RESUME_HINT], err
    assert "resume" in cli.RESUME_HINT and "dvc repro" in cli.RESUME_HINT
    assert after is before  # the handler is put back


def test_no_resume_line_without_ctrl_c(monkeypatch, capsys):
    app = typer.Typer()

    @app.command()
    def done() -> None:
        raise typer.Exit(130)  # a 130 that is no interrupt says nothing

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["micronet"])
    with pytest.raises(SystemExit):
        cli.main()
    assert cli.RESUME_HINT not in capsys.readouterr().err


def test_mlflow_noise_is_off_unless_the_environment_says_otherwise(monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    cli.quiet_mlflow()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    cli.quiet_mlflow()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"  # the user's value wins
    logger = logging.getLogger("mlflow.utils.environment")
    with caplog.at_level(logging.WARNING, logger="mlflow.utils.environment"):
        logger.warning("Failed to resolve installed pip version. ``pip`` will be added to conda.yaml environment "
                       "spec without a version specifier.")
        logger.warning("something else MLflow has to say")
    assert [r.getMessage() for r in caplog.records] == ["something else MLflow has to say"]


def test_summary_is_one_short_row_and_a_toy_run_says_it_cannot_qualify(tmp_path):
    (tmp_path / "metrics").mkdir()
    scored = {"accuracy": 0.554, "chance": 0.01, "top5": 0.8, "correct": 277, "total": 500, "params": 12345.5,
              "flops": 6789012.25, "score": 0.0123456789, "qualifies": False, "param_bits": 1, "mults": 2, "adds": 3}
    (tmp_path / "metrics/score.json").write_text(json.dumps(scored))
    (tmp_path / "params.yaml").write_text((REPO / "pipelines/demo/params.yaml").read_text())
    proc = micronet("summary", "--pipeline", "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header, row, source, toy = proc.stdout.splitlines()
    assert "metrics/score.json" in source  # tests/test_e2e_pipelines.py looks for it in make demo's output
    assert header.split() == ["pipeline", "accuracy", "chance", "params", "flops", "score", "qualifies"]
    assert row.split() == ["demo", "0.5540", "0.0100", "12,345.50", "6,789,012.25", "0.0123457", "false"]
    assert "cannot qualify" in toy and "real test split" in toy
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # full scale: no toy line
    assert len(micronet("summary", cwd=tmp_path).stdout.splitlines()) == 3


def test_summary_without_a_score_is_one_line(tmp_path):
    proc = micronet("summary", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "metrics/score.json" in proc.stderr


def make_dry(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make")
def test_make_demo_pins_prints_the_threads_and_ends_with_the_summary(tmp_path):
    fresh = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    default = make_dry("demo", env=fresh)
    assert "OMP_NUM_THREADS=2" in default and "micronet summary --pipeline demo" in default
    assert "dvc metrics show" not in default
    assert "OMP_NUM_THREADS=1" in make_dry("demo", env={**fresh, "OMP_NUM_THREADS": "1"})  # a test worker's share
    # The recipe run for real, each `uv run` replaced by printing the thread count the stage would get.
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/score_layers.txt").write_text("totals\n")
    proc = subprocess.run(["make", "-s", "--no-print-directory", "demo", "UV=/bin/true", f"PIPELINE_DIR={tmp_path}",
                           "RUN=printenv OMP_NUM_THREADS; true", "THREADS=3"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "7"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "OMP_NUM_THREADS=3" in lines[0], lines
    assert lines.count("3") == 2 and "7" not in lines, lines  # the dvc run and the summary, both at THREADS


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make")
def test_make_mlflow_ui_serves_with_one_worker():
    assert "--workers 1" in make_dry("mlflow-ui")


@pytest.mark.parametrize("command,section", [("train", "`train`"), ("prune", "`prune.rate`"),
                                             ("sparsify", "`sparsify.rate`"), ("quantize", "`quantize`"),
                                             ("score", "`score.task`"), ("params apply", "README"),
                                             ("import", "`import`")])
def test_stage_help_names_its_params_section_and_the_readme_section(command, section):
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, [*command.split(), "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert section in text and "README: \"" in text, text
    quoted = [q for q in text.split("README: ")[1].split('"')[1::2]]
    readme = (REPO / "README.md").read_text()
    for heading in quoted:  # every README section a help text names exists, as a heading's start
        assert any(line.startswith("## " + heading) for line in readme.splitlines()), heading
    if command == "prune":
        assert "eigendamage" in text and "low rank" in text


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make")
@pytest.mark.parametrize("code", [0, 3])
def test_make_demo_drops_dvcs_first_run_warning_only_and_keeps_the_exit_status(tmp_path, code):
    fake = tmp_path / "run"
    fake.write_text("#!/bin/bash\n[ \"$1\" = dvc ] || exit 0\n"
                    "echo \"WARNING: No file hash info found for '$PWD/models/train.pt'. It won't be created.\"\n"
                    "echo \"Running stage 'train':\"\necho 'WARNING: something else' >&2\n"
                    f"exit {code}\n")
    fake.chmod(0o755)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/score_layers.txt").write_text("totals\n")
    proc = subprocess.run(["make", "-s", "--no-print-directory", "demo", "UV=/bin/true", f"PIPELINE_DIR={tmp_path}",
                           f"RUN={fake}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) is (code == 0), proc.stderr
    assert "No file hash info" not in proc.stdout + proc.stderr
    assert "Running stage 'train':" in proc.stdout and "WARNING: something else" in proc.stdout
