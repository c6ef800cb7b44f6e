"""Load a config class from a YAML file, with `${VAR}` substitution and clear errors.

Substitution happens in the parsed string values, never in the YAML text: a value (a
directory name holding `#`, `:` or quotes, an environment variable holding YAML syntax) is
data and cannot change the document's structure or add keys. YAML is read with
`yaml.safe_load`, so tags such as `!!python/object/apply` are refused.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import fsspec
import pydantic
import yaml

from tml.core.config.base_config import BaseConfig
from tml.core.config.compat import warn_no_effect
from tml.errors import ConfigError

C = TypeVar("C", bound=BaseConfig)

# `$$` is an escaped `$` (how a literal `${` is written); `${NAME}` / `${NAME:-default}`.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def one_line(text: str) -> str:
    """`text` with line breaks shown as `\\n`: user errors are printed as one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def substitute_variables(text: str, variables: Mapping[str, str], source: str = "<string>") -> str:
    """Replace `${NAME}` and `${NAME:-default}` from `variables`, and `$$` by `$`.

    One pass: a substituted value is not substituted again (a directory named `a${B}` stays
    so). An unset variable without a default is an error naming it, not a silent empty
    string. A bare `$` or `$NAME` is left alone.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: variable ${{{name}}} is not set "
                          f"(set it in the environment or write ${{{name}:-default}})")

    return _VAR.sub(replace, text)


def escape_variables(obj: Any) -> Any:
    """Parsed YAML whose strings read back unchanged through `substitute_variables`."""
    return _map_strings(obj, lambda s: s.replace("$", "$$"))


def substitute_in_values(obj: Any, variables: Mapping[str, str], source: str = "<string>") -> Any:
    """`substitute_variables` applied to every string value of parsed YAML (keys unchanged)."""
    return _map_strings(obj, lambda s: substitute_variables(s, variables, source))


def _map_strings(obj: Any, function: Any) -> Any:
    # Memoised by identity: YAML aliases share one object, so a document of nested aliases
    # costs its distinct nodes, not their exponential expansion.
    done: dict[int, Any] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return function(node)
        if not isinstance(node, (dict, list)):
            return node
        if id(node) in done:
            return done[id(node)]
        if isinstance(node, dict):
            out: Any = {}
            done[id(node)] = out
            for key, value in node.items():
                out[key] = walk(value)
        else:
            out = []
            done[id(node)] = out
            out.extend(walk(value) for value in node)
        return out

    return walk(obj)


def format_validation_error(error: pydantic.ValidationError, source: str) -> str:
    """`source: dotted.field.path: message`, problems joined by `; ` (one line)."""
    problems = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (not allowed here; check the spelling)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        problems.append(f"{loc}: {message}")
    return one_line(f"{source}: " + "; ".join(problems))


def parse_config(config_type: type[C], obj: object, source: str = "<config>") -> C:
    """Validate a plain object (from YAML or code) into `config_type`, raising ConfigError.

    A field set that has no effect (`tml.core.config.compat`) is a warning naming it."""
    try:
        config = config_type.model_validate(obj)
    except pydantic.ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    warn_no_effect(config, source)   # fields kept for the original's YAML that do nothing
    return config


def _yaml_error(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line, column)."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    text = str(problem) if problem else str(error).strip().splitlines()[0]
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return one_line(text)


def config_variables(yaml_path: str) -> dict[str, str]:
    """What `${...}` can name: the environment, `USER`, and `CONFIG_DIR` (the directory of
    the YAML file, so configs can point at data beside them wherever they are run from)."""
    config_dir = os.path.dirname(os.path.abspath(yaml_path)) if "://" not in yaml_path \
        else yaml_path.rsplit("/", 1)[0]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    return {"USER": user, **os.environ, "CONFIG_DIR": config_dir}


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` (no Python tags), errors as one-line ConfigErrors naming `source`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_error(error)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def read_config_data(yaml_path: str, variables: Mapping[str, str] | None = None,
                     substitute: bool = True) -> dict:
    """The mapping in `yaml_path` (any fsspec URL), with variables substituted in its values.

    `variables` default to `config_variables(yaml_path)`; `substitute=False` leaves the
    values as written (to edit them before substituting). Raises ConfigError naming the file.
    """
    try:
        with fsspec.open(yaml_path, "r", encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {yaml_path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {yaml_path} is a directory") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{yaml_path}: not UTF-8 text (byte {error.start})") from None
    except (OSError, ValueError) as error:
        raise ConfigError(one_line(f"cannot read config file {yaml_path}: {error}")) from None
    obj = parse_yaml(raw, yaml_path)
    if not isinstance(obj, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of config sections at the top level")
    if not substitute:
        return obj
    if variables is None:
        variables = config_variables(yaml_path)
    try:
        return substitute_in_values(obj, variables, source=yaml_path)
    except RecursionError:
        raise ConfigError(f"{yaml_path}: nested too deeply") from None


def load_config_from_yaml(config_type: type[C], yaml_path: str) -> C:
    """Read `yaml_path` (any fsspec URL), substitute variables, validate into `config_type`.

    Variables (`config_variables`) are substituted in the parsed string values only.
    Raises ConfigError naming the file (and the field) on any problem, in one line.
    """
    return parse_config(config_type, read_config_data(yaml_path), source=yaml_path)
