"""Runs you can list, read and stop: `tml runs`, `tml logs RUN [--node N]`, `tml stop RUN`.

Every launch writes `<run-dir>/run.json` (name, backend, status, start, end, exit code,
the launcher's process id, the node agents' ids, the SLURM job id) when it starts and again
when it ends; the file is replaced atomically, so a reader sees one version or the other.

A RUN is named by its run id (`20261202-043000-a1b2c3`), by `NAME/RUN_ID`, or by a workflow
name alone (its newest run). A record that says `running` whose launcher is gone (checked
on the host that launched it) is shown as `lost` (the launcher was killed; the nodes may still be running, `tml stop` stops them).

`tml stop` on the local backend sends SIGTERM to the launcher, which stops its nodes (each
agent stops its workers), copies the artifacts there are and records `stopped`; if the
launcher is gone it stops the recorded agents itself. On SLURM it runs `scancel JOB` (the
launcher that follows the job then records `stopped`). A process id is signalled only if
its command line is still the one recorded (a recycled id is left alone).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from tml.common.atomic_file import write_json_atomic
from tml.launch.workflow import LaunchError, LaunchFailedError

RECORD = "run.json"
STOP_REQUESTED = "stop-requested"


class RunStopped(LaunchFailedError):
    """The run was stopped (`tml stop`, SIGTERM or Ctrl-C)."""


@dataclass
class RunRecord:
    """What `tml runs` shows of one run."""

    name: str
    run_id: str
    backend: str
    status: str  # running, done, failed, stopped, written (kubernetes), lost (when read)
    start: str
    run_dir: str
    end: str | None = None
    exit_code: int | None = None
    launcher_pid: int | None = None
    launcher_cmdline: str | None = None
    node_pids: list[int] = field(default_factory=list)
    node_cmdlines: list[str] = field(default_factory=list)
    job_id: str | None = None
    host: str | None = None  # where the launcher runs: process ids mean something there only


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmdline(pid: int) -> str | None:
    """The process's command line (NUL-separated words), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def write(record: RunRecord) -> None:
    path = os.path.join(record.run_dir, RECORD)
    write_json_atomic(path, asdict(record), indent=1, sort_keys=False)


def read(run_dir: str) -> RunRecord | None:
    """The record in `run_dir`, with `lost` for a running one whose launcher is gone."""
    try:
        with open(os.path.join(run_dir, RECORD)) as f:
            data = json.load(f)
        record = RunRecord(**{k: v for k, v in data.items()
                              if k in RunRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None
    record.run_dir = run_dir
    if record.status == "running" and _here(record) \
            and not _alive(record.launcher_pid, record.launcher_cmdline):
        record.status = "lost"
    return record


def _here(record: RunRecord) -> bool:
    """The launcher runs on this host (runs dirs may be shared between login nodes)."""
    return record.host in (None, socket.gethostname())


def _alive(pid: int | None, expected: str | None) -> bool:
    return pid is not None and expected is not None and cmdline(pid) == expected


@contextlib.contextmanager
def recorded(run_dir: str, name: str, run_id: str, backend: str) -> Iterator[RunRecord]:
    """Record the run as running, then as done, failed or stopped, whatever ends it.

    SIGTERM (what `tml stop` sends) is turned into RunStopped while the run lasts, so the
    backend stops its nodes and copies artifacts as on Ctrl-C.
    """
    pid = os.getpid()
    record = RunRecord(name=name, run_id=run_id, backend=backend, status="running",
                       start=now(), run_dir=run_dir, launcher_pid=pid,
                       launcher_cmdline=cmdline(pid), host=socket.gethostname())
    write(record)

    def stop(signum: int, frame: object) -> None:
        raise RunStopped(f"run {name}/{run_id} stopped (signal {signum}); logs and "
                         f"artifacts in {run_dir}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield record
    except (RunStopped, KeyboardInterrupt):
        _finish(record, "stopped", None)
        raise
    except LaunchFailedError as error:
        stopped = os.path.exists(os.path.join(run_dir, STOP_REQUESTED))
        _finish(record, "stopped" if stopped else "failed", getattr(error, "exit_code", None))
        if stopped:
            raise RunStopped(f"run {name}/{run_id} stopped; logs and artifacts in "
                             f"{run_dir}") from None
        raise
    except BaseException:
        _finish(record, "failed", None)
        raise
    else:
        _finish(record, "done", 0)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(record: RunRecord, status: str, exit_code: int | None) -> None:
    record.status, record.exit_code, record.end = status, exit_code, now()
    write(record)


def note_nodes(record: RunRecord, pids: list[int]) -> None:
    """Record the node agents (so that `tml stop` can stop them if the launcher is gone)."""
    record.node_pids = list(pids)
    record.node_cmdlines = [cmdline(pid) or "" for pid in pids]
    write(record)


def note_job(record: RunRecord, job_id: str) -> None:
    record.job_id = job_id
    write(record)


# --- finding runs ------------------------------------------------------------------------

def all_runs(runs_dir: str) -> list[RunRecord]:
    """Every recorded run under `runs_dir/<name>/<run-id>/`, oldest first."""
    found = []
    try:
        names = sorted(os.listdir(runs_dir))
    except OSError:
        return []
    for name in names:
        directory = os.path.join(runs_dir, name)
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        for run_id in sorted(os.listdir(directory)):
            record = read(os.path.join(directory, run_id))
            if record is not None:
                found.append(record)
    return sorted(found, key=lambda r: (r.start, r.run_id))


def find(runs_dir: str, run: str) -> RunRecord:
    """The run named `run`: a run id, NAME/RUN_ID, or a workflow name (its newest run)."""
    runs = all_runs(runs_dir)
    matches = [r for r in runs if run in (r.run_id, f"{r.name}/{r.run_id}")]
    if not matches:
        matches = [r for r in runs if r.name == run][-1:]
    if not matches:
        raise LaunchError(f"no run {run!r} in {os.path.abspath(runs_dir)} (tml runs lists "
                          "them)")
    if len(matches) > 1:
        raise LaunchError(f"run id {run!r} is ambiguous: write NAME/RUN_ID")
    return matches[0]


# --- the commands ------------------------------------------------------------------------

def table(runs_dir: str) -> str:
    """`tml runs`: one line per run."""
    rows = [("NAME", "RUN", "BACKEND", "STATUS", "START", "EXIT")]
    for r in all_runs(runs_dir):
        rows.append((r.name, r.run_id, r.backend, r.status, r.start,
                     "" if r.exit_code is None else str(r.exit_code)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def logs(runs_dir: str, run: str, node: int | None) -> str:
    """`tml logs`: one node's log, or every node's log under a header."""
    record = find(runs_dir, run)
    directory = os.path.join(record.run_dir, "logs")
    if node is not None:
        path = os.path.join(directory, f"node-{node}.log")
        if not os.path.isfile(path):
            have = sorted(n for n in os.listdir(directory) if n.startswith("node-")) \
                if os.path.isdir(directory) else []
            raise LaunchError(f"run {record.name}/{record.run_id} has no log of node {node} "
                              f"(logs: {', '.join(have) or 'none'})")
        with open(path, errors="replace") as f:
            return f.read()
    parts = []
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        with open(os.path.join(directory, name), errors="replace") as f:
            parts.append(f"==> {name} <==\n{f.read()}")
    return "\n".join(parts)


def follow(runs_dir: str, run: str, node: int | None, poll_s: float = 0.5) -> None:
    """`tml logs -f`: print the logs, then what is appended, until the run ends (as
    `tail -f` does, with a `==> file <==` header when the output switches files)."""
    record = find(runs_dir, run)
    directory = os.path.join(record.run_dir, "logs")
    offsets: dict[str, int] = {}
    last: str | None = None
    while True:
        current = read(record.run_dir)
        running = current is not None and current.status == "running"
        names = [f"node-{node}.log"] if node is not None else \
            sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for name in names:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    f.seek(offsets.get(name, 0))
                    chunk = f.read()
            except OSError:
                continue
            if not chunk:
                continue
            offsets[name] = offsets.get(name, 0) + len(chunk)
            if node is None and name != last:
                sys.stdout.write(f"\n==> {name} <==\n" if last else f"==> {name} <==\n")
            last = name
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not running:
            return
        time.sleep(poll_s)


def stop(runs_dir: str, run: str, wait_s: float = 60.0) -> RunRecord:
    """`tml stop`: stop a running run; returns its record once it has stopped."""
    record = find(runs_dir, run)
    if record.status not in ("running", "lost"):
        raise LaunchError(f"run {record.name}/{record.run_id} is not running (status "
                          f"{record.status})")
    if not _here(record) and not (record.backend == "slurm" and record.job_id):
        raise LaunchError(f"run {record.name}/{record.run_id} was launched on {record.host}; "
                          "run tml stop there")
    with open(os.path.join(record.run_dir, STOP_REQUESTED), "w") as f:
        f.write(now() + "\n")
    if record.backend == "slurm" and record.job_id:
        subprocess.run(["scancel", record.job_id], check=False)
    elif record.status == "running" and record.launcher_pid is not None:
        os.kill(record.launcher_pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    current: RunRecord | None = record
    while record.status == "running" and time.monotonic() < deadline:
        current = read(record.run_dir)
        if current is None or current.status != "running":
            break
        time.sleep(0.2)
    else:
        if record.status == "running":
            raise LaunchError(f"run {record.name}/{record.run_id} did not stop within "
                              f"{wait_s:g} s")
    if current is not None and current.status == "lost":
        # The launcher is gone (or went without recording): stop its agents here.
        _stop_nodes(current)
        current.status, current.end = "stopped", now()
        write(current)
    return current or record


def _stop_nodes(record: RunRecord) -> None:
    """SIGTERM the recorded agents that are still the recorded processes."""
    for pid, expected in zip(record.node_pids, record.node_cmdlines):
        if _alive(pid, expected):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def print_lines(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
