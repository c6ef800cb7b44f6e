"""The SLURM backend: an sbatch script whose single step starts one torchrun agent per node.

SLURM only allocates the nodes and starts one task on each (`srun`, one task per node);
torch elastic does the rest. The c10d endpoint is the first node of `SLURM_JOB_NODELIST`
(`scontrol show hostnames`), at its `NodeAddr`, so that clusters whose node names are not
host names work too. The run directory must be on a file system the nodes share (as the
working directory and the interpreter are): the nodes write their logs there, and the
batch script, which runs on the master node, copies the artifacts there at the end.

`tml launch` follows the job by polling `squeue` (sbatch --wait polls slowly), then reads
its final state with `scontrol show job` (or `sacct`, or the exit code file the script
writes). Ctrl-C cancels the job.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from tml.launch.artifacts import refused_error
from tml.launch.common import (
    _WORKER_VARIABLES,
    log_tail,
    node_argv,
    torchrun_args,
    workflow_environment,
)
from tml.launch.runs import RunStopped
from tml.launch.workflow import LaunchError, LaunchFailedError, Workflow, memory_mebibytes

logger = logging.getLogger(__name__)

POLL_S = 0.5
_MAX_QUERY_ERRORS = 60
_TOOLS = ("sbatch", "squeue", "scontrol")


def check_tools() -> None:
    """sbatch, squeue and scontrol must be on PATH before anything is written or submitted."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise LaunchError(f"--backend slurm needs {', '.join(missing)} on PATH (run tml launch "
                          "on a SLURM login node, or use --dry-run to only write the script)")


# A partition name (the --partition option): SLURM's names are plain words.
PARTITION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_partition(partition: str | None) -> None:
    if partition is not None and not PARTITION.fullmatch(partition):
        raise LaunchError(f"--partition {partition!r} is not a SLURM partition name (letters, "
                          "digits, '_', '.', '-')")


def sbatch_directives(workflow: Workflow, partition: str | None) -> list[str]:
    """The `#SBATCH` options. Only validated words go here (names, numbers, times): sbatch
    reads these lines itself, not the shell, so paths go on the sbatch command line
    (`sbatch_command`) instead, where no parser splits them."""
    check_partition(partition)
    resources = workflow.resources
    lines = [f"--job-name={workflow.name}", f"--nodes={workflow.nodes}",
             "--ntasks-per-node=1"]
    if resources.cpu:
        lines.append(f"--cpus-per-task={resources.cpu}")
    if resources.memory:
        lines.append(f"--mem={memory_mebibytes(resources.memory)}M")
    if resources.gpu.count:
        kind = f"{resources.gpu.name}:" if resources.gpu.name else ""
        lines.append(f"--gres=gpu:{kind}{resources.gpu.count}")
    if resources.time:
        lines.append(f"--time={resources.time}")
    if resources.interruptible:
        # A requeued job starts again from the top; append, so each attempt's logs stay.
        lines += ["--requeue", "--open-mode=append"]
    else:
        lines.append("--no-requeue")
    if partition:
        lines.append(f"--partition={partition}")
    for line in lines:  # the model's checks, asserted where the lines are written
        if not re.fullmatch(r"--[a-z-]+(=[A-Za-z0-9_.:+-]+)?", line):
            raise LaunchError(f"internal: unexpected #SBATCH value {line!r}")
    return lines


def _filename_pattern(path: str) -> str:
    """A literal path for SLURM's --output, where % starts a replacement (%j, %n)."""
    return path.replace("%", "%%")


def sbatch_command(workflow: Workflow, run_dir: str, batch_path: str) -> list[str]:
    """The sbatch argv: paths as separate arguments, never parsed by a shell or by sbatch."""
    return ["sbatch", "--parsable", f"--chdir={workflow.working_path()}",
            f"--output={_filename_pattern(run_dir)}/logs/batch-%j.log", batch_path]


def _tml_root() -> str:
    """The directory holding this `tml` package, for the artifact copy on the master node."""
    import tml

    return os.path.dirname(os.path.dirname(os.path.abspath(tml.__file__)))


def render_scripts(workflow: Workflow, run_dir: str, partition: str | None = None,
                   install_requirements: bool = False) -> tuple[str, str]:
    """(batch script, node script) for this workflow, as written to `run_dir`.

    Every value from the workflow is either checked to be a plain word by the model (the
    name, times, GPU type, variable names) or written with `shlex.quote`; `before_run`
    alone is written as shell, since it is shell.
    """
    q = shlex.quote
    python = sys.executable
    if workflow.requirements_file is not None:
        # The run's environment, on the shared run directory (tml.launch.run_env).
        python = os.path.join(run_dir, "env", "bin", "python")
    node_script = os.path.join(run_dir, "node.sh")
    batch = ["#!/bin/bash"]
    batch += [f"#SBATCH {line}" for line in sbatch_directives(workflow, partition)]
    if workflow.resources.gpu.memory:
        batch.append(f"# gpu.memory {workflow.resources.gpu.memory}: SLURM has no standard "
                     "request for it; pick a partition or gres type that has it")
    batch += [
        f"# Written by tml launch for workflow {workflow.name}; submit with:",
        f"# {shlex.join(sbatch_command(workflow, run_dir, os.path.join(run_dir, 'job.sbatch')))}",
        "set -uo pipefail",
        f"RUN_DIR={q(run_dir)}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(scontrol show node -o "$head_node" | tr " " "\\n" '
        "| sed -n 's/^NodeAddr=//p')",
        'export TML_RDZV_ENDPOINT="${head_addr:-$head_node}:${TML_RDZV_PORT:-'
        '$((20000 + SLURM_JOB_ID % 20000))}"',
        f'export TML_RDZV_ID={q(workflow.name)}"-$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}"',
        'echo "tml: rendezvous at $TML_RDZV_ENDPOINT on $head_node"',
    ]
    if install_requirements and workflow.requirement_specs:
        batch.append(shlex.join([sys.executable, "-m", "pip", "install",
                                 *workflow.requirement_specs]) + " || exit 1")
    if workflow.requirements_file is not None:
        batch += ["# The requirements file, into the run's environment (shared by the nodes).",
                  f"PYTHONPATH={q(_tml_root())}${{PYTHONPATH:+:$PYTHONPATH}} "
                  + shlex.join([sys.executable, "-m", "tml.launch.run_env",
                                os.path.join(run_dir, "env"), workflow.working_path(),
                                workflow.requirements_file])
                  + ' >> "$RUN_DIR/logs/requirements.log" 2>&1 || '
                  '{ echo "tml: requirements failed, see logs/requirements.log"; '
                  'echo 1 > "$RUN_DIR/exit-code"; exit 1; }']
    node_log = _filename_pattern(run_dir) + "/logs/node-%n.log"
    batch += [
        'echo "tml: attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of job $SLURM_JOB_ID"',
        f"srun --nodes={workflow.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + ("--open-mode=append " if workflow.resources.interruptible else "") +
        f"--output={q(node_log)} bash {q(node_script)}",
        "code=$?",
    ]
    if workflow.artifacts:
        # On the master node, with tml's own checks (tml.launch.artifacts): no source
        # outside working_dir, no destination outside the run directory.
        batch += ["# Artifacts from the master node's working directory.",
                  f"PYTHONPATH={q(_tml_root())}${{PYTHONPATH:+:$PYTHONPATH}} "
                  + shlex.join([python, "-m", "tml.launch.artifacts", "--",
                                workflow.working_path(), run_dir, *workflow.artifacts])]
    batch += ['echo "$code" > "$RUN_DIR/exit-code"', 'exit "$code"', ""]

    command = torchrun_args(workflow, "$TML_RDZV_ENDPOINT", "$TML_RDZV_ID", "$is_host")
    # The shell must expand these three: quote them with double quotes instead.
    expand = {"$TML_RDZV_ENDPOINT", "$TML_RDZV_ID", "is_host=$is_host"}
    quoted = [f'"{c}"' if c in expand else q(c)
              for c in node_argv(workflow, python, command, _tml_root())]
    node = ["#!/bin/bash", "# One node of the job: its before_run, then its torchrun agent.",
            "set -euo pipefail", f"cd {q(workflow.working_path())}"]
    node += [f"export {key}={q(value)}" for key, value in workflow_environment(workflow).items()]
    node += ["export PYTHONUNBUFFERED=1",
             f'export PATH={q(os.path.dirname(python))}:"$PATH"',
             f"workers={workflow.nproc_per_node}",
             'cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}',
             "# The node's cores split between its workers, unless set.",
             'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / workers > 0 ? '
             'cpus / workers : 1 ))}',
             'echo "tml: node $SLURM_NODEID ($(hostname)), rendezvous $TML_RDZV_ENDPOINT"']
    node += list(workflow.before_run)
    node += ['is_host=0; if [ "$SLURM_NODEID" = 0 ]; then is_host=1; fi',
             "exec " + " ".join(quoted), ""]
    return "\n".join(batch), "\n".join(node)


def write_scripts(workflow: Workflow, run_dir: str, partition: str | None = None,
                  install_requirements: bool = False) -> str:
    """Write job.sbatch and node.sh into `run_dir`; returns the batch script's path."""
    batch, node = render_scripts(workflow, run_dir, partition, install_requirements)
    batch_path = os.path.join(run_dir, "job.sbatch")
    for path, text in ((batch_path, batch), (os.path.join(run_dir, "node.sh"), node)):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return batch_path


def _fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _final_state(job_id: str, run_dir: str, env: dict[str, str]) -> tuple[str, str]:
    """(state, exit code) of a job that left the queue: scontrol, else sacct, else the file."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env,
                           capture_output=True, text=True)
    fields = _fields(shown.stdout) if shown.returncode == 0 else {}
    if "JobState" in fields:
        return fields["JobState"], fields.get("ExitCode", "?")
    if shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
                              env=env, capture_output=True, text=True)
        line = acct.stdout.strip().splitlines()[:1]
        if acct.returncode == 0 and line and "|" in line[0]:
            state, code = line[0].split("|", 1)
            return state.split()[0], code
    try:
        with open(os.path.join(run_dir, "exit-code")) as f:
            code = f.read().strip()
        return ("COMPLETED" if code == "0" else "FAILED"), code
    except OSError:
        return "UNKNOWN", "?"


def submit_and_follow(workflow: Workflow, run_dir: str, batch_path: str,
                      on_submitted: Callable[[str], None] | None = None) -> None:
    """sbatch the script, poll until the job leaves the queue, raise if it did not complete."""
    env = {k: v for k, v in os.environ.items() if k not in _WORKER_VARIABLES}
    submitted = subprocess.run(sbatch_command(workflow, run_dir, batch_path), env=env,
                               capture_output=True, text=True)
    if submitted.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {submitted.stderr.strip() or 'no message'}"
                          f" (script: {batch_path})")
    job_id = submitted.stdout.strip().split(";")[0]
    with open(os.path.join(run_dir, "job-id"), "w") as f:
        f.write(job_id + "\n")
    if on_submitted is not None:
        on_submitted(job_id)
    logger.info("submitted SLURM job %s (%d node(s)); logs in %s", job_id, workflow.nodes,
                os.path.join(run_dir, "logs"))
    last = None
    errors = 0
    try:
        while True:
            queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env,
                                    capture_output=True, text=True)
            state = queued.stdout.strip()
            if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
                # slurmctld busy or restarting: the job has not left the queue for that.
                errors += 1
                if errors > _MAX_QUERY_ERRORS:
                    raise LaunchError(f"squeue keeps failing for job {job_id}: "
                                      f"{queued.stderr.strip()}")
                time.sleep(2 * POLL_S)
                continue
            errors = 0
            if not state:
                break
            if state != last:
                logger.info("job %s: %s", job_id, state)
                last = state
            time.sleep(POLL_S)
    except (KeyboardInterrupt, RunStopped):
        subprocess.run(["scancel", job_id], env=env, check=False)
        raise
    state, code = _final_state(job_id, run_dir, env)
    if state != "COMPLETED":
        logs = os.path.join(run_dir, "logs")
        for name in sorted(os.listdir(logs)):
            print(f"--- {name} (tail) ---\n{log_tail(os.path.join(logs, name))}",
                  file=sys.stderr)
        first = code.split(":")[0]
        raise LaunchFailedError(f"SLURM job {job_id} ended {state} (exit code {code}); "
                                f"logs in {logs}",
                                exit_code=int(first) if first.isdigit() else None)
    refused = refused_error(run_dir)
    if refused is not None:
        raise refused
    logger.info("job %s completed; artifacts and logs in %s", job_id, run_dir)
