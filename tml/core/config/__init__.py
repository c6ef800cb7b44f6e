"""Configuration: pydantic v2 models loaded from YAML.

`BaseConfig` forbids unknown fields and checks `one_of` groups; `load_config_from_yaml`
reads a file (through fsspec), substitutes `${VAR}` and reports errors by file and field;
`compat_field` declares a field kept only for the original's schema (it warns when set).
"""

from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.compat import compat_field
from tml.core.config.config_load import load_config_from_yaml, parse_config, read_config_data
from tml.core.config.training import RuntimeConfig, TrainingConfig

__all__ = [
    "BaseConfig",
    "Field",
    "RuntimeConfig",
    "TrainingConfig",
    "compat_field",
    "load_config_from_yaml",
    "parse_config",
    "read_config_data",
]
