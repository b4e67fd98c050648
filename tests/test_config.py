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
