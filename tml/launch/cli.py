"""`tml launch WORKFLOW [--backend local|slurm|kubernetes] [--dry-run]`.

WORKFLOW is a workflow file, or the name of a workflow in `.dstack/workflows.yaml` (or in
`--file F`), as dstack's torchrun provider writes them; see `tml.launch.workflows_file`.

Everything a user can get wrong (the workflow file, the Python version, GPUs this machine
lacks, a missing sbatch, missing requirements) is checked before anything starts, and
reported as one `error: ...` line with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from tml.common.cli import run_cli
from tml.launch import kubernetes, local, run_command, run_env, runs, slurm
from tml.launch.artifacts import ArtifactRefused, copy_one
from tml.launch.common import make_run_dir, new_run_id, run_dir_path
from tml.launch.workflow import (
    LATEST,
    LaunchError,
    LaunchFailedError,
    Workflow,
    check_local_files,
    check_local_gpus,
    check_python_version,
    missing_requirements,
    split_dep,
)
from tml.launch.workflows_file import Selected, load_selected, resolve_target
from tml.ml_logging import setup_logging

logger = logging.getLogger(__name__)

BACKENDS = ("local", "slurm", "kubernetes")


def build_parser() -> argparse.ArgumentParser:
    import tml

    parser = argparse.ArgumentParser(prog="tml", description="tml command line.")
    parser.add_argument("--version", action="version", version=f"tml {tml.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser(
        "launch", help="run a torchrun workflow", description=__doc__.split("\n\n")[0])
    launch.add_argument("workflow", nargs="?", default=None,
                        help="a workflow file, or the name of a workflow in --file or in "
                        ".dstack/workflows.yaml")
    launch.add_argument("--file", "-f", default=None,
                        help="the workflows file (a workflows: list, as dstack writes it)")
    launch.add_argument("--workflow", dest="workflow_name", default=None,
                        help="the workflow of --file to run")
    launch.add_argument("--backend", choices=BACKENDS, default="local",
                        help="where the nodes run (default: local)")
    launch.add_argument("--dry-run", action="store_true",
                        help="print what would run (commands, sbatch script, manifest); "
                        "start nothing")
    launch.add_argument("--runs-dir", default="runs",
                        help="runs go to RUNS_DIR/<name>/<run-id>/ (default: runs)")
    launch.add_argument("--install-requirements", action="store_true",
                        help="pip install the workflow's requirements into the active "
                        "environment first")
    launch.add_argument("--partition", default=None, help="slurm: the partition")
    launch.add_argument("--image", default=kubernetes.DEFAULT_IMAGE,
                        help="kubernetes: the container image with tml and the code")
    launch.add_argument("--workdir", default=None,
                        help="kubernetes: working directory in the container "
                        "(default: the image's)")
    launch.add_argument("--python", default="python",
                        help="kubernetes: the interpreter in the image (default: python)")
    listing = commands.add_parser("runs", help="list the runs (name, backend, status, start, "
                                  "exit code)")
    logs = commands.add_parser("logs", help="print a run's node logs")
    logs.add_argument("run", help="run id, NAME/RUN_ID, or a workflow name (its newest run)")
    logs.add_argument("--node", type=int, default=None, help="only this node's log")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing what the nodes write until the run ends")
    stop = commands.add_parser("stop", help="stop a running run")
    stop.add_argument("run", help="run id, NAME/RUN_ID, or a workflow name (its newest run)")
    for sub in (listing, logs, stop):
        sub.add_argument("--runs-dir", default="runs", help="where the runs are (default: "
                         "runs)")
    report = commands.add_parser("report", help="draw a run's loss and evaluation curves "
                                 "to a PNG and print its summary (from SAVE_DIR/metrics.jsonl)")
    report.add_argument("save_dir", help="the run's save_dir")
    report.add_argument("--out", default=None, help="the PNG (default: SAVE_DIR/report.png)")
    run = commands.add_parser(
        "run", help="run a script with torchrun, without a workflow file",
        description="tml run torchrun FILE [ARGS] --nnodes N --gpu N -r REQS -e KEY=VALUE "
        "-a PATH (tml run torchrun --help: every option)", add_help=False)
    run.add_argument("provider", help="torchrun")
    run.add_argument("words", nargs=argparse.REMAINDER, help="FILE, its arguments, options")
    return parser


def _check_requirements(workflow: Workflow, source: str, install: bool) -> None:
    missing = missing_requirements(workflow.requirement_specs)
    if missing and not install:
        raise LaunchError(f"{source}: requirements not installed: {', '.join(missing)} "
                          "(pass --install-requirements to pip install them)")


def _install_requirements(workflow: Workflow) -> None:
    specs = workflow.requirement_specs
    if not specs:
        return
    logger.info("installing requirements: %s", " ".join(specs))
    result = subprocess.run([sys.executable, "-m", "pip", "install", *specs])
    if result.returncode != 0:
        raise LaunchError(f"pip install {' '.join(specs)} failed "
                          f"(exit code {result.returncode})")


def _source(selected: Selected, workflow: Workflow) -> str:
    """How errors name a workflow: its file, and its name when the file lists several."""
    if selected.path == run_command.SOURCE:
        return run_command.SOURCE
    listed = len(selected.runs) > 1 or selected.workflow.provider is not None
    return f"{selected.path}: workflow {workflow.name}" if listed else selected.path


def select(args: argparse.Namespace) -> Selected:
    """The workflow the command line names, with its dependencies (validated)."""
    path, name = resolve_target(args.workflow, args.file, args.workflow_name)
    return load_selected(path, name)


def _pass_artifacts(dep: Workflow, dep_run_dir: str, workflow: Workflow) -> None:
    """Copy a finished dependency's artifacts into `workflow`'s working_dir (same checks
    as every artifact copy: nothing read or written outside the two roots)."""
    if os.path.realpath(dep.working_path()) == os.path.realpath(workflow.working_path()):
        return  # the dependency wrote them right there
    source = os.path.join(dep_run_dir, "artifacts")
    for artifact in dep.artifacts:
        try:
            found = copy_one(source, artifact, workflow.working_path())
        except ArtifactRefused as error:
            raise LaunchError(f"workflow {workflow.name}: deps: {dep.name}: {error}") from None
        if not found:
            logger.warning("dependency %s did not produce artifact %s", dep.name, artifact)


def _latest_finished(runs_dir: str, name: str, source: str) -> str:
    """The run directory of `name`'s newest run that finished with exit code 0."""
    finished = [r for r in runs.all_runs(runs_dir) if r.name == name and r.status == "done"]
    if not finished:
        raise LaunchError(f"{source}: deps: {name}:{LATEST}: no finished run of "
                          f"{name} in {os.path.abspath(runs_dir)} (launch {name} first, or "
                          f"write {name} without :{LATEST} to run it before)")
    newest = finished[-1]
    # Where it is now (the record may hold the path as written then, relative to elsewhere).
    return os.path.join(os.path.abspath(runs_dir), newest.name, newest.run_id)


def launch(args: argparse.Namespace, selected: Selected | None = None) -> str | None:
    """Check, then run or write the workflow (after its deps); returns the run directory of
    the chosen workflow (None on dry runs). `selected`: given by `tml run`."""
    if selected is None:
        selected = select(args)
    if args.backend == "kubernetes":
        if len(selected.runs) > 1 or selected.reused:
            raise LaunchError(f"{_source(selected, selected.workflow)}: deps: --backend "
                              "kubernetes writes one PyTorchJob; run the dependencies first")
        return _kubernetes(args, selected.workflow)

    args.sources = {w.name: _source(selected, w) for w in selected.runs}
    for workflow in selected.runs:  # everything is checked before anything starts
        source = args.sources[workflow.name]
        check_python_version(workflow, source)
        check_local_files(workflow, source)
        if args.backend == "local":
            check_local_gpus(workflow, source)
        if workflow.requirements_file is not None:
            run_env.read_requirements(workflow.working_path(), workflow.requirements_file,
                                      source)
        if not args.dry_run:
            _check_requirements(workflow, source, args.install_requirements)
    # NAME:latest deps: their newest finished runs, found before anything starts.
    run_dirs: dict[str, str] = {}
    for workflow in selected.runs:
        for name, tag in map(split_dep, workflow.deps):
            if tag is not None and name not in run_dirs:
                run_dirs[name] = _latest_finished(args.runs_dir, name,
                                                  args.sources[workflow.name])
    if args.backend == "slurm":
        if not args.dry_run:
            slurm.check_tools()
        slurm.check_partition(args.partition)

    if args.dry_run:
        for workflow in selected.runs:
            if len(selected.runs) > 1:
                print(f"# workflow {workflow.name}")
            _dry_run(args, workflow)
        return None

    for workflow in selected.runs:
        for written in workflow.deps:
            dep, tag = split_dep(written)
            dep_workflow = selected.reused[dep] if tag is not None else \
                next(w for w in selected.runs if w.name == dep)
            _pass_artifacts(dep_workflow, run_dirs[dep], workflow)
        try:
            run_dirs[workflow.name] = _run_one(args, workflow)
        except LaunchFailedError as error:
            if workflow is selected.workflow:
                raise
            raise LaunchFailedError(f"dependency {workflow.name} of {selected.workflow.name} "
                                    f"failed, {selected.workflow.name} not started: {error}") \
                from None
        if workflow.deps:
            with open(os.path.join(run_dirs[workflow.name], "deps"), "w") as f:
                f.write("".join(f"{dep} {run_dirs[split_dep(dep)[0]]}\n"
                                for dep in workflow.deps))
        if workflow is not selected.workflow:
            logger.info("dependency %s finished: %s", workflow.name, run_dirs[workflow.name])
    return run_dirs[selected.workflow.name]


def _kubernetes(args: argparse.Namespace, workflow: Workflow) -> str | None:
    run_id = new_run_id()
    text = kubernetes.render(workflow, run_id, image=args.image, python=args.python,
                             workdir=args.workdir,
                             install_requirements=args.install_requirements)
    if args.dry_run:
        print(text, end="")
        return None
    run_dir = make_run_dir(args.runs_dir, workflow, run_id)
    path = os.path.join(run_dir, "pytorchjob.yaml")
    with open(path, "w") as f:
        f.write(text)
    runs.write(runs.RunRecord(name=workflow.name, run_id=run_id, backend="kubernetes",
                              status="written", start=runs.now(), run_dir=run_dir))
    print(path)
    logger.info("wrote %s; submit it with: kubectl apply -f %s", path, path)
    return run_dir


def _dry_run(args: argparse.Namespace, workflow: Workflow) -> None:
    run_id = new_run_id()
    if args.backend == "local":
        print(local.plan(workflow, run_id).render())
        return
    run_dir = run_dir_path(args.runs_dir, workflow, run_id)
    batch, node = slurm.render_scripts(workflow, run_dir, args.partition,
                                       args.install_requirements)
    print(f"# {run_dir}/job.sbatch\n{batch}\n# {run_dir}/node.sh\n{node}", end="")


def _run_one(args: argparse.Namespace, workflow: Workflow) -> str:
    run_id = new_run_id()
    run_dir = make_run_dir(args.runs_dir, workflow, run_id)
    with runs.recorded(run_dir, workflow.name, run_id, args.backend) as record:
        if args.backend == "local":
            if args.install_requirements:
                _install_requirements(workflow)
            local.run(workflow, run_dir, run_id, source=args.sources[workflow.name],
                      on_started=lambda pids: runs.note_nodes(record, pids))
            return run_dir
        batch_path = slurm.write_scripts(workflow, run_dir, args.partition,
                                         args.install_requirements)
        slurm.submit_and_follow(workflow, run_dir, batch_path,
                                on_submitted=lambda job: runs.note_job(record, job))
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Console script `tml`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    def run() -> None:
        if args.command == "runs":
            runs.print_lines(runs.table(args.runs_dir))
            return
        if args.command == "logs":
            if args.follow:
                runs.follow(args.runs_dir, args.run, args.node)
            else:
                runs.print_lines(runs.logs(args.runs_dir, args.run, args.node))
            return
        if args.command == "report":
            from tml.core.run_report import write_report

            path, table = write_report(args.save_dir, args.out)
            print("\n".join(table))
            print(f"curves: {path}")
            return
        if args.command == "stop":
            record = runs.stop(args.runs_dir, args.run)
            print(f"{record.name}/{record.run_id}: {record.status}")
            return
        selected = None
        if args.command == "run":
            if args.provider != "torchrun":
                raise LaunchError(f"tml run {args.provider}: unknown provider (tml runs "
                                  "torchrun)")
            options, selected = run_command.parse(args.words)
            vars(args).update(vars(options))
        run_dir = launch(args, selected)
        if run_dir is not None and args.backend != "kubernetes":
            print(run_dir)

    run_cli(run)


if __name__ == "__main__":
    main()
