"""tml.core.config: extra fields, one_of groups, YAML loading and variable substitution."""

import pytest

from tml.core.config import BaseConfig, Field, load_config_from_yaml
from tml.errors import ConfigError
from tml.optimizers.config import OptimizerConfig


class Inner(BaseConfig):
    x: int | None = Field(None, one_of="xy")
    y: int | None = Field(None, one_of="xy")
    a: str | None = Field(None, at_most_one_of="ab")
    b: str | None = Field(None, at_most_one_of="ab")


class Outer(BaseConfig):
    inner: Inner
    path: str = "default"


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_one_of_requires_exactly_one(tmp_path):
    assert load_config_from_yaml(Outer, _write(tmp_path, "inner: {x: 1}")).inner.x == 1
    with pytest.raises(ConfigError, match=r"inner: exactly one of x, y must be set \(found x, y\)"):
        load_config_from_yaml(Outer, _write(tmp_path, "inner: {x: 1, y: 2}"))
    with pytest.raises(ConfigError, match="exactly one of x, y must be set"):
        load_config_from_yaml(Outer, _write(tmp_path, "inner: {}"))


def test_at_most_one_of(tmp_path):
    with pytest.raises(ConfigError, match="at most one of a, b"):
        load_config_from_yaml(Outer, _write(tmp_path, "inner: {x: 1, a: p, b: q}"))


def test_extra_field_is_named_with_its_path_and_file(tmp_path):
    path = _write(tmp_path, "inner: {x: 1, z: 3}")
    with pytest.raises(ConfigError) as info:
        load_config_from_yaml(Outer, path)
    assert str(info.value) == f"{path}: inner.z: unknown field (not allowed here; check the spelling)"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config_from_yaml(Outer, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_from_yaml(Outer, _write(tmp_path, "inner: [x: 1"))


def test_variable_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("TML_TEST_ROOT", "/data/here")
    text = "inner: {x: 1}\npath: ${TML_TEST_ROOT}/edges-${MISSING_OK:-d}-${CONFIG_DIR}"
    config = load_config_from_yaml(Outer, _write(tmp_path, text))
    assert config.path == f"/data/here/edges-d-{tmp_path}"
    monkeypatch.delenv("TML_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"variable \$\{TML_TEST_UNSET\} is not set"):
        load_config_from_yaml(Outer, _write(tmp_path, "inner: {x: 1}\npath: ${TML_TEST_UNSET}"))


def test_optimizer_needs_exactly_one_algorithm():
    OptimizerConfig.model_validate({"sgd": {"lr": 0.1}})
    with pytest.raises(ValueError, match="exactly one of adam, sgd, adagrad"):
        OptimizerConfig.model_validate({"sgd": {"lr": 0.1}, "adam": {"lr": 0.1}})
    with pytest.raises(ValueError, match="exactly one of constant"):
        OptimizerConfig.model_validate({"sgd": {"lr": 0.1}, "learning_rate": {}})


def test_configuration_reference_is_current():
    """TwHIN's configuration page is generated from the code; regenerate it (and the other
    projects' pages) when configs change: make config-docs"""
    import os

    from projects.twhin.config import TwhinConfig
    from tests.twhin_setup import REPO as repo
    from tml.core.config.reference import render

    with open(os.path.join(repo, "docs", "projects", "twhin", "configuration.md")) as f:
        assert f.read() == render(TwhinConfig)
