"""Importing KAIST's released checkpoints: files are built here in their key layout (MicroNet_Prune's
state_dict with a `.mask` beside every >=2-D weight, or micronet_main.py's `net4` dict), never shipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import typer
from typer.testing import CliRunner

from micronet.checkpoint import build_from_checkpoint, load_model
from micronet.compression.sparsity import overall_sparsity, sparsity_report
from micronet.errors import MicronetError
from micronet.importers import import_kaist, kaist_layout, synthetic_kaist_model
from micronet.nets import create_model
from stages.import_checkpoint import import_command


pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_micronet(arch: str = "kaist_micronet_v1", rate: float = 0.6) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model as KAIST's pruning leaves it: global magnitude masks applied, BN statistics non-trivial."""
    return synthetic_kaist_model(arch, rate)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_round_trip_pruned_file(tmp_path):
    model, masks = pruned_micronet()
    state = kaist_layout(model, masks)
    assert sum(k.endswith(".mask") for k in state) == 86  # stem, 5 per block, 4 shortcuts, linear
    ckpt = import_kaist(save(state, tmp_path / "micronet_v1_pr_60.t7"), "kaist_micronet_v1")
    assert ckpt["stage"] == "import" and ckpt["arch"] == "kaist_micronet_v1" and ckpt["args"] == {"num_classes": 100}
    assert ckpt["source"]["masks_folded"] == 86 and ckpt["source"]["weights_zeroed_by_masks"] == 0
    assert ckpt["source"]["entry"] is None and len(ckpt["source"]["sha256"]) == 64
    assert not any(k.endswith(".mask") for k in ckpt["state_dict"])
    imported = build_from_checkpoint(ckpt).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(imported(x), model(x))
    assert overall_sparsity(sparsity_report(imported)) == pytest.approx(0.6, abs=1e-5)


def test_training_file_uses_net4_and_strips_module_prefix(tmp_path):
    model, masks = pruned_micronet("kaist_micronet_v2", rate=0.3)
    other, _ = synthetic_kaist_model("kaist_micronet_v2", rate=0.0, seed=1)
    final = {f"module.{k}": v for k, v in kaist_layout(model, masks).items()}
    training_file = {"net_init": other.state_dict(), "net1": other.state_dict(), "net4": final,
                     "train_losses": [2.1, 1.7], "flops_params": (1.0, 2.0, 3.0)}
    ckpt = import_kaist(save(training_file, tmp_path / "micronet_v2.t7"), "kaist_micronet_v2")
    assert ckpt["source"]["entry"] == "net4"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(build_from_checkpoint(ckpt).eval()(x), model(x))


def test_mask_is_folded_into_its_weight(tmp_path):
    model, masks = pruned_micronet()
    state = kaist_layout(model, masks)
    # a weight the optimizer moved after masking: their forward multiplies by the mask, so it is zero
    zero_at = (state["layers.4.conv1.mask"] == 0).nonzero()[0].tolist()
    state["layers.4.conv1.weight"][tuple(zero_at)] = 0.5
    ckpt = import_kaist(save(state, tmp_path / "k.t7"), "kaist_micronet_v1")
    assert ckpt["source"]["weights_zeroed_by_masks"] == 1
    assert ckpt["state_dict"]["layers.4.conv1.weight"][tuple(zero_at)] == 0


@pytest.fixture
def kaist_state() -> dict[str, torch.Tensor]:
    model, masks = pruned_micronet()
    return kaist_layout(model, masks)


def test_missing_key(tmp_path, kaist_state):
    del kaist_state["layers.3.bn2.running_var"]
    with pytest.raises(MicronetError) as e:
        import_kaist(save(kaist_state, tmp_path / "k.t7"), "kaist_micronet_v1")
    msg = one_line_error(e)
    assert "'layers.3.bn2.running_var' is missing" in msg and "(96,)" in msg and "k.t7" in msg


def test_extra_key(tmp_path, kaist_state):
    kaist_state["layers.2.shortcut.0.weight"] = torch.zeros(32, 16, 1, 1)  # stride-2 blocks have none
    with pytest.raises(MicronetError) as e:
        import_kaist(save(kaist_state, tmp_path / "k.t7"), "kaist_micronet_v1")
    msg = one_line_error(e)
    assert "'layers.2.shortcut.0.weight' (shape (32, 16, 1, 1)) has no place in kaist_micronet_v1" in msg


def test_wrong_shape(tmp_path, kaist_state):
    kaist_state["layers.0.conv3.weight"] = torch.zeros(16, 80, 1, 1)
    kaist_state["layers.0.conv3.mask"] = torch.ones(16, 80, 1, 1)
    with pytest.raises(MicronetError) as e:
        import_kaist(save(kaist_state, tmp_path / "k.t7"), "kaist_micronet_v1")
    msg = one_line_error(e)
    assert "'layers.0.conv3.weight' has shape (16, 80, 1, 1) but kaist_micronet_v1 needs (16, 96, 1, 1)" in msg


def test_other_version_names_first_mismatch(tmp_path, kaist_state):
    with pytest.raises(MicronetError) as e:
        import_kaist(save(kaist_state, tmp_path / "k.t7"), "kaist_micronet_v2")
    msg = one_line_error(e)
    assert "'layers.0.conv1.weight' has shape (96, 32, 1, 1) but kaist_micronet_v2 needs (80, 32, 1, 1)" in msg
    assert "more problems" in msg


@pytest.mark.parametrize("bad, expected", [
    (lambda s: s.__setitem__("linear.mask", torch.full((100, 106), 0.5)), "values other than 0 and 1"),
    (lambda s: s.__setitem__("linear.mask", torch.ones(100, 10)), "'linear.mask' has shape (100, 10)"),
    (lambda s: s.__setitem__("layers.1.fc9.mask", torch.ones(4, 16, 1, 1)), "no weight 'layers.1.fc9.weight'"),
])
def test_bad_masks(tmp_path, kaist_state, bad, expected):
    bad(kaist_state)
    with pytest.raises(MicronetError) as e:
        import_kaist(save(kaist_state, tmp_path / "k.t7"), "kaist_micronet_v1")
    assert expected in one_line_error(e)


def test_not_a_kaist_file(tmp_path):
    with pytest.raises(MicronetError) as e:
        import_kaist(save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "k.t7"), "kaist_micronet_v1")
    assert "top-level keys: epoch, optimizer" in one_line_error(e)
    with pytest.raises(MicronetError) as e:
        import_kaist(tmp_path / "k.t7", "pyramidnet272")
    assert "kaist_micronet_v1, kaist_micronet_v2" in one_line_error(e)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(import_command)
    return app


def test_import_command_writes_checkpoint(tmp_path, kaist_state):
    src, out = save(kaist_state, tmp_path / "micronet_v1_pr_60.t7"), tmp_path / "models" / "import.pt"
    result = CliRunner().invoke(cli(), ["kaist", str(src), "--arch", "kaist_micronet_v1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "86 masks" in result.output and "sparsity 60.00%" in result.output
    model, ckpt = load_model(out)
    assert ckpt["source"]["file"] == "micronet_v1_pr_60.t7"
    assert [p.name for p in out.parent.iterdir()] == ["import.pt"]  # no temporary file left behind
    for key, value in model.state_dict().items():
        assert torch.equal(value, kaist_state[key])

    result = CliRunner().invoke(cli(), ["wave", str(src), "--arch", "kaist_micronet_v1", "--output", str(out)])
    assert isinstance(result.exception, MicronetError) and "known: kaist, micronet" in str(result.exception)


def test_the_command_names_every_importer():
    from micronet.importers import IMPORTERS
    from stages import import_checkpoint

    assert tuple(IMPORTERS) == import_checkpoint.IMPORTERS


def params_with_import(tmp_path: Path, source: str, extra: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"import:\n  source: {source}\n  format: kaist\n  arch: kaist_micronet_v1\n{extra}")
    return path


def test_import_stage_names_the_param_and_where_to_get_a_missing_file(tmp_path):
    params = params_with_import(tmp_path, "../../data/kaist/micronet_v1_pr_60.t7")
    out = tmp_path / "models" / "import.pt"
    result = CliRunner().invoke(cli(), ["--params", str(params), "--output", str(out)])
    assert isinstance(result.exception, MicronetError) and not out.exists()
    msg = str(result.exception)
    assert "\n" not in msg and "key 'import.source' = '../../data/kaist/micronet_v1_pr_60.t7': no such file" in msg
    assert "Kthyeon/KAIST-AI-NeurIPS2019-MicroNet-2nd-place-solution" in msg and "set import.source" in msg


def test_import_stage_reads_the_params_and_synth_kaist_writes_the_toy_file(tmp_path):
    from stages.import_checkpoint import synth_kaist_command

    params = params_with_import(tmp_path, "data/k.t7", "  synthetic: {sparsity: 0.6, seed: 0}\n")
    synth = typer.Typer()
    synth.command()(synth_kaist_command)
    result = CliRunner().invoke(synth, ["--params", str(params)])
    assert result.exit_code == 0, result.output
    assert sum(k.endswith(".mask") for k in torch.load(tmp_path / "data/k.t7", weights_only=True)) == 86
    out = tmp_path / "models" / "import.pt"
    result = CliRunner().invoke(cli(), ["--params", str(params), "--output", str(out)])
    assert result.exit_code == 0, result.output
    model, ckpt = load_model(out)
    assert ckpt["source"]["file"] == "k.t7" and "sparsity 60.00%" in result.output
    # a micronet checkpoint imports too (any pipeline's output can start another), with its arch checked
    again = params_with_import(tmp_path, "models/import.pt")
    again.write_text(again.read_text().replace("format: kaist", "format: micronet"))
    result = CliRunner().invoke(cli(), ["--params", str(again), "--output", str(tmp_path / "again.pt")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_model(tmp_path / "again.pt")[0].linear.weight, model.linear.weight)
