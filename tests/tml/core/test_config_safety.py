"""The config reader treats values as data: `${...}` is substituted in parsed strings (a
directory or variable holding YAML syntax cannot change the document), Python tags are
refused, and any mutation of the shipped config is read or refused in one line."""

import os

import pytest
import yaml
from hypothesis import given

from projects.twhin.config import TwhinConfig
from tests.fuzz_support import FUZZ_SETTINGS, mutated, outcome
from tests.twhin_setup import LOCAL
from tml.core.config import load_config_from_yaml
from tml.core.config.config_load import escape_variables, substitute_in_values
from tml.errors import ConfigError

LOCAL_BYTES = open(LOCAL, "rb").read()


def _config_in(directory):
    """local.yaml copied into `directory`, its data beside it through ${CONFIG_DIR}."""
    text = LOCAL_BYTES.decode().replace("${CONFIG_DIR}/../../../data/twhin", "${CONFIG_DIR}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "c.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("name", ["my #g", "a: b", "q\"uote's", "x${HOME}y", "[br]{ace}&*!|>%@",
                                  "tab\there", "$$dollar", "- dash", "? q", "yes", "null"])
def test_config_dir_with_yaml_specials_is_used_as_is(tmp_path, name):
    (tmp_path / "my").mkdir()   # the sibling a text substitution used to train on
    directory = str(tmp_path / name)
    config = load_config_from_yaml(TwhinConfig, _config_in(directory))
    assert config.train_data.data_root == f"{directory}/train"
    assert config.validation_data.data_root == f"{directory}/validation"


def test_environment_value_with_yaml_syntax_adds_no_keys(tmp_path, monkeypatch):
    evil = "x\"\ntraining: {num_epochs: 99}\nextra: 1 #"
    monkeypatch.setenv("TML_TEST_ROOT", evil)
    text = LOCAL_BYTES.decode().replace("${CONFIG_DIR}/../../../data/twhin/train",
                                        "${TML_TEST_ROOT}")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    config = load_config_from_yaml(TwhinConfig, str(path))
    assert config.train_data.data_root == evil
    assert config.training.num_epochs == 2
    monkeypatch.setenv("TML_TEST_ROOT", "{a: 1}")
    path.write_text(text.replace('"${TML_TEST_ROOT}"', "${TML_TEST_ROOT}"))
    assert load_config_from_yaml(TwhinConfig, str(path)).train_data.data_root == "{a: 1}"


def test_a_variable_can_still_set_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("TML_TEST_EPOCHS", "7")
    path = tmp_path / "c.yaml"
    path.write_text(LOCAL_BYTES.decode().replace("num_epochs: 2", "num_epochs: ${TML_TEST_EPOCHS}"))
    assert load_config_from_yaml(TwhinConfig, str(path)).training.num_epochs == 7


def test_escaped_values_read_back_unchanged():
    data = {"a": ["x${HOME}", "$$", "$", {"b": "${X:-d}$"}], "n": 3}
    assert substitute_in_values(escape_variables(data), {"HOME": "/h"}) == data
    assert substitute_in_values({"k": "$${HOME} ${HOME}"}, {"HOME": "/h"}) == \
        {"k": "${HOME} /h"}


def test_python_tags_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as error:
        load_config_from_yaml(TwhinConfig, str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: not valid YAML: could not determine a constructor "
                              "for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert "\n" not in message and not marker.exists()
    text = LOCAL_BYTES.decode()
    assert "\ntraining:\n" in text
    path.write_text(text.replace("\ntraining:\n", "\ntraining:\n  save_dir: "
                                 f"!!python/object/apply:os.system ['touch {marker}']\n"))
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_config_from_yaml(TwhinConfig, str(path))
    assert not marker.exists()


def test_several_problems_are_one_line(tmp_path):
    data = yaml.safe_load(LOCAL_BYTES.decode())
    data["training"].update(num_epochs=0, bogus="a\nb")
    data["training"]["bad\nkey"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        load_config_from_yaml(TwhinConfig, str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: training.num_epochs: Input should be greater than 0; ")
    assert "training.bad\\nkey: unknown field" in message


def test_undecodable_and_directory_configs_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"training:\n  save_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 22\)"):
        load_config_from_yaml(TwhinConfig, str(path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config_from_yaml(TwhinConfig, str(tmp_path))
    path.write_text("training: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML: nested too deeply$"):
        load_config_from_yaml(TwhinConfig, str(path))


@FUZZ_SETTINGS
@given(data=mutated(LOCAL_BYTES))
def test_fuzz_config_reader(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "c.yaml"
    path.write_bytes(data)
    outcome(lambda: load_config_from_yaml(TwhinConfig, str(path)))
