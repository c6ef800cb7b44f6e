"""Command-line overrides of config values: `dotted.key=value`, validated like the YAML.

Applied to the config's data before validation, so an override is checked exactly as the
same value written in the file would be (unknown keys refused, types checked), and the
errors name the file and the key. `load_config_with_overrides` is the one call every
entry point uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

from tml.core.config.base_config import BaseConfig
from tml.errors import ConfigError

C = TypeVar("C", bound=BaseConfig)


def apply_overrides(data: dict, overrides: Sequence[str], source: str) -> dict:
    """Set `dotted.key=value` items (values parsed as YAML scalars) in a config dict.

    A key must name a field of the config (checked by validation afterwards) and its path
    must go through mappings or list indices; anything else is an error naming the key.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{source}: --set {key}: '{where}' is not a section")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:-1])}' is not a "
                              "section")
    return data


def load_config_with_overrides(config_type: type[C], yaml_path: str,
                               overrides: Sequence[str] = ()) -> tuple[C, dict, str]:
    """(config, data, source) of `yaml_path` plus `overrides`.

    `data` is what was validated: the file's mapping with the overrides applied and `${...}`
    substituted (`${CONFIG_DIR}` is the directory of `yaml_path`); write it back with
    `escape_variables` to keep the run's effective config. `source` names the file, and
    says `(with --set)` when there are overrides.
    """
    from tml.core.config.config_load import (
        config_variables,
        parse_config,
        read_config_data,
        substitute_in_values,
    )

    data = read_config_data(yaml_path, substitute=False)
    apply_overrides(data, list(overrides), yaml_path)
    source = f"{yaml_path} (with --set)" if overrides else yaml_path
    substituted = substitute_in_values(data, config_variables(yaml_path), source)
    return parse_config(config_type, substituted, source=source), substituted, source
