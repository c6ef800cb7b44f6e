"""Where a resumable dataset is: the next (epoch, batch) to yield, saved with checkpoints.

The in-process TwHIN reader and the reader-service client (`tml.readers.client`) both keep
this position and must agree on its rules, so they share this mixin: `state_dict()` is the
next batch, `load_state_dict()` makes the next `iter()` start there, a fresh `iter()`
without one starts at (0, 0).
"""

from __future__ import annotations


class ResumablePosition:
    """Mixin: set `_num_batches` (batches per epoch) and call `_reset_position()` in
    `__init__`; begin `__iter__` with `_start_iteration()`, which returns (epoch, batch)."""

    _num_batches: int
    _epoch: int
    _batch: int
    _resume_pending: bool

    def _reset_position(self) -> None:
        self._epoch, self._batch = 0, 0
        self._resume_pending = False

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self._num_batches

    def __len__(self) -> int:
        return self._num_batches

    def state_dict(self) -> dict[str, int]:
        """The next batch to yield: `{"epoch": e, "batch": b}` with `b < len(self)`."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next `iter()` start at `state` (as returned by `state_dict`)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0 or (batch and batch >= self._num_batches):
            raise ValueError(f"dataset position {state} is outside 0 <= batch < "
                             f"{self._num_batches} batches per epoch")
        self._epoch, self._batch = epoch, batch
        self._resume_pending = True

    def _start_iteration(self) -> tuple[int, int]:
        """The (epoch, batch) this `iter()` starts at: a loaded position once, else (0, 0)."""
        if not self._resume_pending:
            self._epoch, self._batch = 0, 0
        self._resume_pending = False
        return self._epoch, self._batch
