"""Sharded checkpoints with torch.distributed.checkpoint (DCP), complete or absent.

Layout: `save_dir/<global_step>/` holds one DCP checkpoint. A save writes into
`save_dir/.tmp-<step>/` and rank 0 renames it to `<step>` only after every rank finished
writing, so a directory named by a number is always complete; a save killed half-way
leaves a `.tmp-*` directory that `latest_checkpoint` ignores and the next save removes.

What is saved is a dict of Stateful-like parts (anything with `state_dict` /
`load_state_dict`), e.g. `{"model": dmp, "optim": optimizer, "train": train_state}`. DCP
reshards on load, so a checkpoint written by N workers loads into M workers.
Loading never unpickles arbitrary objects: every value saved is a tensor.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tml.errors import CheckpointError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^\d+$")
TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def checkpoint_steps(save_dir: str) -> list[int]:
    """Steps of the complete checkpoints in `save_dir`, ascending."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(int(name) for name in os.listdir(save_dir)
                  if _STEP_DIR.match(name) and os.path.isdir(os.path.join(save_dir, name)))


def latest_checkpoint(save_dir: str) -> str | None:
    """Path of the newest complete checkpoint in `save_dir`, or None."""
    steps = checkpoint_steps(save_dir)
    return os.path.join(save_dir, str(steps[-1])) if steps else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _state(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    return {name: part.state_dict() for name, part in parts.items()}


def save_checkpoint(save_dir: str, step: int, parts: Mapping[str, Stateful],
                    max_to_keep: int | None = None) -> str:
    """Save `parts` as `save_dir/<step>` on every rank (collective); returns the path.

    Removes leftover temporary directories of interrupted saves, and keeps only the newest
    `max_to_keep` complete checkpoints when set.
    """
    final = os.path.join(save_dir, str(step))
    tmp = os.path.join(save_dir, f"{TMP_PREFIX}{step}")
    if _is_rank0():
        try:
            os.makedirs(save_dir, exist_ok=True)
            _remove_stale_tmp(save_dir)
        except OSError as error:
            raise CheckpointError(f"cannot write checkpoints to {save_dir}: {error}") from None
    _barrier()
    try:
        dcp.save(_state(parts), checkpoint_id=tmp)
    except Exception as error:  # noqa: BLE001 (DCP wraps OSErrors of each rank)
        raise CheckpointError(f"saving checkpoint {final} failed: {error}") from None
    _barrier()
    if _is_rank0():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if max_to_keep:
            for old in checkpoint_steps(save_dir)[:-max_to_keep]:
                shutil.rmtree(os.path.join(save_dir, str(old)), ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def _remove_stale_tmp(save_dir: str) -> None:
    for name in os.listdir(save_dir):
        if name.startswith(TMP_PREFIX):
            logger.warning("removing the incomplete checkpoint %s", os.path.join(save_dir, name))
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def load_checkpoint(path: str, parts: Mapping[str, Stateful]) -> None:
    """Load the checkpoint at `path` into `parts` in place (collective)."""
    state = _state(parts)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from None
    for name, part in parts.items():
        part.load_state_dict(state[name])


class TrainState:
    """The small state of the loop that must survive a restart: step and data position."""

    def __init__(self) -> None:
        self.step = 0
        self.batches_consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "batches_consumed":
                torch.tensor(self.batches_consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.batches_consumed = int(state_dict["batches_consumed"])
