import pytest
import yaml

from conftest import tiny_config

from medtune.config import expand_params, load_config
from medtune.errors import BackboneError, ConfigError


def base():
    return {"datasets": [{"source": "synthetic"}], "backbones": ["efficientnet_lite0"], "strategies": ["full_ft"]}


def test_typo_is_an_error_naming_the_key_and_a_suggestion():
    raw = base() | {"train": {"epochz": 3}}
    with pytest.raises(ConfigError, match=r"train.epochz: unknown key \(did you mean 'epochs'\?\)"):
        load_config(raw=raw)


def test_set_overrides_are_typed_and_validated():
    cfg = load_config(raw=base(), overrides=["train.epochs=3", "strategies.0.name=linear_probe", "folds=3"])
    assert cfg.train.epochs == 3 and cfg.strategies[0].name == "linear_probe" and cfg.folds == 3
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(raw=base(), overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(raw=base(), overrides=["train.nope=1"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(raw=base(), overrides=["train.epochs"])


def test_unknown_strategy_and_backbone_names():
    with pytest.raises(ConfigError, match=r"unknown strategy 'ful_ft'.*full_ft"):
        load_config(raw=base() | {"strategies": ["ful_ft"]})
    with pytest.raises(ConfigError, match=r"partial_ft.*no parameter depth"):
        load_config(raw=base() | {"strategies": [{"name": "partial_ft", "depth": 2}]})
    with pytest.raises(BackboneError, match="unknown backbone 'resnet5'"):
        load_config(raw=base() | {"backbones": ["resnet5"]})


def test_an_unknown_head_is_named_with_the_registered_heads():
    with pytest.raises(ConfigError, match=r"heads: .*unknown head 'smv'\. Did you mean svm\? Known: softmax, svm, knn"):
        load_config(raw=base() | {"heads": ["softmax", "smv"]})
    assert load_config(raw=base() | {"heads": ["knn", "svm"]}).heads == ["knn", "svm"]


def test_strategy_sweeps_expand():
    assert expand_params({"blocks": [1, 2], "x": 0}) == [{"blocks": 1, "x": 0}, {"blocks": 2, "x": 0}]


def test_shipped_configs_validate():
    for name in ("configs/demo.yaml", "configs/smoke.yaml"):
        load_config(name)


def test_a_path_on_the_synthetic_demo_set_is_refused_not_ignored():
    raw = base() | {"datasets": [{"source": "synthetic", "options": {"n_patients": 6}}]}
    with pytest.raises(ConfigError, match=r"source: synthetic.*and a `path`.*datasets.0=\{path: DIR\}"):
        load_config(raw=raw, overrides=["datasets.0.path=/data/busi"])
    cfg = load_config(raw=raw, overrides=["datasets.0={path: /data/busi, positive: malignant}"])
    assert cfg.datasets[0].source == "auto" and cfg.datasets[0].path == "/data/busi"


@pytest.mark.parametrize("key", ["datasets", "backbones", "strategies", "heads", "seeds"])
def test_an_empty_axis_is_a_config_error_not_a_grid_of_no_cells(tmp_path, key):
    """`seeds: []` used to escape as `ValueError: min() arg is an empty sequence`, and an empty data
    set, backbone, strategy or head list ran 0 cells and reported success."""
    raw = yaml.safe_load(tiny_config(tmp_path).read_text())
    raw[key] = []
    with pytest.raises(ConfigError, match=rf"{key}: List should have at least 1 item"):
        load_config(raw=raw)


def test_repeated_or_negative_seeds_are_config_errors(tmp_path):
    raw = yaml.safe_load(tiny_config(tmp_path).read_text())
    with pytest.raises(ConfigError, match=r"seeds: .*\[0, 0\] repeats an entry"):
        load_config(raw={**raw, "seeds": [0, 0]})
    with pytest.raises(ConfigError, match=r"seeds: .*from 0 to 2\*\*32 - 1"):
        load_config(raw={**raw, "seeds": [-1]})


def test_a_digits_only_sha256_read_as_a_number_says_quote_it(tmp_path):
    """YAML reads an unquoted hash of only digits as an int: refused with what to do, never mangled."""
    digits = "1234567890" * 6 + "1234"
    path = tmp_path / "c.yaml"
    path.write_text(f"datasets: [{{source: synthetic}}]\nbackbones: [{{name: resnet18, sha256: {digits}}}]\n"
                    "strategies: [linear_probe]\n")
    with pytest.raises(ConfigError, match="sha256 was read as a number .* quote it"):
        load_config(path)
    path.write_text(path.read_text().replace(digits, f"'{digits}'"))
    assert load_config(path).backbones[0].sha256 == digits
