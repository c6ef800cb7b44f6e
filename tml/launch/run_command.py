"""`tml run torchrun FILE [ARGS] --nnodes N --gpu N -r REQS -e KEY=VALUE -a PATH`.

Options as dstack's provider names them (--nnodes, --gpu, --gpu-name, --gpu-memory, --cpu,
--memory, --shm-size, -r, -e, -a, --working-dir), plus tml's own.

dstack's command-line form of a torchrun workflow, without a workflow file. The options
build the same mapping a workflow file holds and go through the same `Workflow` model, so
every check of a file (environment names, artifact paths, the requirements file, sizes)
applies here too, with errors naming `tml run torchrun` and the field.

tml's options may stand anywhere; every other word after FILE is an argument of the
script, passed as one argv word each (never through a shell). Write a script argument that
is also one of tml's options after `--`: `tml run torchrun train.py --nnodes 2 -- -e x`.
"""

from __future__ import annotations

import argparse
import os
import re

from tml.core.config.config_load import parse_config
from tml.launch import kubernetes
from tml.launch.workflow import LaunchError, Workflow
from tml.launch.workflows_file import Selected

SOURCE = "tml run torchrun"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tml run torchrun", description=__doc__.split("\n\n")[0],
        usage="tml run torchrun FILE [ARGS ...] [options] [-- ARGS ...]")
    add = parser.add_argument
    add("--nnodes", default=None, help="nodes (torch elastic agents; default 1)")
    add("--gpu", default=None, help="GPUs per node (workers per node; default 0: one CPU "
        "worker)")
    add("--gpu-name", default=None, help="GPU type, e.g. a100")
    add("--gpu-memory", default=None, help="least memory per GPU, e.g. 40GB")
    add("--cpu", default=None, help="CPU cores per node")
    add("--memory", default=None, help="memory per node, e.g. 16GB")
    add("--shm-size", default=None, help="shared memory per node, e.g. 2GB")
    add("--interruptible", action="store_true", help="may be preempted and requeued")
    add("-r", "--requirements", default=None, help="requirements file, installed into the "
        "run's environment")
    add("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
        help="environment variable of every node (repeat)")
    add("-a", "--artifact", action="append", default=[], metavar="PATH",
        help="artifact path, relative to the working directory (repeat)")
    add("--before-run", action="append", default=[], metavar="COMMAND",
        help="shell command run on every node first (repeat)")
    add("--name", default=None, help="run name (default: from FILE)")
    add("--working-dir", default=".", help="directory the nodes run in (default: here)")
    add("--backend", choices=("local", "slurm", "kubernetes"), default="local")
    add("--dry-run", action="store_true", help="print what would run; start nothing")
    add("--runs-dir", default="runs")
    add("--install-requirements", action="store_true")
    add("--partition", default=None)
    add("--image", default=kubernetes.DEFAULT_IMAGE)
    add("--workdir", default=None)
    add("--python", default="python")
    return parser


def _split(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], str | None,
                                                                       list[str]]:
    """(tml's option words, FILE, the script's words)."""
    takes_value = {}
    for action in parser._actions:
        for flag in action.option_strings:
            takes_value[flag] = action.nargs != 0
    options: list[str] = []
    file: str | None = None
    script: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest = words[i + 1:]
            if file is None and rest:
                file, rest = rest[0], rest[1:]
            script += rest
            break
        flag = word.split("=", 1)[0]
        if flag in takes_value:
            options.append(word)
            if takes_value[flag] and "=" not in word:
                if i + 1 >= len(words):
                    raise LaunchError(f"{SOURCE}: {word} needs a value")
                options.append(words[i + 1])
                i += 1
        elif file is None:
            if word.startswith("-"):
                raise LaunchError(f"{SOURCE}: {word}: unknown option before FILE "
                                  "(tml run torchrun --help lists them)")
            file = word
        else:
            script.append(word)
        i += 1
    return options, file, script


def _default_name(file: str) -> str:
    stem = os.path.splitext(os.path.basename(file))[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", stem)[:64] or "run"
    return name if re.match(r"[A-Za-z_]", name) else f"run-{name}"[:64]


def parse(words: list[str]) -> tuple[argparse.Namespace, Selected]:
    """The launch options and the workflow these words describe (validated)."""
    if words[:1] in (["-h"], ["--help"]):
        build_parser().print_help()
        raise SystemExit(0)
    parser = build_parser()
    options, file, script = _split(parser, words)
    if file is None:
        raise LaunchError(f"{SOURCE}: FILE is missing (tml run torchrun train.py ...)")
    args = parser.parse_args(options)
    raw: dict[str, object] = {"name": args.name or _default_name(file), "provider": "torchrun",
                              "file": file, "args": script, "working_dir": args.working_dir}
    if args.nnodes is not None:
        raw["nodes"] = args.nnodes
    resources: dict[str, object] = {}
    if args.gpu is not None or args.gpu_name is not None or args.gpu_memory is not None:
        resources["gpu"] = {"count": args.gpu or 0,
                            **({"name": args.gpu_name} if args.gpu_name else {}),
                            **({"memory": args.gpu_memory} if args.gpu_memory else {})}
    for field in ("cpu", "memory", "shm_size"):
        if getattr(args, field) is not None:
            resources[field] = getattr(args, field)
    if args.interruptible:
        resources["interruptible"] = True
    if resources:
        raw["resources"] = resources
    if args.requirements is not None:
        raw["requirements"] = args.requirements
    if args.env:
        raw["environment"] = args.env
    if args.artifact:
        raw["artifacts"] = args.artifact
    if args.before_run:
        raw["before_run"] = args.before_run
    workflow = parse_config(Workflow, raw, source=SOURCE)
    # What `tml launch` reads from its own parser.
    args.workflow = args.file = args.workflow_name = None
    return args, Selected(SOURCE, [workflow])
