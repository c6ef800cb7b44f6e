"""Who is a reader, where the readers are, and starting readers beside the trainers.

The original tml ran one script in two roles (`TASK_TYPE=datasetworker` or chief, readers
on their own machines, `num_dataset_workers` in the machines file, SLURM's heterogeneous
job group 1 listing the reader nodes). Here:

* Role: `TML_ROLE=reader` (with `TML_READER_INDEX`), or under SLURM a node listed in
  `SLURM_JOB_NODELIST_HET_GROUP_1` (its index there); everything else is a trainer.
* Reader addresses, first that gives them: `TML_READERS` (host:port,...), the hosts of
  `SLURM_JOB_NODELIST_HET_GROUP_1` with port `TML_READER_PORT` (default 2222, the
  original's), the config's `addresses`. Without addresses, the launcher starts
  `num_readers` readers beside the trainers (config, else `TML_NUM_READERS`, else the
  machines file's `num_dataset_workers`) on 127.0.0.1 (or the configured `bind_host`), and
  gives their addresses to the trainers in `TML_READERS`.
* A reader learns the trainers' world size from `TML_TRAINER_WORLD_SIZE` (the launcher sets
  it), else the machines file (`(1 + num_workers) * chief.num_accelerators`).
* Scope (`TML_READER_SCOPE`): `job` (default), the reader list serves every trainer; `node`,
  the list holds the readers beside this node's trainers and serves those only (each node's
  launcher starts its own, `tml launch` with `readers.per_node`, or `maybe_run_training` on
  several nodes). A trainer then works out its shares from its place on the node
  (`LOCAL_RANK` of `LOCAL_WORLD_SIZE`); its batches are still its rank's in-process batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from tml.common.cluster_env import expand_slurm_nodelist
from tml.common.machines import MACHINES_FILE_ENV, read_machines_file
from tml.errors import ConfigError, TmlError, error_line
from tml.readers.config import ReadersConfig

logger = logging.getLogger(__name__)

ROLE_ENV = "TML_ROLE"
READER_INDEX_ENV = "TML_READER_INDEX"
READERS_ENV = "TML_READERS"
NUM_READERS_ENV = "TML_NUM_READERS"
READER_PORT_ENV = "TML_READER_PORT"
READER_BIND_ENV = "TML_READER_BIND"
TRAINER_WORLD_SIZE_ENV = "TML_TRAINER_WORLD_SIZE"
READER_PORT_FILE_ENV = "TML_READER_PORT_FILE"
READER_ERROR_FILE_ENV = "TML_READER_ERROR_FILE"
READER_SCOPE_ENV = "TML_READER_SCOPE"
READER_GROUP_SIZE_ENV = "TML_READER_GROUP_SIZE"
SCOPES = ("job", "node")
SLURM_READER_NODES = "SLURM_JOB_NODELIST_HET_GROUP_1"
DEFAULT_READER_PORT = 2222
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def _env_int(name: str, minimum: int = 0) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def check_address(address: str, what: str) -> str:
    """`host:port` (host a name, IPv4 or [IPv6]); ConfigError naming `what` otherwise."""
    match = _ADDRESS.fullmatch(address.strip())
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"{what}: {address!r} is not host:port")
    return address.strip()


def split_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _slurm_reader_hosts() -> list[str] | None:
    nodelist = os.environ.get(SLURM_READER_NODES)
    return expand_slurm_nodelist(nodelist) if nodelist else None


def is_reader() -> bool:
    """This process is a reader (see the module docstring)."""
    role = os.environ.get(ROLE_ENV)
    if role is not None:
        if role not in ("reader", "trainer"):
            raise ConfigError(f"{ROLE_ENV}={role!r} must be reader or trainer")
        return role == "reader"
    hosts = _slurm_reader_hosts()
    return bool(hosts) and os.environ.get("SLURMD_NODENAME") in hosts


def reader_addresses(config: ReadersConfig | None = None) -> list[str] | None:
    """The readers' host:port, in reader order; None when none are given (see docstring)."""
    text = os.environ.get(READERS_ENV)
    if text:
        return [check_address(a, READERS_ENV) for a in text.split(",")]
    hosts = _slurm_reader_hosts()
    if hosts:
        port = _env_int(READER_PORT_ENV) or DEFAULT_READER_PORT
        return [f"{host}:{port}" for host in hosts]
    if config is not None and config.addresses:
        return [check_address(a, "readers.addresses") for a in config.addresses]
    return None


def reader_scope() -> str:
    """`job` or `node` (see the module docstring)."""
    scope = os.environ.get(READER_SCOPE_ENV) or "job"
    if scope not in SCOPES:
        raise ConfigError(f"{READER_SCOPE_ENV}={scope!r} must be job or node")
    return scope


def reader_group(rank: int, world_size: int) -> tuple[int, int]:
    """(first rank, number of trainers) this trainer's reader list serves: every trainer,
    or in `node` scope the trainers of its node (torchrun numbers a node's workers
    contiguously: its first rank is `rank - LOCAL_RANK`)."""
    if reader_scope() == "job":
        return 0, world_size
    local_rank = _env_int("LOCAL_RANK")
    local_size = _env_int("LOCAL_WORLD_SIZE", minimum=1)
    if local_rank is None or local_size is None:
        raise ConfigError(f"{READER_SCOPE_ENV}=node needs LOCAL_RANK and LOCAL_WORLD_SIZE "
                          "(set by torchrun)")
    return rank - local_rank, local_size


def local_reader_count(config: ReadersConfig | None = None) -> int:
    """Readers to start beside the trainers when no addresses are given."""
    if config is not None and config.num_readers:
        return config.num_readers
    count = _env_int(NUM_READERS_ENV)
    if count is not None:
        return count
    path = os.environ.get(MACHINES_FILE_ENV)
    if path:
        value = read_machines_file(path).get("num_dataset_workers") or 0
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"machines file {path}: num_dataset_workers must be a "
                              f"non-negative integer, got {value!r}")
        return value
    return 0


def trainer_world_size() -> int:
    """The number of trainers, as a reader on its own node learns it."""
    value = _env_int(TRAINER_WORLD_SIZE_ENV, minimum=1)
    if value is not None:
        return value
    path = os.environ.get(MACHINES_FILE_ENV)
    if path:
        machines = read_machines_file(path)
        per_node = (machines.get("chief") or {}).get("num_accelerators")
        nodes = 1 + (machines.get("num_workers") or 0)
        if isinstance(per_node, int) and per_node > 0 and isinstance(nodes, int):
            return nodes * per_node
    raise ConfigError(f"a reader needs the number of trainers: set {TRAINER_WORLD_SIZE_ENV} "
                      f"(or {MACHINES_FILE_ENV} with chief.num_accelerators)")


def reader_identity(config: ReadersConfig) -> tuple[int, int, str, int]:
    """(index, num_readers, bind host, bind port) of this reader process."""
    addresses = reader_addresses(config)
    index = _env_int(READER_INDEX_ENV)
    if index is None:
        hosts = _slurm_reader_hosts()
        node = os.environ.get("SLURMD_NODENAME")
        if hosts and node in hosts:
            index = hosts.index(node)
        else:
            raise ConfigError(f"a reader needs its index: set {READER_INDEX_ENV}")
    num_readers = len(addresses) if addresses else _env_int(NUM_READERS_ENV, 1)
    if num_readers is None:
        num_readers = config.num_readers or 0
    if not 0 <= index < num_readers:
        raise ConfigError(f"{READER_INDEX_ENV}={index} is not one of the {num_readers} readers")
    bind = os.environ.get(READER_BIND_ENV)
    if bind:
        host, port = split_address(check_address(bind, READER_BIND_ENV)) if ":" in bind \
            else (bind, 0)
    elif addresses:
        # Its own entry: the interface the trainers connect to, nothing wider.
        host, port = split_address(addresses[index])
    else:
        host, port = config.bind_host, 0
    return index, num_readers, host, port


def serve_reader(factory: Callable[[int, int], Any] | dict[str, Callable[[int, int], Any]],
                 config: ReadersConfig) -> None:
    """Serve `factory`'s datasets (one, or `{"train": ..., "validation": ...}`) until
    stopped (a reader's main)."""
    from tml.readers.server import ReaderServer, serve
    from tml.readers.shares import shares_of_reader

    index, num_readers, host, port = reader_identity(config)
    world_size = trainer_world_size()
    ranks = None
    if reader_scope() == "node":
        # It serves its node's trainers, whose ranks the rendezvous assigns later: check
        # the data of the ranks it would serve on the first node now, others on request.
        group = _env_int(READER_GROUP_SIZE_ENV, minimum=1) or world_size
        ranks = sorted({s.rank for s in shares_of_reader(index, min(group, world_size),
                                                         num_readers)})
    try:
        server = ReaderServer(factory, index, num_readers, world_size, host=host, port=port,
                              block=config.block_batches, ranks=ranks)
    except (OSError, pa.ArrowException) as error:
        raise TmlError(f"reader {index}: cannot listen on {host}:{port} (address in use, or "
                       f"not an interface of this host?): {error_line(error, 120)}") from None
    stop = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        import threading

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve(server, os.environ.get(READER_PORT_FILE_ENV), stop)


def run_reader(reader_fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """A reader process's entry (from `maybe_run_training`): a TmlError is one line, in the
    log and in `TML_READER_ERROR_FILE` for the launcher, and exit code 1."""
    try:
        reader_fn(**kwargs)
    except TmlError as error:
        line = error_line(error)
        logger.error("reader: %s", line)
        path = os.environ.get(READER_ERROR_FILE_ENV)
        if path:
            with open(path, "w") as f:
                f.write(line)
        raise SystemExit(1) from None


@contextlib.contextmanager
def local_readers(command: list[str], count: int, world_size: int,
                  env: dict[str, str], work_dir: str,
                  start_timeout_s: float = 60.0, cwd: str | None = None,
                  group_size: int | None = None) -> Iterator[list[str]]:
    """Start `count` reader processes running `command`; yield their addresses; stop them.

    Each binds its configured `bind_host` (or `TML_READER_BIND`) on a port of its choosing
    and writes host:port to a file this waits for; a
    reader that exits first, or is not up within `start_timeout_s`, is a TmlError naming it.
    `group_size`: the readers serve this node's `group_size` trainers (`node` scope).
    """
    processes: list[subprocess.Popen] = []
    files = []
    try:
        for index in range(count):
            port_file = os.path.join(work_dir, f"reader-{index}.address")
            error_file = os.path.join(work_dir, f"reader-{index}.error")
            files.append((port_file, error_file))
            child_env = {**env, ROLE_ENV: "reader", READER_INDEX_ENV: str(index),
                         NUM_READERS_ENV: str(count), TRAINER_WORLD_SIZE_ENV: str(world_size),
                         READER_PORT_FILE_ENV: port_file, READER_ERROR_FILE_ENV: error_file}
            if group_size is not None:
                child_env[READER_SCOPE_ENV] = "node"
                child_env[READER_GROUP_SIZE_ENV] = str(group_size)
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", READERS_ENV):
                child_env.pop(name, None)
            processes.append(subprocess.Popen(command, env=child_env, cwd=cwd))
        addresses = []
        deadline = time.monotonic() + start_timeout_s
        for index, (process, (port_file, error_file)) in enumerate(zip(processes, files)):
            while not os.path.exists(port_file):
                code = process.poll()
                if code is not None:
                    detail = "see its output above"
                    if os.path.exists(error_file):
                        detail = open(error_file).read().strip()[:300] or detail
                    raise TmlError(f"reader {index} exited with code {code} before serving: "
                                   f"{detail}")
                if time.monotonic() > deadline:
                    raise TmlError(f"reader {index} did not start serving within "
                                   f"{start_timeout_s:g} s")
                time.sleep(0.05)
            addresses.append(open(port_file).read().strip())
        logger.info("started %d reader(s) beside the trainers: %s", count, ", ".join(addresses))
        yield addresses
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
