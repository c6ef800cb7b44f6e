"""Where this node stands in a multi-node run: node count, role, rendezvous endpoint, run id.

Each value is read from the first of these that gives it (the precedence users rely on):

1. explicit arguments of `maybe_run_training` (`num_nodes`, `is_chief`, `rdzv_endpoint`,
   `run_id`);
2. our own environment variables: `TML_NUM_NODES`, `TML_IS_CHIEF` (1/0),
   `TML_RDZV_ENDPOINT` (host:port), `TML_RUN_ID`;
3. SLURM's: `SLURM_JOB_NUM_NODES` / `SLURM_NNODES`, `SLURM_NODEID` (0 is the chief),
   the first host of `SLURM_JOB_NODELIST` with port `TML_RDZV_PORT` (default 29500), and
   `SLURM_JOB_ID`;
4. the machines file named by `TML_MACHINES_FILE` (`1 + num_workers` nodes);
5. defaults: one node, chief, run id "tml".

The chief binds the rendezvous on localhost (as the original tml did, pytorch issue 79388).
"""

from __future__ import annotations

import dataclasses
import os
import re

from tml.common.machines import MACHINES_FILE_ENV, read_machines_file
from tml.errors import TmlError

DEFAULT_RDZV_PORT = 29500


@dataclasses.dataclass(frozen=True)
class NodeSetup:
    """The multi-node facts of this launch, and where each came from (for logs)."""

    num_nodes: int
    is_chief: bool
    rdzv_endpoint: str | None
    run_id: str
    source: str

    def torchrun_endpoint(self) -> str | None:
        """The endpoint this node passes to torchrun (localhost:port on the chief)."""
        if self.rdzv_endpoint is None:
            return None
        if self.is_chief:
            return "localhost:" + self.rdzv_endpoint.rsplit(":", 1)[-1]
        return self.rdzv_endpoint


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """`"n[1-3,7],gpu05"` -> `["n1", "n2", "n3", "n7", "gpu05"]` (SLURM's compact syntax).

    Zero padding is kept (`n[01-02]` -> n01, n02). Used when `scontrol` is not at hand.
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                low, high = part.split("-", 1)
                width = len(low)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(low), int(high) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TmlError(f"environment variable {name}={value!r} must be an integer") from None


def _machines_num_nodes() -> int | None:
    path = os.environ.get(MACHINES_FILE_ENV)
    if not path:
        return None
    workers = read_machines_file(path).get("num_workers") or 0
    if not isinstance(workers, int) or workers < 0:
        raise TmlError(f"machines file {path}: num_workers must be a non-negative integer")
    return 1 + workers


def resolve_node_setup(num_nodes: int | None = None, is_chief: bool = False,
                       rdzv_endpoint: str | None = None,
                       run_id: str | None = None) -> NodeSetup:
    """Resolve the node count, role, endpoint and run id by the module's precedence."""
    sources = []
    slurm_nodes = _env_int("SLURM_JOB_NUM_NODES") or _env_int("SLURM_NNODES")

    if num_nodes is not None:
        sources.append("num_nodes argument")
    elif _env_int("TML_NUM_NODES") is not None:
        num_nodes = _env_int("TML_NUM_NODES")
        sources.append("TML_NUM_NODES")
    elif slurm_nodes is not None:
        num_nodes = slurm_nodes
        sources.append("SLURM_JOB_NUM_NODES")
    elif (machines := _machines_num_nodes()) is not None:
        num_nodes = machines
        sources.append(MACHINES_FILE_ENV)
    else:
        num_nodes = 1
    if num_nodes < 1:
        raise TmlError(f"the number of nodes must be at least 1, got {num_nodes}")

    if not is_chief:  # False is the signature's default: let the environment decide
        if os.environ.get("TML_IS_CHIEF") is not None:
            is_chief = os.environ["TML_IS_CHIEF"] == "1"
        elif _env_int("SLURM_NODEID") is not None:
            is_chief = _env_int("SLURM_NODEID") == 0
        else:
            is_chief = False

    if rdzv_endpoint is None:
        rdzv_endpoint = os.environ.get("TML_RDZV_ENDPOINT") or None
        if rdzv_endpoint is None and os.environ.get("SLURM_JOB_NODELIST"):
            first = expand_slurm_nodelist(os.environ["SLURM_JOB_NODELIST"])[0]
            port = _env_int("TML_RDZV_PORT") or DEFAULT_RDZV_PORT
            rdzv_endpoint = f"{first}:{port}"
    if rdzv_endpoint is not None and not re.fullmatch(r"[^:\s]+:\d+", rdzv_endpoint):
        raise TmlError(f"rendezvous endpoint {rdzv_endpoint!r} must be host:port")
    if num_nodes > 1 and rdzv_endpoint is None:
        raise TmlError(f"{num_nodes} nodes need a rendezvous endpoint: set TML_RDZV_ENDPOINT "
                       "to host:port of the chief node (or run under SLURM)")

    run_id = run_id or os.environ.get("TML_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "tml"
    return NodeSetup(num_nodes=num_nodes, is_chief=is_chief, rdzv_endpoint=rdzv_endpoint,
                     run_id=run_id, source=", ".join(sources) or "defaults")
