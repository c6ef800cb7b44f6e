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


def _loc_part(part: object) -> str:
    # A key taken from the file (an environment variable's name) may hold a newline.
    text = str(part)
    return repr(text) if not text.isprintable() else text


def format_validation_error(error: pydantic.ValidationError, source: str) -> str:
    """`source: dotted.field.path: message`, problems joined by "; " (errors are one line)."""
    lines = []
    for item in error.errors():
        loc = ".".join(_loc_part(part) for part in item["loc"]) or "<top level>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (not allowed here; check the spelling)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {loc}: {' '.join(message.split())}")
    return "; ".join(lines)


def yaml_error_line(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own text spans lines)."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(error, "context", None)
    text = f"{context}: {problem}" if context else str(problem)
    return " ".join(text.split()) + where


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
    except UnicodeDecodeError as error:
        raise ConfigError(f"{yaml_path}: not UTF-8 text (byte {error.start}: "
                          f"{error.reason})") from None

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
        raise ConfigError(f"{yaml_path}: not valid YAML: {yaml_error_line(error)}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of config sections at the top level")
    return parse_config(config_type, obj, source=yaml_path)
