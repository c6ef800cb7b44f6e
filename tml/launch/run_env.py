"""A Python environment per run, for a workflow's `requirements: requirements.txt`.

dstack installs a workflow's requirements file on every node before the run. Installing
into the user's own environment would change it for every later run (and for the user),
so each run gets `<run-dir>/env`: a virtual environment that sees the launcher's packages
(torch, tml, ...) through a `.pth` file, with the requirements installed into it. The
nodes run `<run-dir>/env/bin/python`; packages the requirements add or upgrade live in
the run's environment only (pip does not uninstall anything outside it).

The file is read here, not by pip: every line must be a pip requirement (`torch>=2.1`,
`name @ https://...`) or a local path inside working_dir (`./pkg`, `dist/x.whl`), the same
rule as the list form of `requirements`. pip options (`--index-url`, `-e`, `-r other`) are
refused; set an index with `environment: {PIP_INDEX_URL: ...}`, which pip reads.

The SLURM batch script runs `python -m tml.launch.run_env ENV WORKING_DIR FILE` once on the
master node (the run directory is shared); the Kubernetes pods run it in their container.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import site
import subprocess
import sys

from tml.common.safe_paths import confine
from tml.launch.workflow import LaunchError, Workflow, no_control_characters

logger = logging.getLogger(__name__)

ENV_DIR = "env"
_COMMENT = re.compile(r"(^|\s)#.*$")  # as pip strips comments
_ARCHIVES = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) without comments and blanks; `\\` continues a line, as for pip."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        line = _COMMENT.sub("", raw)
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def _is_path(line: str) -> bool:
    if line.startswith(("./", "../", "/", "~", ".\\")) or line in (".", ".."):
        return True
    return "@" not in line and ("/" in line or line.endswith(_ARCHIVES))


def read_requirements(working_dir: str, relative: str, source: str) -> list[str]:
    """The checked lines of the requirements file, local paths made absolute (confined to
    working_dir). Raises LaunchError naming the file and line."""
    from packaging.requirements import InvalidRequirement, Requirement

    what = f"{source}: requirements"
    path = confine(working_dir, relative, f"{what}: file", error=LaunchError)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LaunchError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LaunchError(f"{what}: cannot read {path}: {error}") from None
    checked = []
    for number, line in _logical_lines(text):
        where = f"{what}: {relative} line {number}"
        try:
            no_control_characters(line)
        except ValueError as error:
            raise LaunchError(f"{where}: {error}") from None
        if line.startswith("-"):
            raise LaunchError(f"{where}: {line!r}: pip options are not allowed in a workflow's "
                              "requirements (set PIP_INDEX_URL and the like in environment)")
        if _is_path(line):
            checked.append(os.path.normpath(confine(working_dir, line, f"{where}: local path",
                                                    error=LaunchError)))
            continue
        try:
            Requirement(line)
        except InvalidRequirement:
            raise LaunchError(f"{where}: {line!r} is not a pip requirement or a local path") \
                from None
        checked.append(line)
    return checked


def launcher_site_paths() -> list[str]:
    """Where this interpreter's packages are (its environment's site-packages)."""
    paths = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        paths.append(site.getusersitepackages())
    return [p for p in paths if os.path.isdir(p)]


def env_python(env_dir: str) -> str:
    return os.path.join(env_dir, "bin", "python")


def create(env_dir: str) -> str:
    """A virtual environment at `env_dir` that sees this interpreter's packages; returns
    its python. No pip of its own: the launcher's pip is visible through the `.pth`."""
    result = subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                             "--system-site-packages", env_dir], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"cannot create the run's environment {env_dir}: "
                          f"{' '.join(result.stderr.split())[-300:]}")
    python = env_python(env_dir)
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True)
    if own.returncode != 0 or not os.path.isdir(own.stdout.strip()):
        raise LaunchError(f"the run's environment {env_dir} does not start: "
                          f"{' '.join(own.stderr.split())[-300:]}")
    with open(os.path.join(own.stdout.strip(), "_tml_launcher.pth"), "w") as f:
        f.write("".join(p + "\n" for p in launcher_site_paths()))
    return python


def install(env_dir: str, requirements: list[str], cwd: str, env: dict[str, str],
            log: str | None = None) -> str:
    """Create the run's environment and pip install `requirements` (checked lines) into it."""
    python = create(env_dir)
    if not requirements:
        return python
    logger.info("installing %d requirement(s) into %s", len(requirements), env_dir)
    command = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
               "--no-warn-script-location", *requirements]
    env = {k: v for k, v in env.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    if log is None:
        result = subprocess.run(command, cwd=cwd, env=env)
    else:
        with open(log, "a") as f:
            result = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise LaunchError(f"pip install of the requirements into {env_dir} failed (exit code "
                          f"{result.returncode}){where}")
    return python


def prepare(workflow: Workflow, run_dir: str, source: str, env: dict[str, str]) -> str:
    """The run's python: `run_dir/env/bin/python` with the requirements file installed."""
    assert workflow.requirements_file is not None
    requirements = read_requirements(workflow.working_path(), workflow.requirements_file,
                                     source)
    return install(os.path.join(run_dir, ENV_DIR), requirements, workflow.working_path(), env,
                   log=os.path.join(run_dir, "logs", "requirements.log"))


def main(argv: list[str] | None = None) -> None:
    """`python -m tml.launch.run_env ENV_DIR WORKING_DIR REQUIREMENTS_FILE` (SLURM, pods)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env_dir")
    parser.add_argument("working_dir")
    parser.add_argument("requirements_file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tml: %(message)s")
    try:
        requirements = read_requirements(args.working_dir, args.requirements_file,
                                         args.requirements_file)
        install(args.env_dir, requirements, args.working_dir, dict(os.environ))
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
