"""The shared training loop: learning, schedules, masks held at zero, resume after an interruption, DDP."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

from micronet.config import OptimConfig
from micronet.errors import MicronetError
from micronet.training import Runtime, fit

REPO = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"))


def blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two separable classes: a tiny net must learn them in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * (y[:, None] * 2 - 1)
    return TensorDataset(x, y)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_fit_learns_and_keeps_the_best_validation_epoch():
    model = small_net()
    result = fit(model, blobs(), blobs(128, seed=1), OptimConfig(epochs=4, lr=0.1), CPU, batch_size=32)
    assert len(result.history) == 4
    assert result.best_val_top1 >= 0.95
    assert result.best_val_top1 == max(r["val_acc"] for r in result.history)


def test_progress_lines_outside_a_terminal(capsys, monkeypatch):
    """Output that is not a terminal (DVC, CI, a log file) gets no bar: a line every PROGRESS_SECONDS instead."""
    import micronet.training as training

    monkeypatch.setattr(training, "PROGRESS_SECONDS", 0.0)
    fit(small_net(), blobs(), None, OptimConfig(epochs=1, lr=0.1, select="last"), CPU, batch_size=32, desc="train")
    lines = [l for l in capsys.readouterr().out.splitlines() if "images/s" in l]
    assert lines[0].startswith("train 1/1: step 1/8, ") and lines[-1].startswith("train 1/1: step 8/8, ")


def test_select_last_keeps_the_final_epoch_and_optimizer_state_carries_on():
    """select: last keeps the final weights (the validation split, if any, only draws curves); the kept epoch's
    optimizer state, given to the next fit, continues its moments (fastai's learn.save/load) under the new
    recipe's hyper-parameters."""
    cfg = OptimConfig(epochs=3, lr=0.05, optimizer="adamw", select="last")
    model = small_net()
    result = fit(model, blobs(), blobs(64, 1), cfg, CPU, batch_size=32, keep_optimizer=True)
    assert result.best_epoch == 3 and result.best_val_top1 == result.history[-1]["val_acc"]
    state = result.optimizer_state
    steps = 3 * (256 // 32)
    assert all(int(s["step"]) == steps for s in state["state"].values())
    with pytest.raises(MicronetError, match="select val needs"):
        fit(small_net(), blobs(), None, OptimConfig(epochs=1, select="val"), CPU, batch_size=32)
    more = fit(model, blobs(), None, OptimConfig(epochs=1, lr=0.01, optimizer="adamw", select="last"), CPU,
               batch_size=32, optimizer_state=state, keep_optimizer=True)
    assert all(int(s["step"]) == steps + 256 // 32 for s in more.optimizer_state["state"].values())
    assert more.optimizer_state["param_groups"][0]["lr"] == pytest.approx(0.01)  # the new recipe's


def test_masks_keep_pruned_weights_exactly_zero():
    model = small_net()
    mask = (torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        model[0].weight.mul_(mask)
    fit(model, blobs(), None, OptimConfig(epochs=2, lr=0.5, weight_decay=1e-3), CPU, batch_size=32,
        masks={"0.weight": mask})
    assert torch.all(model[0].weight[mask == 0] == 0)
    assert torch.all(model[0].weight[mask == 1] != 0)


def test_interrupted_training_resumes_from_the_last_epoch(tmp_path):
    resume = tmp_path / "train.resume.pt"
    seen: list[int] = []

    def interrupt_after_two(row):
        seen.append(row["epoch"])
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    cfg = OptimConfig(epochs=4, lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        fit(small_net(), blobs(), blobs(64, 1), cfg, CPU, batch_size=32, resume_path=resume, fingerprint="a",
            on_epoch=interrupt_after_two)
    assert resume.is_file()
    result = fit(small_net(), blobs(), blobs(64, 1), cfg, CPU, batch_size=32, resume_path=resume, fingerprint="a",
                 on_epoch=lambda row: seen.append(row["epoch"]))
    assert seen == [1, 2, 3, 4]  # epochs 1-2 were not trained again
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    # a different fingerprint (changed params or input) starts afresh
    seen.clear()
    fit(small_net(), blobs(), None, cfg, CPU, batch_size=32, resume_path=resume, fingerprint="b",
        on_epoch=lambda row: seen.append(row["epoch"]))
    assert seen == [1, 2, 3, 4]


def test_train_stage_under_torchrun_two_cpu_processes(tmp_path):
    """`distributed.nproc_per_node: 2` relaunches the stage under torchrun: two gloo processes, one checkpoint.
    With a teacher (UCI's distillation, given with --teacher) the student is wrapped in DDP and the teacher runs
    beside it on every rank, unwrapped: nothing of DDP ends up in the saved weights."""
    from micronet.checkpoint import atomic_save, make_checkpoint
    from micronet.data import write_synthetic_cifar100
    from micronet.nets import create_model

    write_synthetic_cifar100(tmp_path / "data", n_train=200, n_test=100, seed=0)
    params = yaml.safe_load((REPO / "pipelines/demo/params.yaml").read_text())
    params["data"].update(root=str(tmp_path / "data"), val_size=40, batch_size=32)
    params["data"]["augment"]["autoaugment"] = None
    params["model"]["args"].update(depth=11, alpha=8)
    params["train"].update(epochs=1)
    params["distributed"] = {"nproc_per_node": 2, "device": "cpu", "backend": "gloo", "threads": 1}
    params["tracking"] = {"enabled": False, "experiment": "t"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(1)
    teacher_args = {**params["model"]["args"], "alpha": 4}
    atomic_save(make_checkpoint(create_model("pyramidnet", **teacher_args), "pyramidnet", teacher_args),
                tmp_path / "teacher.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "micronet.cli", "train", "--params", "params.yaml", "--teacher", "teacher.pt",
         "--output", "m.pt", "--metrics", "m.json", "--plots", "m.csv"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "m.json").read_text())
    assert "2 processes -> m.pt" in proc.stdout
    state = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("module.") for k in state)
    assert state["fc.weight"].shape == (100, 96)  # the student's (alpha 8), not the teacher's (alpha 4: 80 inputs)
    # the reported accuracy is the saved model's on the validation split (both processes agreed on one model)
    from micronet.checkpoint import load_model
    from micronet.config import load_params
    from micronet.data import build_splits
    from micronet.training import evaluate, make_loader

    model, _ = load_model(tmp_path / "m.pt")
    val = build_splits(load_params(tmp_path / "params.yaml").data).val
    assert summary["val_accuracy"] == evaluate(model, make_loader(val, 40, CPU, train=False, workers=0), CPU).top1


def test_multi_step_stage_resumes_after_the_last_finished_step(tmp_path):
    """Kill sparsify during step 2: the re-run keeps step 1's result and only does step 2."""
    from micronet.compression.sparsity import apply_masks, global_magnitude_masks, prunable_weights
    from micronet.config import Params, SparsifyConfig
    from micronet.nets import create_model
    from micronet.runner import clear_steps, compress_in_steps
    from micronet.tracking import StageTracker

    params = Params.model_validate(yaml.safe_load((REPO / "pipelines/demo/params.yaml").read_text()))
    section = SparsifyConfig(rate=0.5, steps=2, finetune=OptimConfig(epochs=1, lr=0.01, batch_size=16))
    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    splits = type("S", (), {"train": data, "val": None})()
    source = tmp_path / "input.pt"
    source.write_bytes(b"the stage's input checkpoint")
    calls: list[int] = []

    def compress(model, step, target):
        calls.append(step)
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        masks = global_magnitude_masks(prunable_weights(model), target)
        apply_masks(model, masks)
        return masks

    def run():
        torch.manual_seed(0)
        model = create_model("pyramidnet", depth=11, alpha=4, num_classes=10)
        return compress_in_steps(
            "sparsify", model, {"arch": "pyramidnet", "args": {"depth": 11, "alpha": 4, "num_classes": 10}},
            section, compress, lambda m, t: {}, params=params, input=source, splits=splits, runtime=CPU,
            track=StageTracker(), output=tmp_path / "sparsify.pt",
        )

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run()
    assert (tmp_path / "sparsify.steps.resume.pt").is_file()
    interrupt, calls = False, []
    model, rows = run()
    assert calls == [1] and [r["step"] for r in rows] == [1, 2]
    weights = torch.cat([w.detach().flatten() for w in prunable_weights(model).values()])
    assert (weights == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "sparsify.steps.resume.pt").is_file()  # kept until the stage has written all its outputs
    clear_steps(tmp_path / "sparsify.pt")
    assert not (tmp_path / "sparsify.steps.resume.pt").exists()


def test_gpu_resident_loader_trains_through_the_one_loop(tmp_path, monkeypatch):
    """data.loader: gpu (here on the CPU device): the training split lives as uint8 tensors on the device and
    the loop takes the ready batches; an augmentation without a batched version falls back to workers."""
    from micronet import runner
    from micronet.config import Params
    from micronet.data import write_synthetic_cifar100
    from micronet.data.gpu import GpuCifarLoader
    from micronet.nets import create_model

    write_synthetic_cifar100(tmp_path / "data", n_train=300, n_test=100, seed=0)
    raw = yaml.safe_load((REPO / "pipelines/demo/params.yaml").read_text())
    raw["data"].update(root=str(tmp_path / "data"), val_size=100, batch_size=50, loader="gpu")
    raw["data"]["augment"].update(autoaugment=None, cutout=8)
    params = Params.model_validate(raw)
    recipe_cfg = OptimConfig(epochs=1, lr=0.05, max_steps_per_epoch=3)
    splits, train = runner.training_data(params, recipe_cfg, CPU, seed=0)
    assert isinstance(train, GpuCifarLoader) and len(train) == 200 // 50
    torch.manual_seed(0)
    model = create_model("pyramidnet", depth=11, alpha=4)
    result = fit(model, train, splits.val, recipe_cfg, CPU, batch_size=50, num_classes=100)
    assert len(result.history) == 1 and result.best_val_top1 is not None

    jitter = OptimConfig(augment={"brightness": 0.2})
    _, fallback = runner.training_data(params, jitter, CPU)
    assert not isinstance(fallback, GpuCifarLoader)


def test_dnw_stage_under_torchrun_two_gloo_processes(tmp_path):
    """The DNW pipeline's train stage, as the multi-GPU run does it, on two CPU processes: ResNet-50 with per-layer
    top-k sparsity on synthetic ImageNet-format JPEGs; one checkpoint with exactly k of every layer but the stem."""
    import json

    params = yaml.safe_load((REPO / "pipelines/dnw/params.yaml").read_text())
    params["data"].update(root=str(tmp_path / "imagenet"), synthetic={"classes": 4, "train": 10, "test": 4,
                          "size": 40, "seed": 0}, val_size=8, batch_size=8, eval_batch_size=8, workers=0,
                          image_size=32, eval_resize=36)
    params["model"]["args"]["num_classes"] = 4
    params["train"].update(epochs=1, max_steps_per_epoch=2, schedule={"kind": "cosine"})
    params["distributed"] = {"nproc_per_node": 2, "device": "cpu", "backend": "gloo", "threads": 1}
    params["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "micronet.cli", "train", "--params", "params.yaml", "--output", "m.pt",
         "--metrics", "m.json", "--plots", "m.csv"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes -> m.pt" in proc.stdout
    layers = json.loads((tmp_path / "m_layers.json").read_text())
    assert layers.pop("conv1")["density"] == 1.0
    assert all(r["nonzero"] == r["numel"] - int(0.9 * r["numel"]) for r in layers.values())
    state = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("parametrizations" in k for k in state)  # baked: plain weights with exact zeros


@pytest.fixture
def numerics():
    """Leave the process-wide switches as the test found them."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    import os

    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3:]
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_fp32_on_cuda_switches_tf32_off_and_deterministic_is_opt_in(numerics):
    import os

    from micronet.training import configure_numerics

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cuda = Runtime(torch.device("cuda"))  # the flags only: nothing runs on the device
    configure_numerics(OptimConfig(precision="bf16"), cuda)
    configure_numerics(OptimConfig(precision="fp32"), CPU)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # bf16 / CPU: untouched
    assert not torch.are_deterministic_algorithms_enabled()  # off by default
    configure_numerics(OptimConfig(precision="fp32"), cuda)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    configure_numerics(OptimConfig(precision="fp32", deterministic=True), CPU)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_fit_under_deterministic_gives_the_same_weights_twice(numerics):
    cfg = OptimConfig(epochs=1, lr=0.05, precision="fp32", deterministic=True, select="last")
    runs = []
    for _ in range(2):
        model = small_net()
        fit(model, blobs(), None, cfg, CPU, batch_size=32, seed=3)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(*runs) and torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_fit_on_cuda_runs_without_tf32(numerics):
    cuda = Runtime(torch.device("cuda"))
    fit(small_net(), blobs(64), None, OptimConfig(epochs=1, precision="fp32", select="last"), cuda, batch_size=32)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_weight_decay_exemption_sees_through_parametrizations():
    """QAT parametrizes weights and biases (`parametrizations.weight.original`): decay_norm_and_bias false must
    still exempt BatchNorm parameters and biases by the parameter they stand for."""
    import torch.nn.utils.parametrize as parametrize

    from micronet.recipe import parameter_groups, underlying_name

    class Same(nn.Module):
        def forward(self, w):
            return w

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Linear(4, 2))
    for module, name in [(model[0], "weight"), (model[0], "bias"), (model[1], "weight"), (model[2], "weight")]:
        parametrize.register_parametrization(module, name, Same())
    assert underlying_name("0.parametrizations.weight.original") == ("0", "weight")
    assert underlying_name("1.bias") == ("1", "bias")
    decayed, exempt = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.parametrizations.weight.original",
                                                                "2.parametrizations.weight.original"]
    assert sorted(names[id(p)] for p in exempt["params"]) == [
        "0.parametrizations.bias.original", "1.bias", "1.parametrizations.weight.original", "2.bias"]
