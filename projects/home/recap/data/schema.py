"""The segdense schema (`segdense.json`) and the parquet layout tml reads it in.

`segdense.json` lists features `{"feature_name", "dtype": "int64_list" | "float_list",
"length"}`. tml stores one example per parquet row, one column per feature, named as in
the schema (the tf.Example key, so a converted TFRecord keeps its names):

* length 1 (labels, `meta.*_id`): a scalar column, int64 or float32;
* longer (the discrete / continuous / binary segdense value lists, TwHIN vectors): a list
  column of int64 or float32 values, every row holding exactly `length` values.

The config's `renamed_features` maps the model's names (`continuous`, `binary`,
`discrete`, `user_embedding`, `user_eng_embedding`, `author_embedding`, `meta__user_id`,
...) to feature names; the label columns are the data config's task names.
"""

from __future__ import annotations

import dataclasses
import json

import fsspec
import pyarrow as pa

from tml.core.config.config_load import one_line
from tml.errors import ConfigError, error_line

DTYPES = {"int64_list": pa.int64(), "float_list": pa.float32()}
# The model's inputs that renamed_features can name, beyond ids (`meta__*`).
DENSE_INPUTS = ("continuous", "binary", "discrete")
EMBEDDING_INPUTS = ("user_embedding", "user_eng_embedding", "author_embedding")


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    dtype: str      # "int64_list" | "float_list"
    length: int

    @property
    def arrow_type(self) -> pa.DataType:
        value = DTYPES[self.dtype]
        return value if self.length == 1 else pa.list_(value)


def parse_schema(obj: object, source: str) -> dict[str, Feature]:
    """Features by name from the parsed JSON; ConfigError naming `source` and the entry."""
    entries = obj.get("schema") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected {{\"schema\": [features...]}}")
    features: dict[str, Feature] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: schema[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "feature_name", "length"}:
            raise ConfigError(f"{where}: expected exactly dtype, feature_name and length")
        name, dtype, length = entry["feature_name"], entry["dtype"], entry["length"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: feature_name must be a non-empty string")
        if dtype not in DTYPES:
            raise ConfigError(f"{where} ('{one_line(name)}'): dtype must be int64_list or "
                              "float_list")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 1 << 20:
            raise ConfigError(f"{where} ('{one_line(name)}'): length must be an integer in "
                              "1..1048576")
        if name in features:
            raise ConfigError(f"{where}: feature '{one_line(name)}' is listed twice")
        features[name] = Feature(name, dtype, length)
    return features


def load_schema(path: str) -> dict[str, Feature]:
    """Read and check `segdense.json` (any fsspec URL)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            obj = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"segdense schema not found: {path}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the segdense schema: {error_line(error)}") \
            from None
    return parse_schema(obj, path)


def arrow_schema(features: dict[str, Feature]) -> pa.Schema:
    """The parquet schema of these features (see the module docstring)."""
    return pa.schema([pa.field(f.name, f.arrow_type, nullable=False)
                      for f in features.values()])
