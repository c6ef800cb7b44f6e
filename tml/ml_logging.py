"""Logging for tml: rank-aware lines, rank 0 by default, library noise silenced here.

This is the one place where third-party noise is silenced. Each entry below was read once
and judged harmless for our use (TorchRec 1.8 / torch 2.13):

* fbgemm_gpu calls `logging.info` on the root logger while importing, which runs
  `logging.basicConfig()` if the root logger has no handler. We add our handler first, so
  that call changes nothing.
* `torch.jit.script is deprecated` (dozens, from torchrec modules), `apply_optimizer_in_backward
  ... deprecated`, ShardedTensor deprecation FutureWarnings, `is_fx_tracing`, DMP's
  `broadcast_buffers is deprecated`: deprecation notices about APIs we call on purpose.
* Planner topology / storage-reservation warnings: the planner telling us it uses defaults
  that we set explicitly anyway.
* `torchrec`, `torch.fx._symbolic_trace` loggers below WARNING, and the elastic agent's INFO
  chatter; their warnings and errors still show.

Ranks other than 0 log WARNING and above only (errors are never silenced); set
`TML_LOG_ALL_RANKS=1` to see every rank's INFO lines. `TML_LOG_LEVEL` sets the level.
"""

from __future__ import annotations

import logging
import os
import warnings

_HANDLER_NAME = "tml"
_QUIET_LOGGERS = {
    "torchrec": logging.WARNING,
    "torchrec.distributed.planner": logging.ERROR,
    "torchrec.distributed.utils": logging.ERROR,
    "torch.fx._symbolic_trace": logging.ERROR,
    "torch.distributed.elastic": logging.WARNING,
    "torch.distributed.elastic.multiprocessing.redirects": logging.ERROR,
    "fbgemm_gpu": logging.WARNING,
}
_IGNORED_WARNING_MESSAGES = [
    r".*torch\.jit\.script.*deprecated.*",
    r".*`torch\.jit\.script` is deprecated.*",
    r".*apply_optimizer_in_backward.*deprecated.*",
    r".*ShardedTensor.*",
    r".*is_fx_tracing.*",
    r".*broadcast_buffers.*deprecated.*",
    r".*Please use DTensor instead.*",
    r".*topology.*",
    r".*storage reservation.*",
    r".*TypedStorage is deprecated.*",
]


def current_rank() -> int | None:
    """Global rank of this process, or None outside a distributed worker."""
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


class _RankFilter(logging.Filter):
    """Adds `rank` to each record; drops sub-WARNING records on ranks other than 0."""

    def __init__(self, all_ranks: bool) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        if rank is not None:
            record.rank = f"rank {rank}"
        elif os.environ.get("TML_ROLE") == "reader":   # tml.readers: a reader process
            record.rank = f"reader {os.environ.get('TML_READER_INDEX', '?')}"
        else:
            record.rank = "launcher"
        if rank not in (None, 0) and not self.all_ranks:
            return record.levelno >= logging.WARNING
        return True


def silence_library_noise() -> None:
    """Quiet the third-party loggers and warnings listed in this module's docstring."""
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message in _IGNORED_WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchrec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")


def setup_logging(level: str | int | None = None) -> None:
    """Install the tml handler on the root logger (idempotent) and silence known noise.

    Safe to call many times; the first call wins for the handler, later calls may change
    the level.
    """
    root = logging.getLogger()
    level = level or os.environ.get("TML_LOG_LEVEL", "INFO")
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler()
        handler.name = _HANDLER_NAME
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(name)s: %(message)s",
                              datefmt="%H:%M:%S")
        )
        handler.addFilter(_RankFilter(os.environ.get("TML_LOG_ALL_RANKS") == "1"))
        root.addHandler(handler)
        # The root stays at WARNING so that third-party INFO stays quiet; our own packages
        # log at `level`.
        if root.level == logging.NOTSET or root.level > logging.WARNING:
            root.setLevel(logging.WARNING)
    for name in ("tml", "projects", "__main__"):
        logging.getLogger(name).setLevel(level)
    silence_library_noise()


def get_logger(name: str) -> logging.Logger:
    """The logger for a tml or project module (`get_logger(__name__)`)."""
    return logging.getLogger(name)
