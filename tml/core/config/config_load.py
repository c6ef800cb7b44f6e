"""Load a config class from a YAML file, with `${VAR}` substitution and clear errors."""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping
from typing import TypeVar

import fsspec
import pydantic
import yaml

from tml.core.config.base_config import BaseConfig
from tml.errors import ConfigError

C = TypeVar("C", bound=BaseConfig)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_variables(text: str, variables: Mapping[str, str], source: str = "<string>") -> str:
    """Replace `${NAME}` and `${NAME:-default}` from `variables`.

    An unset variable without a default is an error naming it, not a silent empty string.
    A bare `$` or `$NAME` is left alone.
    """

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: variable ${{{name}}} is not set "
                          f"(set it in the environment or write ${{{name}:-default}})")

    return _VAR.sub(replace, text)


def format_validation_error(error: pydantic.ValidationError, source: str) -> str:
    """One line per problem: `source: dotted.field.path: message`."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (not allowed here; check the spelling)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {loc}: {message}")
    return "\n".join(lines)


def parse_config(config_type: type[C], obj: object, source: str = "<config>") -> C:
    """Validate a plain object (from YAML or code) into `config_type`, raising ConfigError."""
    try:
        return config_type.model_validate(obj)
    except pydantic.ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_config_from_yaml(config_type: type[C], yaml_path: str) -> C:
    """Read `yaml_path` (any fsspec URL), substitute variables, validate into `config_type`.

    Variables: the environment, plus `USER` and `CONFIG_DIR` (the directory holding the YAML
    file, so configs can point at data beside them wherever they are run from).
    Raises ConfigError naming the file (and the field) on any problem.
    """
    try:
        with fsspec.open(yaml_path, "r") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {yaml_path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {yaml_path}: {error}") from None

    config_dir = os.path.dirname(os.path.abspath(yaml_path)) if "://" not in yaml_path \
        else yaml_path.rsplit("/", 1)[0]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    variables = {"USER": user, **os.environ, "CONFIG_DIR": config_dir}
    text = substitute_variables(raw, variables, source=yaml_path)
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{yaml_path}: not valid YAML: {error}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of config sections at the top level")
    return parse_config(config_type, obj, source=yaml_path)
