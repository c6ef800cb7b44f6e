"""Whether this process can still fork workers safely, and the start method to use.

A fork copies one thread and the memory of all: a lock another thread held at that moment
stays held forever in the child. Two cases hang forked training workers here:

- GNU OpenMP (torch's CPU pool) once its threads ran: handled by running forked workers
  with one intra-op thread (`run_training._one_thread_when_forked`).
- gRPC (Arrow Flight's transport): once a Flight client or server was made, gRPC keeps
  its threads for the life of the process, whether or not the client was closed. Seen
  twice: a pytest process that had run the reader tests forked a checkpoint check's
  workers (hung until the 300 s test timeout), and in CI one that had run other tests
  forked `projects.twhin.fit`'s workers (hung in their first step until the 900 s timeout;
  that process's threads at the fork were not recorded, so gRPC is the likely cause there). A notebook that read from a reader service is the same case.

`start_method_for` picks spawn in the second case whenever the function can be imported
by a fresh interpreter; a function defined in `__main__` (a notebook cell) can only be
forked, so it is, with a warning that says why it may hang. A spawned worker of an
importable function does not need the caller's `__main__`, and must not run it:
multiprocessing re-runs the caller's script in each spawned child (a script calling
`fit()` without a `__name__` guard would launch again, and `python -` has no file to run),
so `main_module_hidden` keeps it out of what the children are told to load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

# Thread names (Linux `comm`, 15 characters) of gRPC core's threads as pyarrow 2x starts
# them: "grpc_global_tim" (timer), "event_engine" (its pollers and executors).
_GRPC_THREAD_PREFIXES = ("grpc", "event_engine")


def native_thread_names() -> list[str]:
    """The names of this process's threads, native ones included (empty without procfs)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:   # the thread ended meanwhile
            continue
    return names


def grpc_threads_running() -> bool:
    """True when gRPC threads run in this process (a fork would copy their locks mid-use)."""
    return any(name.startswith(_GRPC_THREAD_PREFIXES) for name in native_thread_names())


def importable(fn: Callable[..., Any]) -> bool:
    """True when a fresh interpreter can import `fn` by name (what a spawned worker does):
    a module-level function of a module other than `__main__`."""
    target = getattr(fn, "func", fn)   # a functools.partial
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    return bool(module) and module not in ("__main__", "__mp_main__") and \
        "<locals>" not in qualname and "<lambda>" not in qualname


def start_method_for(fn: Callable[..., Any]) -> str:
    """"fork" (workers inherit this process's imports: fast, and any function runs) unless
    gRPC threads run here; then "spawn" if `fn` is importable, else "fork" with a warning."""
    if not grpc_threads_running():
        return "fork"
    if importable(fn):
        logger.info("gRPC threads run in this process (an Arrow Flight client or server was "
                    "made here): spawning the workers, since forked ones can hang")
        return "spawn"
    logger.warning("gRPC threads run in this process (an Arrow Flight client or server was "
                   "made here) and %s is defined in __main__, so its workers are forked; a "
                   "forked worker can hang on a lock a gRPC thread held. Define the function "
                   "in a module, or restart the kernel, to avoid it",
                   getattr(fn, "__name__", fn))
    return "fork"


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """While workers of an importable function are spawned: `__main__` without `__file__`
    and `__spec__`, so multiprocessing does not tell the children to run the caller's
    script first (`multiprocessing.spawn.get_preparation_data` reads exactly these two)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__")
             if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
