"""Every params file the repository ships validates whole, as a stage would load it: the root params.yaml, each
pipeline's params.yaml, and each with the overlays `make demo` applies (toy.yaml, then digits.yaml for DATA=digits).
A shipped combination that only fails once a run reaches its stage (kaist-wave's toy batch of 25 met CutMix at
quantize) fails here in seconds instead.

Rules covered:
- by `micronet.config.load_params` (what every stage calls): each section's fields and their model validators
  (e.g. SynthConfig's digits sizes, DataConfig's gpu loader, OptimConfig's sgdr rounds, TrainConfig's disabled
  checkpoint, PruneConfig's one loader, QuantizeConfig's fp32 fine-tuning, ModelConfig's builder arguments), unknown
  and duplicate keys, the extra training sections, and `Params.selection_problems` (select: val needs
  data.val_size > 0; prune.min_accuracy needs a split) and `Params.mixing_batch_problems` (mixup/CutMix need an
  even batch per process; micronet/recipe.py also refuses it at run time, where the process count is known).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from micronet import config
from micronet.config import Params, load_params
from stages.params import merge  # what `micronet params apply` merges an overlay with

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p.parent for p in (REPO / "pipelines").glob("*/params.yaml"))


def _combinations() -> list[tuple[Path, tuple[Path, ...]]]:
    """(params.yaml, overlays in the order `make demo` applies them) for every shipped combination."""
    found: list[tuple[Path, tuple[Path, ...]]] = [(REPO / "params.yaml", ())]
    for pipeline in PIPELINES:
        toy = (pipeline / "toy.yaml",) if (pipeline / "toy.yaml").is_file() else ()
        found.append((pipeline / "params.yaml", ()))
        if toy:
            found.append((pipeline / "params.yaml", toy))
        if (pipeline / "digits.yaml").is_file():
            found.append((pipeline / "params.yaml", (*toy, pipeline / "digits.yaml")))
        for overlay in sorted(pipeline.glob("*.yaml")):  # any other overlay (kaist-wave's cpu.yaml) on full scale
            if overlay.name not in ("params.yaml", "toy.yaml", "digits.yaml", "dvc.yaml"):
                found.append((pipeline / "params.yaml", (overlay,)))
    return found


COMBINATIONS = _combinations()


def _name(combination: tuple[Path, tuple[Path, ...]]) -> str:
    params, overlays = combination
    return "+".join(str(p.relative_to(REPO)) for p in (params, *overlays))


def _load(params_path: Path, overlays: tuple[Path, ...], monkeypatch: pytest.MonkeyPatch) -> Params:
    """load_params on params_path with the overlays merged in memory: the shipped files stay as they are, and a
    problem still names the params file and key as a stage would."""
    raw: Any = config.read_yaml(params_path) or {}
    for overlay in overlays:
        changes = config.read_yaml(overlay) or {}
        assert isinstance(changes, dict), f"{overlay}: expected a mapping of params sections"
        merge(raw, changes)
    read = config.read_yaml
    monkeypatch.setattr(config, "read_yaml", lambda path: copy.deepcopy(raw) if Path(path) == params_path
                        else read(path))
    return load_params(params_path)


def test_every_pipeline_is_covered():
    names = {_name(c) for c in COMBINATIONS}
    assert "params.yaml" in names and len(PIPELINES) >= 5
    for pipeline in PIPELINES:
        assert f"pipelines/{pipeline.name}/params.yaml" in names
        if (pipeline / "toy.yaml").is_file():
            assert f"pipelines/{pipeline.name}/params.yaml+pipelines/{pipeline.name}/toy.yaml" in names


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_name)
def test_shipped_params_validate(combination, monkeypatch):
    params_path, overlays = combination
    _load(params_path, overlays, monkeypatch)


def test_the_even_batch_check_sees_an_odd_toy_batch(monkeypatch, tmp_path):
    """The validator refuses kaist-wave's old toy batch of 25 (its fine-tunings mix with CutMix) in one line naming
    both recipes. Like selection_problems, it checks switched-off stages too (sparsify here)."""
    from micronet.errors import MicronetError

    pipeline = REPO / "pipelines/kaist-wave"
    odd = tmp_path / "odd.yaml"
    odd.write_text("data: {batch_size: 25}\n")
    with pytest.raises(MicronetError) as e:
        _load(pipeline / "params.yaml", (pipeline / "toy.yaml", odd), monkeypatch)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(pipeline / "params.yaml"))
    assert "key 'sparsify.finetune.mixing.kind' = 'cutmix'" in message
    assert "key 'quantize.finetune.mixing.kind' = 'cutmix'" in message and "25 over 1 process(es) is odd" in message
