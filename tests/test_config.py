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
