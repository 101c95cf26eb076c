import tomllib
from pathlib import Path

import pytest

from fedprune.settings import Settings, SettingsError

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_run_config_lists_every_setting_with_its_default():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert config == Settings().to_run_config()
    assert Settings.from_run_config(config) == Settings()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model", "resnet-9000", "one of"),
        ("learning-rate", -0.1, "positive"),
        ("learning-rate", "fast", "expected a number"),
        ("batch-size", 2.5, "integer"),
        ("batch-size", True, "integer"),
        ("initial-pruning", 1, "true or false"),
        ("max-density", 0.0, r"\(0, 1\]"),
        ("partitioner", "random", "one of"),
        ("server-fraction", 1.0, r"\(0, 1\)"),
        ("momentum", 1.0, r"\[0, 1\)"),
        ("learning-rate", float("nan"), "finite"),
        ("run-name", "a/b", "without"),
    ],
)
def test_a_bad_value_is_refused_with_its_key(key, value, message):
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_run_config({key: value})
    assert repr(key) in str(info.value)


def test_an_unknown_key_is_refused_not_ignored():
    with pytest.raises(SettingsError, match="'learnig-rate'"):
        Settings.from_run_config({"learnig-rate": 0.1})


def test_integers_are_accepted_for_floats_and_round_trip():
    s = Settings.from_run_config({"learning-rate": 1, "num-server-rounds": 3})
    assert s.learning_rate == 1.0 and isinstance(s.learning_rate, float)
    assert Settings.from_run_config(s.to_run_config()) == s
    assert s.data_spec().seed == s.seed
