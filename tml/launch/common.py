"""What every backend shares: run ids and directories, the torchrun line, artifacts.

Every backend starts the same thing on each node: one torch elastic agent
(`python -m torch.distributed.run`) with c10d rendezvous at the master node, which starts
`nproc_per_node` workers running the workflow's file. We never schedule or rendezvous
ourselves; the backends differ only in how the agents get their nodes and the endpoint.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
import sys

from tml.common.safe_paths import check_name
from tml.launch import artifacts
from tml.launch.artifacts import Copied
from tml.launch.workflow import LaunchError, Workflow

logger = logging.getLogger(__name__)

# Variables of an enclosing torchrun or SLURM step that must not leak into a nested launch.
_WORKER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                     "TORCHELASTIC_ERROR_FILE", "TML_FORWARDED_KWARGS")


def new_run_id() -> str:
    """Sortable and unique enough: `20261123-031500-a1b2c3`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def run_dir_path(runs_dir: str, workflow: Workflow, run_id: str) -> str:
    """`runs_dir/<name>/<run-id>`, absolute. The name is checked here too, since a Workflow
    built with `model_construct` skips the model's validation."""
    check_name(workflow.name, "workflow name", error=LaunchError)
    if re.search(r"[\x00-\x1f\x7f]", runs_dir):
        raise LaunchError(f"--runs-dir {runs_dir!r}: control characters are not allowed")
    return os.path.abspath(os.path.join(runs_dir, workflow.name, run_id))


def make_run_dir(runs_dir: str, workflow: Workflow, run_id: str) -> str:
    """`runs_dir/<name>/<run-id>/` with `logs/`, created; returned absolute."""
    run_dir = run_dir_path(runs_dir, workflow, run_id)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    return run_dir


def torchrun_args(workflow: Workflow, endpoint: str, rdzv_id: str, is_host: str) -> list[str]:
    """Arguments after `python`: one agent of a c10d rendezvous of `workflow.nodes` nodes.

    `is_host` ("1"/"0", or a shell expression in a script) tells the agent whether it hosts
    the rendezvous store, instead of letting it guess from the endpoint's host name (nodes
    that share an address, as in a one-host test cluster, would all guess yes).
    """
    return ["-m", "torch.distributed.run",
            "--nnodes", str(workflow.nodes),
            "--nproc_per_node", str(workflow.nproc_per_node),
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint,
            "--rdzv_id", rdzv_id,
            "--rdzv_conf", f"is_host={is_host}",
            "--max_restarts", str(max_restarts_of(workflow)),
            workflow.file, *workflow.args]


def node_argv(workflow: Workflow, python: str, agent_args: list[str],
              tml_root: str | None) -> list[str]:
    """What each node runs: the torchrun agent (`python agent_args...`), or with
    `readers.per_node` the node's readers first and then the agent
    (`tml.launch.node_readers`; `tml_root` as there)."""
    if not workflow.readers.per_node:
        return [python, *agent_args]
    from tml.launch.node_readers import node_command

    return node_command(python, tml_root, workflow.readers.per_node,
                        workflow.readers.start_timeout_s,
                        workflow.nodes * workflow.nproc_per_node, workflow.nproc_per_node,
                        [python, workflow.file, *workflow.args], [python, *agent_args])


_CONFIG_FLAGS = ("--config_yaml_path", "--config")


def _config_path(workflow: Workflow) -> str | None:
    """The config file named in the script's args (`--config_yaml_path X`, `--config=X`)."""
    args = workflow.args
    for index, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag in _CONFIG_FLAGS:
            if sep:
                return value
            return args[index + 1] if index + 1 < len(args) else None
    return None


def _overridden_restarts(args: list[str]) -> int | None:
    """`training.max_restarts` set in the script's args (`--set k=v`, `--k=v`), if it is."""
    from tml.common.cli import split_dotted_overrides

    rest, overrides = split_dotted_overrides(args)
    overrides += [value for flag, value in zip(rest, rest[1:]) if flag == "--set"]
    overrides += [arg.split("=", 1)[1] for arg in rest if arg.startswith("--set=")]
    value = None
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip() == "training.max_restarts":
            if not text.strip().isdigit():
                raise LaunchError(f"{item}: training.max_restarts must be a non-negative "
                                  "integer")
            value = int(text)
    return value


def max_restarts_of(workflow: Workflow) -> int:
    """Restarts of the worker group: the workflow's `max_restarts`, else
    `training.max_restarts` as the script's args override it or the config it runs says,
    else TML_MAX_RESTARTS, else 0.

    The config is read as data (not validated: that is the script's job, in the workers);
    a value that is not a non-negative integer is a LaunchError naming the file.
    """
    if workflow.max_restarts is not None:
        return workflow.max_restarts
    overridden = _overridden_restarts(workflow.args)
    if overridden is not None:
        return overridden
    path = _config_path(workflow)
    if path is not None:
        from tml.core.config import read_config_data
        from tml.errors import ConfigError

        full = path if "://" in path else os.path.join(workflow.working_path(), path)
        try:
            data = read_config_data(full, substitute=False)
        except ConfigError:
            data = {}   # the script reports a missing or broken config, with its context
        training = data.get("training")
        value = training.get("max_restarts") if isinstance(training, dict) else None
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LaunchError(f"{path}: training.max_restarts must be a non-negative "
                                  f"integer, got {value!r}")
            return value
    text = workflow.environment.get("TML_MAX_RESTARTS", os.environ.get("TML_MAX_RESTARTS", "0"))
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"TML_MAX_RESTARTS={text!r} must be an integer") from None
    if value < 0:
        raise LaunchError(f"TML_MAX_RESTARTS={text!r} must be >= 0")
    return value


def workflow_environment(workflow: Workflow) -> dict[str, str]:
    """The workflow's environment, plus what restarts need.

    torch 2.13: a restarted group often fails in init_process_group when it shares the
    rendezvous TCP store (pytorch issue 135712), so restarts run with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless the workflow sets it.
    """
    env = dict(workflow.environment)
    if max_restarts_of(workflow) and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def base_environment(workflow: Workflow, cpus_per_node: int | None = None,
                     python: str | None = None) -> dict[str, str]:
    """This process's environment without worker variables, plus the workflow's.

    OMP_NUM_THREADS splits the node's cores between its workers unless set (torchrun would
    set 1 and warn).
    """
    env = {k: v for k, v in os.environ.items() if k not in _WORKER_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    # before_run commands and the script see the launching interpreter first on PATH, as
    # in an activated virtual environment.
    env["PATH"] = os.pathsep.join([os.path.dirname(python or sys.executable),
                                   env.get("PATH", "")])
    if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in workflow.environment:
        cpus = cpus_per_node or workflow.resources.cpu or os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cpus // workflow.nproc_per_node))
    env.update(workflow_environment(workflow))
    return env


def copy_artifacts(workflow: Workflow, run_dir: str) -> Copied:
    """Copy the artifacts from working_dir to `run_dir/artifacts/` (tml.launch.artifacts)."""
    return artifacts.copy_artifacts(workflow.working_path(), workflow.artifacts, run_dir)


def log_tail(path: str, lines: int = 25) -> str:
    """The last lines of a log file (or a note that there is none).

    The agent's own traceback (torchrun raising ChildFailedError) is dropped: it says only
    that a worker failed, and would push the worker's message out of the tail. The agent's
    summary box after it (rank, exit code) stays.
    """
    try:
        with open(path, errors="replace") as f:
            kept = _without_agent_traceback(f.read().splitlines())
    except OSError:
        return "(no log)"
    return "\n".join(kept[-lines:])


def _without_agent_traceback(lines: list[str]) -> list[str]:
    kept: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("Traceback (most recent call last):"):
            end = next((j for j in range(i + 1, len(lines))
                        if not lines[j].startswith((" ", "\t"))), len(lines))
            frames = "\n".join(lines[i:end])
            if end < len(lines) and "ChildFailedError" in lines[end] \
                    and "torch/distributed/run.py" in frames:
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return kept
