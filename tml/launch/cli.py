"""`tml launch WORKFLOW [--backend local|slurm|kubernetes] [--dry-run]`.

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
from tml.launch import kubernetes, local, slurm
from tml.launch.common import make_run_dir, new_run_id, run_dir_path
from tml.launch.workflow import (
    LaunchError,
    Workflow,
    check_local_files,
    check_local_gpus,
    check_python_version,
    load_workflow,
    missing_requirements,
)
from tml.ml_logging import setup_logging

logger = logging.getLogger(__name__)

BACKENDS = ("local", "slurm", "kubernetes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml", description="tml command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser(
        "launch", help="run a torchrun workflow", description=__doc__.split("\n\n")[0])
    launch.add_argument("workflow", help="workflow YAML file")
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
    return parser


def _check_requirements(workflow: Workflow, source: str, install: bool) -> None:
    missing = missing_requirements(workflow.requirements)
    if missing and not install:
        raise LaunchError(f"{source}: requirements not installed: {', '.join(missing)} "
                          "(pass --install-requirements to pip install them)")


def _install_requirements(workflow: Workflow) -> None:
    if not workflow.requirements:
        return
    logger.info("installing requirements: %s", " ".join(workflow.requirements))
    result = subprocess.run([sys.executable, "-m", "pip", "install", *workflow.requirements])
    if result.returncode != 0:
        raise LaunchError(f"pip install {' '.join(workflow.requirements)} failed "
                          f"(exit code {result.returncode})")


def launch(args: argparse.Namespace) -> str | None:
    """Check, then run or write the workflow; returns the run directory (None on dry runs)."""
    source = args.workflow
    workflow = load_workflow(source)
    run_id = new_run_id()

    if args.backend == "kubernetes":
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
        print(path)
        logger.info("wrote %s; submit it with: kubectl apply -f %s", path, path)
        return run_dir

    check_python_version(workflow, source)
    check_local_files(workflow, source)
    if args.backend == "local":
        check_local_gpus(workflow, source)
    elif not args.dry_run:
        slurm.check_tools()
    if not args.dry_run:
        _check_requirements(workflow, source, args.install_requirements)

    if args.backend == "local":
        if args.dry_run:
            print(local.plan(workflow, run_id).render())
            return None
        if args.install_requirements:
            _install_requirements(workflow)
        run_dir = make_run_dir(args.runs_dir, workflow, run_id)
        local.run(workflow, run_dir, run_id)
        return run_dir

    slurm.check_partition(args.partition)
    run_dir = run_dir_path(args.runs_dir, workflow, run_id)
    if args.dry_run:
        batch, node = slurm.render_scripts(workflow, run_dir, args.partition,
                                           args.install_requirements)
        print(f"# {run_dir}/job.sbatch\n{batch}\n# {run_dir}/node.sh\n{node}", end="")
        return None
    make_run_dir(args.runs_dir, workflow, run_id)
    batch_path = slurm.write_scripts(workflow, run_dir, args.partition,
                                     args.install_requirements)
    slurm.submit_and_follow(workflow, run_dir, batch_path)
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Console script `tml`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    def run() -> None:
        run_dir = launch(args)
        if run_dir is not None and args.backend != "kubernetes":
            print(run_dir)

    run_cli(run)


if __name__ == "__main__":
    main()
