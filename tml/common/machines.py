"""The machines file: the resources of a run, in the original tml's `machines.yaml` shape.

    chief: {num_accelerators: 16, accelerator_type: a100, cpu: 24, mem: 1.4Ti}
    num_workers: 0        # nodes besides the chief (optional)

`TML_MACHINES_FILE` names the file. The launcher reads `chief.num_accelerators` as the
default number of workers per node on hosts without CUDA devices.
"""

from __future__ import annotations

import os

import yaml

from tml.errors import ConfigError

MACHINES_FILE_ENV = "TML_MACHINES_FILE"


def read_machines_file(path: str) -> dict:
    """The parsed machines file; ConfigError naming the file if it cannot be read."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as error:
        raise ConfigError(f"machines file {path} ({MACHINES_FILE_ENV}): {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"machines file {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"machines file {path}: expected a mapping")
    return data


def nproc_from_machines_file() -> int | None:
    """`chief.num_accelerators` of the machines file in `TML_MACHINES_FILE`, if any."""
    path = os.environ.get(MACHINES_FILE_ENV)
    if not path:
        return None
    chief = read_machines_file(path).get("chief") or {}
    value = chief.get("num_accelerators")
    if value is None:
        return None
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"machines file {path}: chief.num_accelerators must be a positive "
                          f"integer, got {value!r}")
    return value
