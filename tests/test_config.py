from pathlib import Path

import pytest
import yaml

from micronet.config import load_params
from micronet.errors import MicronetError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "pipelines/demo/params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_params_validate():
    root = load_params(REPO / "params.yaml")
    assert root.model.arch == "pyramidnet272" and root.train.epochs == 1800
    assert (root.quantize.weight_bits, root.quantize.activation_bits) == (9, 12)
    demo = load_params(REPO / "pipelines/demo/params.yaml")
    assert demo.synth is not None and demo.distributed.device == "cpu"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["prune"].__setitem__("rate", 1.5), "prune.rate' = 1.5"),
        (lambda r: r["quantize"].__setitem__("weight_bits", 1), "quantize.weight_bits' = 1"),
        (lambda r: r["quantize"].__setitem__("activation_bits", 33), "quantize.activation_bits' = 33"),
        (lambda r: r["quantize"].__setitem__("wieght_bits", 8), "unknown key 'quantize.wieght_bits'"),
        (lambda r: r.__setitem__("extra", {}), "unknown key 'extra'"),
        (lambda r: r["model"].__setitem__("arch", "nope"), "arch 'nope' is not registered"),
        (lambda r: r["model"]["args"].__setitem__("width", 3), "'args.width': pyramidnet takes no argument 'width'"),
        (lambda r: r["sparsify"].__setitem__("rate", -0.1), "sparsify.rate' = -0.1"),
        (lambda r: r["train"].__setitem__("enabled", False), "train.checkpoint must name"),
        (lambda r: r["prune"]["bring_back_finetune"].__setitem__("batch_size", 7),
         "section 'prune': prune.bring_back_finetune.batch_size differs from prune.finetune.batch_size"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, mutate, expected):
    path = write(tmp_path, mutate)
    with pytest.raises(MicronetError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_bad_value_message_says_what_is_allowed(tmp_path):
    path = write(tmp_path, lambda r: r["prune"].__setitem__("rate", 1.5))
    with pytest.raises(MicronetError, match="less than 1"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MicronetError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(MicronetError, match="not valid YAML"):
        load_params(bad)


def test_import_section_and_quantization_aware_recipe_are_validated(tmp_path):
    from micronet.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("import: {source: k.t7, format: kaist, arch: kaist_micronet_v1, sorce: x}\n")
    with pytest.raises(MicronetError, match=r"unknown key 'import.sorce'"):
        load_params(path)
    path.write_text("import: {source: k.t7, format: tflite, arch: kaist_micronet_v1}\n"
                    "quantize: {finetune: {epochs: 1, precision: bf16}}\n")
    with pytest.raises(MicronetError) as e:
        load_params(path)
    assert "key 'import.format' = 'tflite'" in str(e.value) and "quantize.finetune.precision bf16" in str(e.value)
    path.write_text("import: {source: k.t7, arch: kaist_micronet_v1}\nquantize: {finetune: {epochs: 2}}\n")
    params = load_params(path)
    assert params.import_.format == "kaist" and params.quantize.finetune.epochs == 2
    assert params.as_dict()["import"]["source"] == "k.t7"


RECIPES = sorted((REPO / "micronet/assets/recipes").glob("*.yaml"))


def _normal(value):
    """model_dump's tuples and int-keyed dicts as YAML reads them."""
    if isinstance(value, (tuple, list)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_full_scale_params_keep_the_teams_recipe(path):
    """Each team's code is its pipeline's default: every value of the recipe (assets/recipes) is in the
    full-scale params file, which trains on every training image and keeps the last epoch."""
    recipe = yaml.safe_load(path.read_text())
    params = load_params(REPO / recipe["params"])
    assert params.tracking.pipeline == recipe["pipeline"] == path.stem
    for key, value in recipe["values"].items():
        tree = params.as_dict()
        for part in key.split("."):
            assert isinstance(tree, dict) and part in tree, f"{path.name}: {key} is not a params key"
            tree = tree[part]
        assert _normal(tree) == value, f"{recipe['params']}: {key} = {tree!r}, the team's code: {value!r}"
    assert params.data.val_size == 0
    assert all(r.selection(0) == "last" for r in params.recipes().values())


def test_recipes_cover_every_pipeline():
    published = {p.stem for p in (REPO / "micronet/assets/published").glob("*.yaml")}
    assert {p.stem for p in RECIPES} == published


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: (r["data"].update(val_size=0), r["train"].update(select="val")),
         "key 'train.select' = 'val': data.val_size is 0"),
        (lambda r: (r["data"].update(val_size=0), r["sparsify"]["finetune"].update(select="val")),
         "key 'sparsify.finetune.select' = 'val'"),
        (lambda r: (r["data"].update(val_size=0), r["prune"].update(min_accuracy=0.5)),
         "key 'prune.min_accuracy' needs a split to measure on"),
        (lambda r: r["train"].update(select="best"), "train.select' = 'best'"),
    ],
)
def test_selection_needs_its_split(tmp_path, mutate, expected):
    path = write(tmp_path, mutate)
    with pytest.raises(MicronetError) as err:
        load_params(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value) and expected in str(err.value)


def test_selection_defaults_follow_the_split(tmp_path):
    held_out = load_params(write(tmp_path, lambda r: None))
    assert held_out.train.selection(held_out.data.val_size) == "val"
    every_image = load_params(write(tmp_path, lambda r: (
        r["data"].update(val_size=0), r["prune"].update(min_accuracy=0.5),
        r["prune"]["finetune"].update(select="test"), r["prune"]["bring_back_finetune"].update(select="test"))))
    assert every_image.train.selection(0) == "last" and every_image.prune.finetune.selection(0) == "test"
