"""`maybe_run_training`: run `train_fn` here if this is a torchrun worker, else launch workers.

Users write one line at the bottom of a script, Bazel `py_binary` or module:

    maybe_run_training(train_fn, __name__, config_yaml_path=..., save_dir=...)

Outside a worker it re-launches the calling script (or `-m module`) through torch elastic
(`torch.distributed.run`, the engine behind `torchrun`), forwarding the training kwargs as
`--key=value`. Inside each worker the same line runs again, finds WORLD_SIZE and RANK set,
and calls `train_fn(**training_kwargs)` with the kwargs restored to their Python types.

Why the kwargs are encoded: a worker must see what the launcher saw, even where a script
computes a kwarg (a timestamped save_dir, a temporary directory). Non-string values travel
as JSON (`--steps=3`, `--flag=true`, `--x=null`, `--ids=[1,2]`); a string travels as is
unless it would read back as something else (`"3"` travels as `--s="3"`). The launcher names
the forwarded keys in `TML_FORWARDED_KWARGS`, and the worker takes exactly those from argv
(exact names, no abbreviations) and refuses anything else there. The kwargs follow `--` on
torchrun's command line: torchrun's argparse would otherwise read `--n=1` or `--d=x` as an
abbreviation of one of its own options and stop. Kwargs that `train_fn` cannot take are
reported by the launcher before any worker starts.

Non-chief nodes first check that the rendezvous endpoint answers as a c10d store
(`tml.common.rendezvous_probe`): torch's store client waits forever on a server that
accepts and says nothing.

Failure handling: every worker records its exception in torch elastic's error file
(`tml.common.error_file`: atomically, so the agent never reads a half-written one);
the launcher turns elastic's `ChildFailedError` into `TrainingFailedError`, naming the rank
that failed first and that worker's own message (the original tml ignored the exit code).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tml.common.cluster_env import NodeSetup, resolve_node_setup
from tml.common.error_file import record_error
from tml.common.machines import nproc_from_machines_file
from tml.common.rendezvous_probe import probe_rendezvous_store
from tml.errors import TmlError, TrainingFailedError

if TYPE_CHECKING:
    from tml.readers.config import ReadersConfig

logger = logging.getLogger(__name__)

FORWARDED_KWARGS_ENV = "TML_FORWARDED_KWARGS"
_COMMUNICATION_ERROR_HINTS = ("gloo", "Connection closed", "Connection reset", "NCCL",
                              "Broken pipe")


def is_distributed_worker() -> bool:
    """True inside a process started by torch elastic (WORLD_SIZE and RANK are set)."""
    return os.environ.get("WORLD_SIZE") is not None and os.environ.get("RANK") is not None


# --- kwargs encoding --------------------------------------------------------------------

def encode_kwarg(value: Any) -> str:
    """Encode a kwarg value for the command line so that `decode_kwarg` gives it back."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value  # reads back as itself: send it plain, as users would type it
        return json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value)
    except TypeError:
        raise TmlError(
            f"training kwarg value {value!r} of type {type(value).__name__} cannot be passed "
            "to workers on the command line; use str, int, float, bool, None, lists or dicts"
        ) from None


def decode_kwarg(text: str) -> Any:
    """Inverse of `encode_kwarg`: JSON if it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def kwargs_to_args(training_kwargs: dict[str, Any]) -> list[str]:
    """`{"steps": 3}` -> `["--steps=3"]`."""
    return [f"--{key}={encode_kwarg(value)}" for key, value in training_kwargs.items()]


def args_to_kwargs(argv: Sequence[str], keys: Sequence[str],
                   strict: bool = False) -> dict[str, Any]:
    """The values of `--key=value` arguments in argv whose key is in `keys`, decoded.

    Keys match exactly (no argparse-style abbreviations). With `strict` (a worker started
    by our launcher, whose argv holds exactly the forwarded kwargs) any other argument, or a
    key given twice or missing, is a TmlError naming it instead of being ignored.
    """
    wanted = set(keys)
    found: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if sep and key in wanted and (key not in found or not strict):
            found[key] = decode_kwarg(text)
        elif strict and sep and key in found:
            raise TmlError(f"worker command line: --{key} is given twice")
        elif strict:
            shown = arg.split("=", 1)[0] if arg.startswith("-") else repr(arg[:60])
            raise TmlError(f"worker command line: {shown} is not a training kwarg the launcher "
                           f"forwarded ({FORWARDED_KWARGS_ENV} lists {sorted(wanted)}); start "
                           "workers through maybe_run_training, or unset "
                           f"{FORWARDED_KWARGS_ENV}")
    missing = sorted(wanted - set(found))
    if strict and missing:
        raise TmlError(f"worker command line: the forwarded training kwarg(s) {missing} named "
                       f"in {FORWARDED_KWARGS_ENV} are missing")
    return found


def check_kwargs_fit(train_fn: Callable[..., Any], training_kwargs: dict[str, Any]) -> None:
    """TmlError if `train_fn(**training_kwargs)` cannot bind (an unknown or missing kwarg).

    Checked in the launcher, so the mistake is reported once before any worker starts.
    """
    import inspect

    try:
        signature = inspect.signature(train_fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: let the call itself decide
    try:
        signature.bind(**training_kwargs)
    except TypeError as error:
        name = getattr(train_fn, "__qualname__", None) or repr(train_fn)
        raise TmlError(f"training kwargs do not fit {name}{signature}: {error}") from None


# --- entry point resolution -------------------------------------------------------------

def entrypoint_args(module_name: str) -> list[str]:
    """torchrun arguments that re-run the caller: `[script.py]` or `["-m", "pkg.mod"]`.

    `module_name` is `__name__` of the caller (`"__main__"` for a script run directly or with
    `python -m`), a dotted module name, or a path to a Python file.
    """
    if module_name == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            return ["-m", spec.name]
        path = getattr(main, "__file__", None)
        if path and os.path.exists(path):
            return [os.path.abspath(path)]
        raise TmlError(
            "maybe_run_training: __main__ has no file to re-run (interactive session?); "
            "pass the module name or the script path as module_name"
        )
    if module_name.endswith(".py") or os.sep in module_name or os.path.isfile(module_name):
        if not os.path.isfile(module_name):
            raise TmlError(f"maybe_run_training: script not found: {module_name}")
        return [os.path.abspath(module_name)]
    return ["-m", module_name]


def default_nproc_per_node() -> int:
    """CUDA device count, else the machines file's accelerator count, else 1."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    return nproc_from_machines_file() or 1


def check_nproc_per_node(nproc_per_node: int) -> None:
    """Refuse more workers per node than GPUs (each worker owns one device)."""
    import torch

    if nproc_per_node < 1:
        raise TmlError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise TmlError(f"nproc_per_node={nproc_per_node} but this node has "
                       f"{torch.cuda.device_count()} CUDA device(s): each worker needs its own "
                       "GPU; lower nproc_per_node or set CUDA_VISIBLE_DEVICES=\"\" to run on CPU")


def build_torchrun_args(entrypoint: list[str], script_args: list[str], nproc_per_node: int,
                        node: NodeSetup, max_restarts: int = 0, log_dir: str | None = None,
                        join_timeout_s: int | None = None) -> list[str]:
    """The argument list for `torch.distributed.run` (what follows `torchrun`)."""
    args = ["--nnodes", str(node.num_nodes), "--nproc_per_node", str(nproc_per_node)]
    if node.num_nodes > 1:
        args += ["--rdzv_backend", "c10d", "--rdzv_endpoint", str(node.torchrun_endpoint()),
                 "--rdzv_id", node.run_id]
        if join_timeout_s is not None:
            # read_timeout bounds the store client's connect-and-handshake retries too
            # (default 60 s): a non-chief waits for the chief as long as it waits for nodes.
            args += ["--rdzv_conf",
                     f"join_timeout={join_timeout_s},read_timeout={join_timeout_s}"]
    else:
        args.append("--standalone")
    if max_restarts:
        args += ["--max_restarts", str(max_restarts)]
    if log_dir is not None:
        args += ["--log-dir", log_dir]
    # `--` ends torchrun's own options: argparse would otherwise take a training kwarg such
    # as `--n=1` or `--d=x` for an abbreviation of --nnodes / --nproc_per_node / ... .
    if entrypoint[:1] == ["-m"]:
        return args + ["-m", "--", *entrypoint[1:], *script_args]
    return args + ["--", *entrypoint, *script_args]


def _max_restarts(value: int | None) -> int:
    if value is None:
        text = os.environ.get("TML_MAX_RESTARTS", "0")
        try:
            value = int(text)
        except ValueError:
            raise TmlError(f"TML_MAX_RESTARTS={text!r} must be an integer") from None
    if value < 0:
        raise TmlError(f"max_restarts must be >= 0, got {value}")
    return value


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset,
    SLURM's binding), not the host's count, which `os.cpu_count` gives."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):     # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def worker_environment(nproc_per_node: int, max_restarts: int) -> dict[str, str]:
    """Environment set for the workers (never overriding what the user set)."""
    env: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        # Half the cores of each worker's share: measured on 2 cores, one TwHIN worker with
        # 1 thread trains 5% faster than with 2 (OpenMP spin-waits between small ops), and
        # the plain-PyTorch baseline 12% faster. torchrun alone would set 1 and warn.
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // nproc_per_node // 2))
    if max_restarts and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
        # torch 2.13: a restarted group often fails in init_process_group when it shares
        # the rendezvous TCP store (pytorch issue 135712; 2 of 6 restarts worked without
        # this, 5 of 5 with it).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


# --- failures ---------------------------------------------------------------------------

def _failure_text(message: Any) -> str:
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip()


def _cause_priority(exitcode: int | None, text: str) -> int:
    """How likely a failure is the cause of the others (lower: more likely).

    0: the worker recorded an error of its own; 1: it exited or crashed without one
    (non-zero exit, SIGKILL, SIGSEGV); 2: a collective lost a peer; 3: the agent stopped
    it (SIGTERM / SIGINT) after another worker failed.
    """
    teardown = {int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP)}
    if exitcode is not None and exitcode < 0 and -exitcode in teardown:
        return 3
    if any(hint in text for hint in _COMMUNICATION_ERROR_HINTS):
        return 2
    if not text or text.startswith("To enable traceback") or text.startswith("Signal"):
        return 1
    return 0


def training_failed_error(failures: dict[int, tuple[int, str, float]]) -> TrainingFailedError:
    """Build the launcher's error from `{rank: (exitcode, message, timestamp)}`.

    The rank named is the one whose failure looks like the cause (`_cause_priority`), then
    the earliest.
    """
    ranked = sorted(failures.items(), key=lambda item: (
        _cause_priority(item[1][0], item[1][1]), item[1][2], item[0]))
    rank, (exitcode, text, _) = ranked[0]
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? see `dmesg`)" if -exitcode == signal.SIGKILL else ""
        summary = (f"worker rank {rank} was killed by {name}{hint}; set max_restarts (or "
                   "TML_MAX_RESTARTS) to restart the group from the latest checkpoint")
        if text and not text.startswith("Signal"):
            summary += f": {text}"
    else:
        if not text or text.startswith("To enable traceback"):
            text = "it recorded no error; see its output above"
        summary = f"worker rank {rank} failed (exit code {exitcode}): {text}"
    others = [f"rank {r} (exit code {code})" for r, (code, _, _) in ranked[1:]]
    if others:
        summary += f" [also stopped: {', '.join(others)}]"
    return TrainingFailedError(summary, rank=rank, exitcode=exitcode, worker_message=text)


def _failures_from_child_error(error: Any) -> dict[int, tuple[int, str, float]]:
    return {rank: (f.exitcode, _failure_text(f.message), float(f.timestamp))
            for rank, f in error.failures.items()}


def _failures_from_log_dir(log_dir: str, returncode: int) -> dict[int, tuple[int, str, float]]:
    failures: dict[int, tuple[int, str, float]] = {}
    for path in glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True):
        try:
            rank = int(os.path.basename(os.path.dirname(path)))
            with open(path) as f:
                data = json.load(f)
            message = data.get("message", "")
            timestamp = float(message.get("extraInfo", {}).get("timestamp", 0)) \
                if isinstance(message, dict) else float(data.get("timestamp", 0))
            failures[rank] = (returncode, _failure_text(message), timestamp)
        except (OSError, ValueError):
            continue
    return failures


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --- the worker side --------------------------------------------------------------------

def run_in_worker(train_fn: Callable[..., Any], training_kwargs: dict[str, Any]) -> Any:
    """Call `train_fn` in a worker, recording any exception for the launcher.

    A `TmlError` (bad input) is logged as one line and ends the worker with exit code 1, no
    traceback; other exceptions propagate with their traceback. Either way the message is
    written to torch elastic's error file, which is how the launcher learns it.
    """
    import faulthandler

    faulthandler.enable(all_threads=True)  # what torch's error handler's initialize() does
    try:
        kwargs = dict(training_kwargs)
        if FORWARDED_KWARGS_ENV in os.environ:
            forwarded = _forwarded_keys(os.environ[FORWARDED_KWARGS_ENV])
            kwargs.update(args_to_kwargs(sys.argv[1:], forwarded, strict=True))
        check_kwargs_fit(train_fn, kwargs)
        return train_fn(**kwargs)
    except TmlError as error:
        record_error(error)
        logger.error("%s: %s", type(error).__name__, error)
        raise SystemExit(1) from None
    except Exception as error:
        record_error(error)
        if _is_lost_peer(error):
            # The cause is another worker's failure, which the launcher reports; a
            # traceback from inside the collective would only bury it.
            logger.error("lost the connection to another worker (it most likely failed; "
                         "the launcher names it): %s", str(error).splitlines()[0][:300])
            raise SystemExit(1) from None
        raise


def _forwarded_keys(text: str) -> list[str]:
    try:
        keys = json.loads(text)
    except ValueError:
        keys = None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TmlError(f"{FORWARDED_KWARGS_ENV}={text[:80]!r} must be a JSON list of names "
                       "(the launcher sets it)")
    return keys


def _is_lost_peer(error: BaseException) -> bool:
    """A collective failed because a peer process went away."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        hint in text for hint in ("Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe"))


# --- the launcher side ------------------------------------------------------------------

def maybe_run_training(
    train_fn: Callable[..., Any],
    module_name: str,
    nproc_per_node: int | None = None,
    num_nodes: int | None = None,
    set_python_path_in_subprocess: bool | None = None,
    is_chief: bool = False,
    max_restarts: int | None = None,
    rdzv_endpoint: str | None = None,
    run_id: str | None = None,
    reader_fn: Callable[..., Any] | None = None,
    readers: ReadersConfig | None = None,
    **training_kwargs: Any,
) -> Any:
    """Run `train_fn(**training_kwargs)` in this worker, or launch workers that will.

    Args:
      train_fn: the training function; runs once per worker.
      module_name: `__name__` of the caller, a dotted module name, or a script path: what
        the workers run (it must call `maybe_run_training` again). In a notebook (no file
        behind `__main__`) the workers are forked from the kernel and run `train_fn`
        directly.
      nproc_per_node: workers on this node; default: CUDA devices, else the machines file
        (`TML_MACHINES_FILE`, `chief.num_accelerators`), else 1.
      num_nodes, is_chief, rdzv_endpoint, run_id: several nodes; each defaults to our
        environment variables, then SLURM's, then the machines file (`tml.common.cluster_env`
        gives the precedence).
      set_python_path_in_subprocess: run torchrun as a subprocess with PYTHONPATH set from
        `sys.path` (Bazel-stubbed binaries need this). None (default): on when running under
        Bazel (`bazel run`, `bazel test`, a built binary), else off.
      max_restarts: restarts of the whole worker group after a failure (torch elastic);
        default `TML_MAX_RESTARTS` or 0. Workers see the attempt in
        `TORCHELASTIC_RESTART_COUNT`.
      reader_fn: the reader role's function (`tml.readers`): a process started with
        `TML_ROLE=reader` (or on a SLURM reader node) runs `reader_fn(**training_kwargs)`
        instead of training. When no reader addresses are given (`TML_READERS`, SLURM,
        `readers.addresses`) and `readers.num_readers` (else `TML_NUM_READERS`, else the
        machines file's `num_dataset_workers`) is positive, the launcher starts that many
        readers beside the trainers, hands their addresses to the workers in
        `TML_READERS`, and stops them at the end. On several nodes each node's launcher
        starts that many for its own trainers.
      readers: the run's `ReadersConfig` (see reader_fn).
      **training_kwargs: passed to `train_fn`, forwarded to workers as `--key=value`.

    Returns:
      In a worker, what `train_fn` returns. In a notebook, `{rank: return value}`. In a
      script's launcher, None; but one worker on one node with no restarts and no readers
      trains in the launcher's own process (`run_one_worker_here`; `TML_ONE_WORKER_IN_PROCESS=0`
      turns that off), which returns what `train_fn` returns.

    Raises:
      TrainingFailedError: a worker failed; names its rank and its message.
      TmlError: the launch itself cannot happen (bad node setup, busy port, timeout).
    """
    if reader_fn is not None and not is_distributed_worker():
        from tml.readers import roles

        if roles.is_reader():
            kwargs = dict(training_kwargs)
            if FORWARDED_KWARGS_ENV in os.environ:
                forwarded = _forwarded_keys(os.environ[FORWARDED_KWARGS_ENV])
                kwargs.update(args_to_kwargs(sys.argv[1:], forwarded, strict=True))
            check_kwargs_fit(reader_fn, kwargs)
            return roles.run_reader(reader_fn, kwargs)
    if is_distributed_worker():
        return run_in_worker(train_fn, training_kwargs)

    check_kwargs_fit(train_fn, training_kwargs)
    if nproc_per_node is None:
        nproc_per_node = default_nproc_per_node()
    check_nproc_per_node(nproc_per_node)
    restarts = _max_restarts(max_restarts)
    node = resolve_node_setup(num_nodes, is_chief, rdzv_endpoint, run_id)

    if module_name == "__main__" and is_interactive_main():
        if node.num_nodes > 1:
            raise TmlError("a notebook launches workers on its own machine only; run a script "
                           "on each node for several nodes")
        return run_forked(train_fn, nproc_per_node, restarts, **training_kwargs)

    subprocess_mode = running_under_bazel() if set_python_path_in_subprocess is None \
        else set_python_path_in_subprocess
    if _one_worker_here(node, nproc_per_node, restarts, reader_fn, readers, subprocess_mode):
        logger.info("training with 1 worker on 1 node in this process (no restarts, no "
                    "readers: nothing for torchrun to manage; %s=0 launches it anyway)",
                    IN_PROCESS_ENV)
        return run_one_worker_here(train_fn, training_kwargs)

    join_timeout = _rendezvous_timeout()
    if node.num_nodes > 1 and node.is_chief:
        check_rendezvous_port_free(node)
    elif node.num_nodes > 1:
        probe_rendezvous_store(str(node.rdzv_endpoint), join_timeout)
    entrypoint = entrypoint_args(module_name)
    script_args = kwargs_to_args(training_kwargs)
    env = {FORWARDED_KWARGS_ENV: json.dumps(list(training_kwargs)),
           **worker_environment(nproc_per_node, restarts)}

    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="tml-launch-") as log_dir, \
            _maybe_local_readers(reader_fn, readers, entrypoint, script_args, env,
                                 node, nproc_per_node, log_dir):
        args = build_torchrun_args(entrypoint, script_args, nproc_per_node, node, restarts,
                                   log_dir=log_dir, join_timeout_s=join_timeout)
        logger.info("launching %d worker(s) per node on %d node(s) (%s), torchrun %s: "
                    "torchrun %s", nproc_per_node, node.num_nodes, node.source,
                    SUBPROCESS_MODE if subprocess_mode else IN_PROCESS_MODE, " ".join(args))
        if subprocess_mode:
            _run_torchrun_subprocess(args, env, log_dir)
        else:
            # Elastic copies the failing child's error file here (else it logs that the
            # launcher has none).
            env["TORCHELASTIC_ERROR_FILE"] = os.path.join(log_dir, "launcher-error.json")
            _run_torchrun_in_process(args, env, node, join_timeout)
    return None


# Set to 0 to launch a lone worker through torchrun all the same.
IN_PROCESS_ENV = "TML_ONE_WORKER_IN_PROCESS"


def _one_worker_here(node: NodeSetup, nproc_per_node: int, restarts: int,
                     reader_fn: Callable[..., Any] | None, readers: ReadersConfig | None,
                     subprocess_mode: bool) -> bool:
    """True when the launcher should train itself: one worker on one node, no restarts to
    supervise, no reader processes to start or reach, not under Bazel (whose launch mode
    its tests check), and not turned off by `TML_ONE_WORKER_IN_PROCESS=0`.

    Why: torchrun would start a second interpreter that imports torch, TorchRec and fbgemm
    again, run a rendezvous and an agent, for a worker it can neither restart nor pair with
    anyone: ~1.5 s and ~1.5 CPU s of every one-worker command on the 2-core box (issue
    13's start-up; issue 20's small graphs, whose whole training takes ~15 s)."""
    if os.environ.get(IN_PROCESS_ENV, "1") == "0" or subprocess_mode:
        return False
    if node.num_nodes != 1 or nproc_per_node != 1 or restarts:
        return False
    if reader_fn is not None:
        from tml.readers import roles

        if roles.reader_addresses(readers) is not None or roles.local_reader_count(readers):
            return False
    return True


def run_one_worker_here(train_fn: Callable[..., Any], training_kwargs: dict[str, Any]) -> Any:
    """`train_fn(**training_kwargs)` in this process as rank 0 of 1, with the environment a
    torchrun worker sees (rank variables, `OMP_NUM_THREADS`) and no store to reach: the
    process group is a local one (`tml.common.device`). An error propagates as itself (the
    caller prints it), SIGTERM unwinds as in the launcher."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "1",
           "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
           **worker_environment(1, 0)}
    with _sigterm_unwinds(), _environment(**env):
        if "torch" in sys.modules:   # imported already: the variable alone is read too late
            _set_intra_op_threads(os.environ.get("OMP_NUM_THREADS", ""))
        return train_fn(**training_kwargs)


def _set_intra_op_threads(text: str) -> None:
    import torch

    if text.isdigit() and int(text) > 0:
        torch.set_num_threads(int(text))


@contextmanager
def _maybe_local_readers(reader_fn: Callable[..., Any] | None, readers: ReadersConfig | None,
                         entrypoint: list[str], script_args: list[str], env: dict[str, str],
                         node: NodeSetup, nproc_per_node: int, log_dir: str) -> Iterator[None]:
    """Start readers beside the trainers when asked and no reader addresses are given;
    their addresses go to the workers in `env` (`tml.readers.roles`)."""
    if reader_fn is None:
        yield
        return
    from tml.readers import roles

    if roles.reader_addresses(readers) is not None:
        yield   # readers on their own nodes: the workers find them the same way
        return
    count = roles.local_reader_count(readers)
    if not count:
        yield
        return
    world_size = node.num_nodes * nproc_per_node
    command = [sys.executable, *entrypoint, *script_args]
    child_env = {**os.environ, **env, "PYTHONPATH": ":".join(p for p in sys.path if p)}
    timeout = readers.start_timeout_s if readers is not None else 300.0
    # On several nodes each node's launcher starts its own readers, which serve the
    # trainers of that node (`node` scope).
    per_node = node.num_nodes > 1
    with roles.local_readers(command, count, world_size, child_env, log_dir,
                             start_timeout_s=timeout,
                             group_size=nproc_per_node if per_node else None) as found:
        env[roles.READERS_ENV] = ",".join(found)
        if per_node:
            env[roles.READER_SCOPE_ENV] = "node"
        yield


def _rendezvous_timeout() -> int:
    text = os.environ.get("TML_RDZV_TIMEOUT", "600")
    try:
        value = int(text)
    except ValueError:
        raise TmlError(f"TML_RDZV_TIMEOUT={text!r} must be a whole number of seconds") from None
    if value < 1:
        raise TmlError(f"TML_RDZV_TIMEOUT must be at least 1 second, got {value}")
    return value


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job, `timeout`, `kill`) ends the launcher by an
    exception, so its temporary log directory is removed on the way out.

    Python's default for SIGTERM ends the process on the spot. While workers run, torch
    elastic installs its own handler, which also raises (and stops the workers first).
    """
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_rendezvous_port_free(node: NodeSetup) -> None:
    """On the chief, fail at once if the rendezvous port is taken.

    Otherwise torch elastic falls back to connecting to whatever listens there and waits
    for a store that never answers.
    """
    import socket

    port = int(str(node.rdzv_endpoint).rsplit(":", 1)[-1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            raise TmlError(f"the rendezvous port {port} ({node.rdzv_endpoint}) is already in "
                           "use on this host (another job?): pick a free port in "
                           "TML_RDZV_ENDPOINT") from None


def is_interactive_main() -> bool:
    """True when `__main__` has no file to re-run: a Jupyter kernel, a REPL, `python -`."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    return (spec is None or not spec.name or spec.name == "__main__") and \
        (not path or not os.path.isfile(path))


# How the launch line names the mode (tools/bazel/test.sh checks that `bazel run` chose the
# subprocess: Bazel's runfiles tree is on the launcher's path, not on the workers').
SUBPROCESS_MODE = "as a subprocess with PYTHONPATH set"
IN_PROCESS_MODE = "in this process"


def running_under_bazel() -> bool:
    """A Bazel-launched binary or test (its launcher set one of these; children inherit them,
    which is why an explicit `set_python_path_in_subprocess` wins)."""
    return any(name in os.environ for name in (
        "BAZEL_TEST", "RUNFILES_DIR", "RUNFILES_MANIFEST_FILE", "PYTHON_RUNFILES",
        "BUILD_WORKSPACE_DIRECTORY"))


def _one_thread_when_forked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run with one intra-op thread, for workers forked from this process.

    GNU OpenMP (torch's CPU thread pool on Linux) cannot run a parallel region in a process
    forked after the parent's OpenMP threads started: the child waits forever for threads
    that were not copied. A notebook or a test that ran torch ops before `run_forked` hung
    this way in the first multi-threaded kernel of the step. With one thread torch never
    enters a parallel region, so forked workers are safe; spawned workers (scripts,
    torchrun) keep their thread count.
    """
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        torch.set_num_threads(1)
        return fn(*args, **kwargs)

    return run


def launch_function(fn: Callable[..., Any], nproc_per_node: int, *args: Any,
                    start_method: str = "spawn", max_restarts: int = 0) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc_per_node` local worker processes; `{rank: return value}`.

    Torch elastic's `elastic_launch` with a standalone c10d rendezvous on localhost (the
    same engine as `torchrun --standalone`). Under "spawn" `fn` must be importable by the
    workers (a module-level function); "fork" runs anything, including functions defined
    in a notebook. A failure raises `TrainingFailedError` naming the rank and its message.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .fork_safety import importable, main_module_hidden

    check_nproc_per_node(nproc_per_node)
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="tml-launch-") as log_dir, \
            _environment(**worker_environment(nproc_per_node, max_restarts)):
        # Our own log dir: elastic's default is a torchelastic_* dir it never removes.
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node,
                              run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                              start_method=start_method, monitor_interval=0.1,
                              logs_specs=DefaultLogsSpecs(log_dir=log_dir))
        spawned_alone = start_method != "fork" and importable(fn)
        try:
            target = _one_thread_when_forked(fn) if start_method == "fork" else fn
            with main_module_hidden() if spawned_alone else contextlib.nullcontext():
                results = elastic_launch(config, target)(*args)
        except ChildFailedError as error:
            raise training_failed_error(_failures_from_child_error(error)) from None
    return dict(sorted(results.items()))


def run_forked(train_fn: Callable[..., Any], nproc_per_node: int | None = None,
               max_restarts: int | None = None, **training_kwargs: Any) -> dict[int, Any]:
    """`train_fn(**training_kwargs)` in `nproc_per_node` workers forked from this process;
    `{rank: return value}`. Spawned instead where a fork could hang and `train_fn` is
    importable (`tml.common.fork_safety`).

    What a notebook cell needs: there is no script to re-run, and the workers inherit this
    process's modules and `sys.path`, so `train_fn` may be any function. `max_restarts`
    None: `TML_MAX_RESTARTS`, else 0; `nproc_per_node` None: as `maybe_run_training`.
    """
    from .fork_safety import start_method_for

    return _run_local(train_fn, nproc_per_node, max_restarts, start_method_for(train_fn),
                      training_kwargs)


def run_spawned(train_fn: Callable[..., Any], nproc_per_node: int | None = None,
                max_restarts: int | None = None, **training_kwargs: Any) -> dict[int, Any]:
    """`train_fn(**training_kwargs)` in `nproc_per_node` spawned workers; `{rank: return
    value}`. `train_fn` must be importable (a module-level function outside `__main__`).

    What a library call needs (`projects.twhin.fit`): fresh interpreters hold none of the
    caller's threads or locks, whatever the caller ran before (a fork can hang,
    `tml.common.fork_safety`), and the caller's script is not run again in them. Each
    worker pays its imports. Arguments as `run_forked`.
    """
    from .fork_safety import importable

    if not importable(train_fn):
        raise TmlError(f"run_spawned: {getattr(train_fn, '__qualname__', train_fn)!r} is "
                       "not importable by a fresh interpreter (define it at module level "
                       "outside __main__, or use run_forked)")
    return _run_local(train_fn, nproc_per_node, max_restarts, "spawn", training_kwargs)


def _run_local(train_fn: Callable[..., Any], nproc_per_node: int | None,
               max_restarts: int | None, start_method: str,
               training_kwargs: dict[str, Any]) -> dict[int, Any]:
    check_kwargs_fit(train_fn, training_kwargs)
    if nproc_per_node is None:
        nproc_per_node = default_nproc_per_node()
    bound = functools.update_wrapper(functools.partial(train_fn, **training_kwargs),
                                     train_fn)  # elastic names the run after __name__
    return launch_function(bound, nproc_per_node, start_method=start_method,
                           max_restarts=_max_restarts(max_restarts))


def _run_torchrun_in_process(args: list[str], env: dict[str, str], node: NodeSetup,
                             join_timeout_s: int) -> None:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    with _environment(**env):
        try:
            torchrun.main(args)
        except ChildFailedError as error:
            raise training_failed_error(_failures_from_child_error(error)) from None
        except RendezvousError as error:
            raise rendezvous_error(error, node, join_timeout_s) from None
        except Exception as error:  # noqa: BLE001 (store errors come in several types)
            if _is_address_in_use(error):
                raise rendezvous_error(error, node, join_timeout_s) from None
            raise


def _is_address_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "address already in use" in text or "eaddrinuse" in text or "errno 98" in text


def rendezvous_error(error: BaseException, node: NodeSetup, join_timeout_s: int) -> TmlError:
    """A launch that never assembled, as one line saying what to do."""
    endpoint = node.rdzv_endpoint or "localhost"
    if _is_address_in_use(error):
        return TmlError(f"the rendezvous port of {endpoint} is already in use on this host "
                        "(another job?): pick a free port in TML_RDZV_ENDPOINT")
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    if isinstance(error, RendezvousTimeoutError) or "timeout" in str(error).lower():
        return TmlError(f"not all {node.num_nodes} nodes joined the rendezvous at {endpoint} "
                        f"(run id {node.run_id}) within {join_timeout_s} s: start every node "
                        "with the same endpoint and run id, or raise TML_RDZV_TIMEOUT")
    return TmlError(f"the rendezvous at {endpoint} (run id {node.run_id}) failed: "
                    f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")


def _run_torchrun_subprocess(args: list[str], env: dict[str, str], log_dir: str) -> None:
    child_env = {**os.environ, **env, "PYTHONPATH": ":".join(p for p in sys.path if p)}
    with subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args],
                          env=child_env) as child:
        try:
            returncode = child.wait()
        except BaseException:
            # Stopped (SIGTERM, Ctrl-C): let torchrun stop its workers before we go.
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    if returncode != 0:
        failures = _failures_from_log_dir(log_dir, returncode)
        if failures:
            raise training_failed_error(failures)
        raise TrainingFailedError(f"torchrun exited with code {returncode}",
                                  exitcode=returncode)
