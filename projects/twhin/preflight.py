"""Checks a TwHIN run passes before anything is written or any worker starts.

A rejected run must leave the user's files as they were: the config is validated, the
data paths are looked up, the memory of one step is estimated and the save_dir is proven
writable first; only then does `twhin train` write `SAVE_DIR/twhin_config.yaml` and start
workers. Each check fails with one line naming the field or path.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Sequence

from tml.common.atomic_file import write_atomic
from tml.errors import CheckpointError, ConfigError, DataError

from .config import TwhinConfig

_GLOB_CHARS = ("*", "?", "[")


def check_writable_dir(path: str, what: str, error: type[Exception] = CheckpointError) -> None:
    """Create `path` (and parents) if needed and prove a file can be written in it.

    Root ignores permission bits, so the probe writes a file rather than asking
    `os.access`; the probe is removed again.
    """
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(handle)
        os.remove(probe)
    except FileExistsError:
        raise error(f"{what} {path}: exists and is not a directory") from None
    except OSError as failure:
        reason = failure.strerror or type(failure).__name__
        raise error(f"{what} {path}: cannot write there ({reason})") from None


def check_data_paths(config: TwhinConfig, source: str) -> None:
    """Local `data_root`s of train and validation data must name files (remote: not checked)."""
    for section in ("train_data", "validation_data"):
        data = getattr(config, section)
        if data is None or "://" in data.data_root:
            continue
        root = os.path.abspath(data.data_root)
        # The built-in graph is generated on first use: its absence is not an error.
        from .data.generate import builtin_graph_dir

        if (root.split("*")[0] + os.sep).startswith(builtin_graph_dir() + os.sep):
            continue
        if any(char in root for char in _GLOB_CHARS):
            found = any(os.path.isfile(p) for p in glob.iglob(root))
        elif os.path.isdir(root):
            found = any(os.path.isfile(p) for p in glob.iglob(glob.escape(root) + "/*.parquet"))
        else:
            found = os.path.isfile(root)
        if not found:
            raise DataError(f"{source}: {section}.data_root: data_root '{data.data_root}' "
                            "matches no parquet files")


def step_bytes(batch: int, global_negatives: int, num_tables: int, dim: int) -> int:
    """Estimated bytes of one step's lookups per worker (a lower bound).

    2B(1 + G) lookups, each a pooled row of T*D float32 values and its gradient, four (D,)
    float32 intermediates, T lengths and one id (int64); plus the 2BG drawn ids (float64
    draws, then int64).
    """
    lookups = 2 * batch * (1 + global_negatives)
    per_lookup = num_tables * dim * 4 * 2 + dim * 4 * 4 + num_tables * 8 + 8
    return lookups * per_lookup + 2 * batch * global_negatives * 16


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_step_memory(config: TwhinConfig, source: str, workers_per_node: int = 1,
                      memory: int | None = None) -> None:
    """Refuse a batch (with its global negatives) whose step cannot fit in memory.

    `memory` defaults to this machine's RAM, shared by `workers_per_node` workers.
    """
    memory = physical_memory() if memory is None else memory
    if not memory:
        return
    budget = memory // max(1, workers_per_node)
    tables = config.model.embeddings.tables
    for section in ("train_data", "validation_data"):
        data = getattr(config, section)
        if data is None:
            continue
        need = step_bytes(data.per_replica_batch_size, data.global_negatives, len(tables),
                          tables[0].embedding_dim)
        if need > budget:
            field = "global_negatives" if data.global_negatives else "per_replica_batch_size"
            raise ConfigError(
                f"{source}: {section}.{field}: one step needs about {_human(need)} per worker "
                f"(per_replica_batch_size={data.per_replica_batch_size}, global_negatives="
                f"{data.global_negatives}, {len(tables)} tables of dim "
                f"{tables[0].embedding_dim}), more than the {_human(budget)} of memory each "
                f"of {workers_per_node} worker(s) has here; lower it")


def preflight(config: TwhinConfig, source: str, save_dir: str,
              workers_per_node: int = 1) -> None:
    """Every check before a training run writes anything (see the module docstring)."""
    check_data_paths(config, source)
    check_step_memory(config, source, workers_per_node)
    check_writable_dir(save_dir, "save_dir")


def prepare_training(config_path: str, save_dir: str, overrides: Sequence[str] = (),
                     workers_per_node: int = 1) -> tuple[TwhinConfig, str, str]:
    """Check a run (`preflight`), then write `SAVE_DIR/twhin_config.yaml`; returns
    (config, that file, absolute save_dir). What `twhin train` and `projects.twhin.fit` do
    before starting workers.

    Nothing is written before the config (with `overrides`, `a.b=c`), the data paths, the
    memory of a step and the save_dir pass: a rejected run leaves a previous run's
    `twhin_config.yaml` as it was. The written config has every `${...}` resolved
    (`${CONFIG_DIR}` is the directory of the user's file, not of the copy) and escaped, so
    it reads back as the run used it. The importer's `vocab/` beside the config is linked
    into the save_dir, where `twhin export` finds it.
    """
    import yaml

    from tml.core.config.config_load import escape_variables
    from tml.core.config.overrides import load_config_with_overrides

    config, data, source = load_config_with_overrides(TwhinConfig, config_path, overrides)
    save_dir = os.path.abspath(save_dir)
    preflight(config, source, save_dir, workers_per_node=workers_per_node)
    effective = os.path.join(save_dir, "twhin_config.yaml")
    try:
        write_atomic(effective, lambda handle: yaml.safe_dump(escape_variables(data), handle,
                                                              sort_keys=False))
    except OSError as error:
        raise ConfigError(f"cannot write {effective}: {error.strerror or error}") from None
    vocab = os.path.join(os.path.dirname(os.path.abspath(config_path)), "vocab")
    link = os.path.join(save_dir, "vocab")
    if os.path.isdir(vocab) and not os.path.lexists(link):
        os.symlink(vocab, link)
    return config, effective, save_dir
