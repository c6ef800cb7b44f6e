"""The local backend: `nodes` torch elastic agents on this machine, c10d on 127.0.0.1.

Each "node" is a real `python -m torch.distributed.run` process with its own log, so a
multi-node workflow is exercised here exactly as on a cluster (same rendezvous, same
ranks), only with the nodes sharing a host and a working directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tml.launch import run_env
from tml.launch.artifacts import refused_error
from tml.launch.common import base_environment, copy_artifacts, log_tail, node_argv, torchrun_args
from tml.launch.node_readers import tml_root
from tml.launch.workflow import LaunchFailedError, Workflow

logger = logging.getLogger(__name__)

# After the first node fails, the others get this long to notice and stop on their own.
_GRACE_S = 2.0
# How long a stopped agent gets to stop its workers before it and they are killed.
_TERM_WAIT_S = 5.0


def free_port() -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPlan:
    """The commands of a local run, so that --dry-run can show them."""

    commands: list[list[str]]
    before_run: list[str]
    env: dict[str, str]
    cwd: str

    def render(self) -> str:
        lines = [f"# working directory: {self.cwd}"]
        for node, command in enumerate(self.commands):
            lines.append(f"# node {node}")
            lines += [f"  {c}" for c in self.before_run]
            lines.append("  " + shlex.join(command))
        return "\n".join(lines)


def plan(workflow: Workflow, run_id: str, port: int | None = None,
         python: str | None = None) -> LocalPlan:
    """`python`: the run's environment (a requirements file), else this interpreter."""
    python = python or sys.executable
    endpoint = f"127.0.0.1:{port or free_port()}"
    rdzv_id = f"{workflow.name}-{run_id}"
    root = tml_root()
    commands = [node_argv(workflow, python, torchrun_args(workflow, endpoint, rdzv_id,
                                                          "1" if node == 0 else "0"), root)
                for node in range(workflow.nodes)]
    # The nodes share this machine's cores.
    cpus = max(1, (os.cpu_count() or 1) // workflow.nodes)
    return LocalPlan(commands=commands, before_run=list(workflow.before_run),
                     env=base_environment(workflow, cpus_per_node=cpus, python=python),
                     cwd=workflow.working_path())


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc); elastic starts workers in their own sessions,
    so a process group signal would miss them."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the agent (it stops its workers); SIGKILL it and its workers if it hangs.

    An agent waiting in torch elastic's exit barrier sits in a blocking store call and
    handles SIGTERM only when that returns (minutes), hence the short wait.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_TERM_WAIT_S)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in [process.pid, *_descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def _run_before(commands: list[str], env: dict[str, str], cwd: str, log, node: int) -> None:
    for command in commands:
        log.write(f"$ {command}\n")
        log.flush()
        result = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise LaunchFailedError(f"node {node}: before_run command {command!r} exited "
                                    f"with code {result.returncode} (log: {log.name})")


def run(workflow: Workflow, run_dir: str, run_id: str, source: str = "workflow",
        on_started: Callable[[list[int]], None] | None = None) -> None:
    """Run the workflow's nodes here; collect artifacts and logs into `run_dir`.

    A requirements file is installed first into the run's own environment (the nodes
    share this machine, so once serves them all). Raises LaunchFailedError naming the
    first node that failed (its log tail is printed).
    """
    python = None
    if workflow.requirements_file is not None:
        python = run_env.prepare(workflow, run_dir, source, base_environment(workflow))
    local = plan(workflow, run_id, python=python)
    logs = [os.path.join(run_dir, "logs", f"node-{node}.log") for node in range(workflow.nodes)]
    processes: list[subprocess.Popen] = []
    files = []
    try:
        for node, command in enumerate(local.commands):
            log = open(logs[node], "w")  # noqa: SIM115 (closed below)
            files.append(log)
            _run_before(local.before_run, local.env, local.cwd, log, node)
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            processes.append(subprocess.Popen(
                command, env={**local.env, "TML_NODE_RANK": str(node)}, cwd=local.cwd,
                stdout=log, stderr=subprocess.STDOUT))
        if on_started is not None:
            on_started([p.pid for p in processes])
        logger.info("started %d node(s) x %d worker(s); logs in %s", workflow.nodes,
                    workflow.nproc_per_node, os.path.join(run_dir, "logs"))
        failed = _wait(processes)
    except BaseException as error:
        for process in processes:
            _stop(process)
        if isinstance(error, (KeyboardInterrupt, LaunchFailedError)) and processes:
            copy_artifacts(workflow, run_dir)  # stopped: keep what the run has written
        raise
    finally:
        for log in files:
            log.close()
    copy_artifacts(workflow, run_dir)
    if failed is not None:
        node, code = failed
        print(f"--- node {node} log tail ({logs[node]}) ---\n{log_tail(logs[node])}",
              file=sys.stderr)
        raise LaunchFailedError(f"node {node} failed (exit code {code}); logs and artifacts "
                                f"in {run_dir}", exit_code=code)
    refused = refused_error(run_dir)
    if refused is not None:
        raise refused
    logger.info("finished; artifacts and logs in %s", run_dir)


def _wait(processes: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Wait for every node; on the first failure stop the rest. Returns (node, code)."""
    first_failure: tuple[int, int] | None = None
    deadline = None
    while True:
        codes = [p.poll() for p in processes]
        for node, code in enumerate(codes):
            if code not in (None, 0) and first_failure is None:
                first_failure = (node, code)
                deadline = time.monotonic() + _GRACE_S
        if all(code is not None for code in codes):
            return first_failure
        if deadline is not None and time.monotonic() > deadline:
            for process in processes:
                _stop(process)
        time.sleep(0.2)
