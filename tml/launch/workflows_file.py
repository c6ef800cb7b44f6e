"""Workflow files as dstack writes them: a `workflows:` list, one entry chosen by name.

dstack keeps a repository's workflows in `.dstack/workflows.yaml`:

    workflows:
      - name: train
        provider: torchrun
        file: train.py
        deps: [prepare]

`tml launch train` reads that file in the current directory (as `dstack run train` does),
`tml launch --file F --workflow NAME` reads another one, and a file holding one workflow
at its top level (tml's own form) is still read as it always was. Every entry that runs
(the chosen one and its `deps`) goes through the same `Workflow` model, so each error is
one line naming the file, the workflow and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tml.common.safe_paths import check_name
from tml.core.config.config_load import parse_config, read_config_data
from tml.errors import ConfigError
from tml.launch.workflow import LaunchError, Workflow, split_dep

DSTACK_FILE = os.path.join(".dstack", "workflows.yaml")


@dataclass
class Selected:
    """The workflow to run and the ones it depends on, in the order they run."""

    path: str
    runs: list[Workflow]  # dependencies first, the chosen workflow last
    # Workflows named as `NAME:latest` deps: not run, their newest finished run's artifacts
    # are copied (by name).
    reused: dict[str, Workflow] = field(default_factory=dict)

    @property
    def workflow(self) -> Workflow:
        return self.runs[-1]


def resolve_target(target: str | None, file: str | None, name: str | None) -> tuple[str, str | None]:
    """(workflow file, workflow name or None) from `tml launch [TARGET] [--file] [--workflow]`.

    TARGET is a file if one exists at that path, else the name of a workflow in
    `--file` or, as dstack does, in `.dstack/workflows.yaml` of the current directory.
    """
    if file is not None:
        if target is not None and name is not None and target != name:
            raise LaunchError(f"two workflow names: {target!r} and --workflow {name!r}")
        return file, name or target
    if target is not None and os.path.isfile(target):
        return target, name
    wanted = name or target
    if wanted is None:
        raise LaunchError("name a workflow (looked up in .dstack/workflows.yaml) or a "
                          "workflow file, or pass --file F --workflow NAME")
    if target is not None and name is not None and target != name:
        raise LaunchError(f"workflow file not found: {target}")
    if not os.path.isfile(DSTACK_FILE):
        looks_like_path = os.sep in wanted or wanted.endswith((".yaml", ".yml"))
        raise LaunchError(f"workflow file not found: {wanted}" if looks_like_path else
                          f"no workflow file {wanted!r} and no {DSTACK_FILE} in "
                          f"{os.getcwd()} to find a workflow named {wanted!r} in")
    return DSTACK_FILE, wanted


def _entries(path: str, data: dict) -> dict[str, dict]:
    """The `workflows:` list as {name: raw entry}; shape errors in one line."""
    extra = sorted(str(k) for k in data if k != "workflows")
    if extra:
        raise ConfigError(f"{path}: {extra[0]}: unknown field (a workflows file holds only "
                          "workflows:)")
    items = data["workflows"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: workflows: expected a list of workflows")
    entries: dict[str, dict] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: workflows.{i}: expected a mapping (name, provider, "
                              "file, ...)")
        name = item.get("name")
        if not isinstance(name, str):
            problem = "Field required" if name is None else f"{name!r} is not a name"
            raise ConfigError(f"{path}: workflows.{i}: name: {problem}")
        check_name(name, f"{path}: workflows.{i}: name: workflow name", error=ConfigError)
        if name in entries:
            raise ConfigError(f"{path}: workflows.{i}: name: workflow {name!r} is defined "
                              "twice")
        entries[name] = item
    return entries


def _validate(path: str, name: str, raw: dict, listed: bool) -> Workflow:
    source = f"{path}: workflow {name}"
    if listed and "provider" not in raw:
        raise ConfigError(f"{source}: provider: Field required (tml launch runs "
                          "provider: torchrun)")
    return parse_config(Workflow, raw, source=source)


def load_selected(path: str, name: str | None) -> Selected:
    """Read `path` and validate the chosen workflow and everything it depends on."""
    if not os.path.isfile(path):
        raise LaunchError(f"workflow file not found: {path}")
    data = read_config_data(path)
    if "workflows" not in data:
        # tml's single-workflow file.
        workflow = parse_config(Workflow, data, source=path)
        if name is not None and name != workflow.name:
            raise LaunchError(f"{path}: no workflow named {name!r} (the file holds one "
                              f"workflow, {workflow.name!r})")
        if workflow.deps:
            raise ConfigError(f"{path}: workflow {workflow.name}: deps: a file with one "
                              "workflow has no other workflows to depend on (use a "
                              "workflows: list)")
        return Selected(path, [workflow])

    entries = _entries(path, data)
    if name is None:
        if len(entries) != 1:
            raise LaunchError(f"{path} holds {len(entries)} workflows "
                              f"({', '.join(entries)}): choose one by name, e.g. "
                              f"tml launch --file {path} --workflow {next(iter(entries))}")
        name = next(iter(entries))
    if name not in entries:
        raise LaunchError(f"{path}: no workflow named {name!r} (workflows: "
                          f"{', '.join(entries)})")

    order: list[Workflow] = []
    done: set[str] = set()
    reused: dict[str, Workflow] = {}

    def visit(current: str, chain: list[str]) -> None:
        if current in done:
            return
        workflow = _validate(path, current, entries[current], listed=True)
        for written in workflow.deps:
            dep, tag = split_dep(written)
            if tag is not None:   # NAME:latest: nothing runs; its artifacts list is needed
                if dep not in entries:
                    raise ConfigError(f"{path}: workflow {current}: deps: no workflow named "
                                      f"{dep!r} in this file")
                reused[dep] = _validate(path, dep, entries[dep], listed=True)
                continue
            if dep in chain or dep == current:
                loop = chain[chain.index(dep):] if dep in chain else []
                cycle = " -> ".join([*loop, current, dep])
                raise ConfigError(f"{path}: workflow {current}: deps: a cycle ({cycle})")
            if dep not in entries:
                raise ConfigError(f"{path}: workflow {current}: deps: no workflow named "
                                  f"{dep!r} in this file")
            visit(dep, [*chain, current])
        done.add(current)
        order.append(workflow)

    visit(name, [])
    return Selected(path, order, reused)
