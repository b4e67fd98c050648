"""The `micronet` command as a user meets it: one-line errors, nothing overwritten, `count` for any arch."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def micronet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "micronet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def demo_params(tmp_path: Path, mutate=lambda p: None) -> Path:
    params = yaml.safe_load((REPO / "pipelines/demo/params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_rate_fails_fast_and_overwrites_nothing(tmp_path):
    demo_params(tmp_path, lambda p: p["prune"].__setitem__("rate", 1.5))
    existing = tmp_path / "models" / "prune.pt"
    existing.parent.mkdir()
    existing.write_bytes(b"previous result")
    for stage in ("train", "prune", "quantize"):  # every stage validates the whole file
        line = one_line_error(micronet(stage, cwd=tmp_path))
        assert "params.yaml" in line and "prune.rate" in line and "1.5" in line and "less than 1" in line
    assert existing.read_bytes() == b"previous result"


def test_unknown_key_is_named(tmp_path):
    demo_params(tmp_path, lambda p: p["quantize"].__setitem__("bitz", 4))
    assert "unknown key 'quantize.bitz'" in one_line_error(micronet("score", cwd=tmp_path))


def test_missing_dataset_says_where_to_put_it(tmp_path):
    demo_params(tmp_path, lambda p: p["data"].__setitem__("root", "nowhere"))
    line = one_line_error(micronet("train", cwd=tmp_path))
    assert "cifar-100-python" in line and "data.download: true" in line


def test_missing_input_checkpoint(tmp_path):
    from micronet.data import write_synthetic_cifar100

    demo_params(tmp_path)
    write_synthetic_cifar100(tmp_path / "data" / "synth", n_train=100, n_test=100, seed=0)
    line = one_line_error(micronet("sparsify", "--input", "models/none.pt", cwd=tmp_path))
    assert "models/none.pt" in line and "checkpoint not found" in line


def test_count_prints_a_table_for_a_registered_arch(tmp_path):
    proc = micronet("count", "--arch", "pyramidnet", "--input", "3,32,32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "params" in proc.stdout and "flops" in proc.stdout and "layer3.0.conv2" in proc.stdout
    bad = micronet("count", "--arch", "nonet", cwd=tmp_path)
    assert "'arch' = 'nonet': unknown architecture" in one_line_error(bad)


def test_more_processes_than_gpus_is_a_one_line_error(tmp_path, monkeypatch):
    """Whatever this machine has: pretend it sees one GPU and ask for four processes."""
    import pytest
    import torch

    from micronet import runner
    from micronet.data import write_synthetic_cifar100
    from micronet.errors import MicronetError

    path = demo_params(tmp_path, lambda p: p["distributed"].update(nproc_per_node=4, device="auto"))
    write_synthetic_cifar100(tmp_path / "data" / "synth", n_train=100, n_test=100, seed=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MicronetError) as err:
        runner.prepare(path, "train", [])
    message = str(err.value)
    assert "distributed.nproc_per_node' = 4" in message and "1 GPU(s) are visible" in message
    assert "set it to at most 1" in message and "\n" not in message


def test_help_is_fast_and_flags_are_flags(tmp_path):
    import time

    started = time.perf_counter()
    proc = micronet("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "train" in proc.stdout and "score" in proc.stdout
    assert time.perf_counter() - started < 10  # generous for a loaded CI box; bench/bench_cli.py times it
    count_help = micronet("count", "--help", cwd=tmp_path).stdout
    assert "--freebie" in count_help and "--checkpoint" in count_help and "<bool>" not in count_help.lower()
    assert "BOOLEAN" not in count_help


def test_a_switched_off_stage_passes_its_input_through(tmp_path):
    import json

    import torch

    from micronet.checkpoint import atomic_save, make_checkpoint
    from micronet.nets import create_model

    demo_params(tmp_path, lambda p: p["sparsify"].__setitem__("enabled", False))
    from micronet.data import write_synthetic_cifar100

    write_synthetic_cifar100(tmp_path / "data" / "synth", n_train=100, n_test=100, seed=0)
    torch.manual_seed(0)
    atomic_save(make_checkpoint(create_model("pyramidnet", depth=11, alpha=4), "pyramidnet",
                                {"depth": 11, "alpha": 4}), tmp_path / "in.pt")
    proc = micronet("sparsify", "--input", "in.pt", "--output", "out.pt", "--metrics", "m.json", "--plots", "p.csv",
                    "--layers", "l.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.pt").read_bytes() == (tmp_path / "in.pt").read_bytes()
    assert json.loads((tmp_path / "m.json").read_text()) == {}
    assert (tmp_path / "p.csv").is_file() and (tmp_path / "l.json").is_file()


def test_count_reads_a_saved_checkpoint(tmp_path):
    """`micronet count --checkpoint` counts the model as saved: here a sparse one, so masks are paid."""
    import torch

    from micronet.checkpoint import atomic_save, make_checkpoint
    from micronet.compression.sparsity import apply_masks, global_magnitude_masks, prunable_weights
    from micronet.nets import create_model
    from micronet.scoring import count

    torch.manual_seed(0)
    model = create_model("pyramidnet", depth=11, alpha=4, num_classes=10)
    apply_masks(model, global_magnitude_masks(prunable_weights(model), 0.5))
    atomic_save(make_checkpoint(model, "pyramidnet", {"depth": 11, "alpha": 4, "num_classes": 10}), tmp_path / "s.pt")
    proc = micronet("count", "--checkpoint", "s.pt", "--freebie", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = count(model, (3, 32, 32), freebie=True)
    assert f"score       {expected.score('cifar100'):.6f}  (cifar100)" in proc.stdout
    assert f"score       {expected.score('imagenet'):.6f}  (imagenet)" in proc.stdout
    assert f"param bits  {expected.param_bits:,.0f}" in proc.stdout and "0.5" in proc.stdout
    both = micronet("count", "--checkpoint", "s.pt", "--arch", "pyramidnet", cwd=tmp_path)
    assert both.returncode == 2 and "exactly one of --arch" in both.stderr
