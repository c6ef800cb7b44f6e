"""The workflow file: what to run with torchrun, on how many nodes, with what resources.

A workflow is declarative so that the same file runs on this machine, on a SLURM cluster
and as a Kubernetes `PyTorchJob`; the backends only translate it. Loaded through
`tml.core.config.load_config_from_yaml`, so unknown fields are errors naming the field,
and `${VAR}` / `${CONFIG_DIR}` are substituted (a workflow can point at files beside it).

    name: twhin-local
    file: projects/twhin/run.py
    args: ["--config_yaml_path=projects/twhin/config/local.yaml", "--save_dir=runs/twhin"]
    nodes: 2
    working_dir: ${CONFIG_DIR}/../../..
    artifacts: [runs/twhin]
    resources: {cpu: 2, memory: 8Gi, gpu: {count: 0}}
    readers: {per_node: 2}     # reader processes beside each node's trainers (tml.readers)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from importlib import metadata

import pydantic

from tml.common.safe_paths import check_name, check_relative
from tml.core.config import BaseConfig, Field, load_config_from_yaml
from tml.errors import TmlError


class LaunchError(TmlError):
    """A workflow cannot be launched as asked (bad file, missing tool, wrong machine)."""


class LaunchFailedError(TmlError):
    """A launched workflow ran and failed (a node exited non-zero, the job failed)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Every field is checked here, in the model, so every backend and --dry-run get the same
# checks. The backends write values into sbatch, srun and bash scripts (quoted) and into
# YAML (dumped); a value that is not what its field says (a newline in a time, `;` in a
# variable name) is refused before anything is written. `before_run` alone is shell.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCRIPT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # before_run: \t and \n allowed
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# SLURM --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or no limit).
SLURM_TIME = re.compile(r"[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}"
                        r"|UNLIMITED|INFINITE")
# A GPU type: a SLURM gres type and a Kubernetes label value (nvidia.com/gpu.product).
GPU_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")

_MEMORY = re.compile(r"([0-9]{1,18}(?:\.[0-9]{1,9})?) ?([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def memory_bytes(text: str) -> int:
    """`"16Gi"` -> 17179869184; accepts Kubernetes (`Gi`, `G`) and SLURM-ish (`16GB`) units."""
    match = _MEMORY.fullmatch(str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 512Mi, 16Gi or 16G)")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _UNITS[unit])


def memory_mebibytes(text: str) -> int:
    """Memory in MiB, rounded up (SLURM's `--mem` unit)."""
    return -(-memory_bytes(text) // 1024**2)


def _check_memory(value: str | None) -> str | None:
    if value is not None:
        memory_bytes(value)
    return value


def no_control_characters(value: str, forbidden: re.Pattern[str] = _CONTROL) -> str:
    """Refuse control characters (a newline ends a script line, NUL ends a C string)."""
    found = forbidden.search(value)
    if found:
        raise ValueError(f"{value!r}: control character {found.group()!r} is not allowed")
    return value


def _text(value: str | None) -> str | None:
    return None if value is None else no_control_characters(value)


def _texts(values: list[str]) -> list[str]:
    for value in values:
        no_control_characters(value)
    return values


def _as_value_error(check: Callable[..., str], *args: str) -> str:
    """Run a `safe_paths` check inside a validator: pydantic reports ValueErrors only."""
    try:
        return check(*args)
    except TmlError as error:
        raise ValueError(str(error)) from None


LATEST = "latest"


def split_dep(dep: str) -> tuple[str, str | None]:
    """`"prepare"` -> ("prepare", None): run it first; `"prepare:latest"` -> ("prepare",
    "latest"): reuse the artifacts of its newest finished run (dstack's tag syntax)."""
    name, sep, tag = dep.partition(":")
    return name, (tag if sep else None)


def _reject_bool(value: object, field: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a {field}")


class GpuResources(BaseConfig):
    """GPUs per node."""

    count: pydantic.NonNegativeInt = Field(0, description="GPUs per node; also the number of "
                                           "workers per node (0: one CPU worker).")
    name: str | None = Field(None, description="GPU type, e.g. a100 (SLURM gres type, "
                             "Kubernetes nvidia.com/gpu.product label).")
    memory: str | None = Field(None, description="Least memory per GPU, e.g. 40Gi "
                               "(Kubernetes: node affinity on nvidia.com/gpu.memory).")

    _memory = pydantic.field_validator("memory")(_check_memory)

    @pydantic.field_validator("name")
    @classmethod
    def _gpu_name(cls, value: str | None) -> str | None:
        if value is not None and not GPU_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a GPU type: use 1-63 ASCII letters, digits, "
                             "'_', '.' or '-', starting and ending with a letter or digit")
        return value


class Resources(BaseConfig):
    """What each node needs."""

    cpu: pydantic.PositiveInt | None = Field(None, description="CPU cores per node.")
    memory: str | None = Field(None, description="Memory per node, e.g. 16Gi.")
    gpu: GpuResources = Field(default_factory=GpuResources, description="GPUs per node.")
    shm_size: str | None = Field(None, description="Shared memory (/dev/shm) per node, e.g. "
                                 "2Gi (Kubernetes: an emptyDir of medium Memory).")
    interruptible: bool = Field(False, description="The run may be preempted and started "
                                "again (SLURM --requeue); the script must resume from its "
                                "checkpoints, as TwHIN does from save_dir.")
    time: str | None = Field(None, description="Wall-clock limit, SLURM format "
                             "(e.g. 02:00:00 or 1-00:00:00).")

    _memory = pydantic.field_validator("memory", "shm_size")(_check_memory)

    @pydantic.field_validator("gpu", mode="before")
    @classmethod
    def _gpu_count_alone(cls, value: object) -> object:
        # dstack writes `gpu: 2` as well as `gpu: {count: 2, name: A100}`.
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a GPU count or a mapping {{count, name, memory}}")
        if isinstance(value, int):
            return {"count": value}
        return value

    @pydantic.field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_TIME.fullmatch(value):
            raise ValueError(f"{value!r} is not a SLURM time: write minutes, MM:SS, HH:MM:SS, "
                             "D-HH, D-HH:MM or D-HH:MM:SS (quoted, e.g. \"02:00:00\")")
        return value


class WorkflowReaders(BaseConfig):
    """Reader processes (`tml.readers`, docs/readers.md) started on each node beside its
    trainers, before its torchrun agent; they serve that node's trainers."""

    per_node: pydantic.NonNegativeInt = Field(0, description="Reader processes on each node "
                                              "(each runs the workflow's file with "
                                              "TML_ROLE=reader); 0: the trainers read.")
    start_timeout_s: pydantic.PositiveFloat = Field(
        300.0, description="How long a node waits for its readers to serve before it fails.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _count_alone(cls, value: object) -> object:
        # `readers: 2` is `readers: {per_node: 2}`.
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a reader count or a mapping "
                             "{per_node, start_timeout_s}")
        return {"per_node": value} if isinstance(value, int) else value


class Workflow(BaseConfig):
    """A torchrun workflow: one agent per node, `gpu.count` (or 1) workers per agent."""

    name: str = Field(description="Name of the workflow; runs go to runs/<name>/<run-id>/ "
                      "(1-64 letters, digits, '_', '-').")
    provider: str | None = Field(None, description="dstack's provider; only torchrun (the "
                                 "default) is run by tml.")
    file: str = Field(description="The Python script every worker runs, relative to "
                      "working_dir (dstack also writes it `script`).")
    args: list[str] = Field(default_factory=list, description="Arguments of the script: a "
                            "list, or one string split as a shell would (never run by one).")
    nodes: pydantic.PositiveInt = Field(1, description="Nodes (torch elastic agents).")
    requirements: list[str] | str = Field(default_factory=list, description="A list of pip "
                                          "requirements (checked before the launch, installed "
                                          "into the active environment with "
                                          "--install-requirements), or the path of a "
                                          "requirements file, relative to working_dir, "
                                          "installed into an environment of the run.")
    before_run: list[str] = Field(default_factory=list, description="Shell commands run once "
                                  "per node, in working_dir, before its agent starts.")
    environment: dict[str, str] = Field(default_factory=dict, description="Environment "
                                        "variables of every node (names: letters, digits, "
                                        "'_'): a mapping or a list of KEY=VALUE.")
    artifacts: list[str] = Field(default_factory=list, description="Paths, relative to the "
                                 "master node's working_dir (no '..', not absolute, not "
                                 "leading out through symbolic links), copied into the run "
                                 "directory; strings or {path: ...} entries.")
    working_dir: str = Field(".", description="Directory the nodes run in (relative paths: "
                             "to where tml launch runs).")
    version: str | None = Field(None, description="Python major.minor the workflow needs; "
                                "checked against the launching interpreter.")
    resources: Resources = Field(default_factory=Resources, description="Per-node resources.")
    readers: WorkflowReaders = Field(default_factory=WorkflowReaders, description="Reader "
                                     "processes beside each node's trainers: "
                                     "{per_node: N} (or N).")
    max_restarts: pydantic.NonNegativeInt | None = Field(
        None, description="Restarts of the whole worker group after a failure (torchrun "
        "--max_restarts). Default: the training.max_restarts of the config the script is "
        "given (--config_yaml_path or --config in args), else TML_MAX_RESTARTS, else 0.")
    deps: list[str] = Field(default_factory=list, description="Workflows of the same file "
                            "that run first; their artifacts are copied into this one's "
                            "working_dir (also written depends-on). NAME:latest runs nothing: "
                            "it copies the artifacts of NAME's newest finished run.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _dstack_spellings(cls, value: object) -> object:
        # dstack's torchrun provider reads `script` or `file` (its README writes `script`),
        # writes `depends-on` for deps, and its schema also allows `nodes` under resources.
        if not isinstance(value, dict):
            return value
        for alias, field in (("depends-on", "deps"), ("script", "file")):
            if alias in value:
                if field in value:
                    raise ValueError(f"write {field} or {alias}, not both")
                value = {(field if k == alias else k): v for k, v in value.items()}
        resources = value.get("resources")
        if isinstance(resources, dict) and "nodes" in resources:
            nodes = resources["nodes"]
            if "nodes" in value and value["nodes"] != nodes:
                raise ValueError(f"nodes is {value['nodes']!r} but resources.nodes is "
                                 f"{nodes!r}: write one")
            value = {**value, "nodes": nodes,
                     "resources": {k: v for k, v in resources.items() if k != "nodes"}}
        return value

    @pydantic.field_validator("provider")
    @classmethod
    def _torchrun_only(cls, value: str | None) -> str | None:
        if value is not None and value != "torchrun":
            raise ValueError(f"{value!r} is not supported: tml launch runs provider: torchrun")
        return value

    @pydantic.field_validator("deps")
    @classmethod
    def _dep_names(cls, value: list[str]) -> list[str]:
        for dep in value:
            name, tag = split_dep(dep)
            _as_value_error(check_name, name, "dependency")
            if tag not in (None, LATEST):
                raise ValueError(f"{dep!r}: only the tag :{LATEST} is supported (the newest "
                                 f"finished run of {name})")
        return value

    @pydantic.field_validator("args", mode="before")
    @classmethod
    def _args_string(cls, value: object) -> object:
        # One string is split as a shell would split it, and never given to a shell.
        if isinstance(value, str):
            no_control_characters(value)
            try:
                return shlex.split(value)
            except ValueError as error:
                raise ValueError(f"{value!r} cannot be split into arguments: {error}") \
                    from None
        return value

    @pydantic.field_validator("environment", mode="before")
    @classmethod
    def _environment_list(cls, value: object) -> object:
        # dstack also writes `environment: ["KEY=VALUE", ...]`, and numbers as values
        # (`PORT: 8080`), which YAML reads as numbers.
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v for k, v in value.items()}
        if not isinstance(value, list):
            return value
        mapping: dict[str, object] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"item {i}: {item!r} is not KEY=VALUE")
            key, text = item.split("=", 1)
            if key in mapping:
                raise ValueError(f"item {i}: {key!r} is set twice")
            mapping[key] = text
        return mapping

    @pydantic.field_validator("artifacts", mode="before")
    @classmethod
    def _artifact_entries(cls, value: object) -> object:
        # dstack writes `artifacts: [{path: model}]`; a plain string is the same.
        if not isinstance(value, list):
            return value
        paths = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                if set(item) != {"path"}:
                    extra = sorted(str(k) for k in set(item) - {"path"})
                    raise ValueError(f"item {i}: an artifact is {{path: ...}}" +
                                     (f"; unknown field(s) {', '.join(extra)}" if extra
                                      else "; path is missing"))
                item = item["path"]
            paths.append(item)
        return paths

    @pydantic.field_validator("version", mode="before")
    @classmethod
    def _version_is_text(cls, value: object) -> object:
        # dstack's schema allows a number (3.9, 3.10): YAML reads `3.10` as 3.1, so the number
        # 3.1 means 3.10 (nobody targets Python 3.1); other numbers are read as written.
        if isinstance(value, float) and not isinstance(value, bool):
            text = repr(value)
            if text == "3.1":
                return "3.10"
            if re.fullmatch(r"3\.(?:[7-9]|1[1-9])", text):
                return text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"{value!r}: write the version quoted, e.g. \"3.11\"")
        return value

    @pydantic.field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        # runs/<name>/<run-id>, the SLURM job name, the rendezvous id, the Kubernetes job.
        return _as_value_error(check_name, value, "workflow name")

    _plain_text = pydantic.field_validator("working_dir")(_text)

    @pydantic.field_validator("file")
    @classmethod
    def _script_path(cls, value: str) -> str:
        no_control_characters(value)
        if value.startswith("-") or not value.strip():
            # torchrun would read it as one of its own options.
            raise ValueError(f"{value!r} is not a script path")
        return value
    _plain_texts = pydantic.field_validator("args")(_texts)

    @pydantic.field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not ENV_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not an environment variable name: use ASCII "
                                 "letters, digits and '_', not starting with a digit")
            try:
                no_control_characters(text)
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
        return value

    @pydantic.field_validator("artifacts")
    @classmethod
    def _artifacts_stay_inside(cls, value: list[str]) -> list[str]:
        for i, artifact in enumerate(value):
            _as_value_error(check_relative, artifact, f"item {i}", "working_dir")
        return value

    @pydantic.field_validator("requirements")
    @classmethod
    def _pip_requirements(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            # The path of a requirements file; its lines are checked when it is read.
            return _as_value_error(check_relative, value, "requirements file", "working_dir")
        # Only requirements, never pip options (--index-url, -e, -r FILE).
        from packaging.requirements import InvalidRequirement, Requirement

        for text in _texts(value):
            try:
                Requirement(text)
            except InvalidRequirement:
                raise ValueError(f"{text!r} is not a pip requirement (such as torch>=2.1)") \
                    from None
        return value

    @pydantic.field_validator("version")
    @classmethod
    def _version_format(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+\.\d+", str(value)):
            raise ValueError(f"{value!r} is not a Python major.minor version such as 3.11")
        return value

    @pydantic.field_validator("before_run", mode="before")
    @classmethod
    def _one_command_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @pydantic.field_validator("before_run")
    @classmethod
    def _shell_text(cls, value: list[str]) -> list[str]:
        # Shell by design: newlines and tabs are fine, other control characters are not.
        for command in value:
            no_control_characters(command, forbidden=_SCRIPT_CONTROL)
        return value

    @property
    def requirement_specs(self) -> list[str]:
        """The requirements written as a list in the workflow (none for a file)."""
        return [] if isinstance(self.requirements, str) else list(self.requirements)

    @property
    def requirements_file(self) -> str | None:
        """The requirements file (relative to working_dir), if one is named."""
        return self.requirements if isinstance(self.requirements, str) else None

    @property
    def nproc_per_node(self) -> int:
        """Workers per node: one per GPU, or one on CPU."""
        return self.resources.gpu.count or 1

    def working_path(self) -> str:
        return os.path.abspath(self.working_dir)

    def file_path(self) -> str:
        return os.path.join(self.working_path(), self.file)


def load_workflow(path: str) -> Workflow:
    """Read and validate a workflow file (errors name the file and the field)."""
    if not os.path.isfile(path):
        raise LaunchError(f"workflow file not found: {path}")
    return load_config_from_yaml(Workflow, path)


def check_python_version(workflow: Workflow, source: str) -> None:
    """The workflow's `version` must be the launching interpreter's major.minor."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if workflow.version is not None and workflow.version != here:
        raise LaunchError(f"{source}: version: the workflow needs Python {workflow.version}, "
                          f"but tml launch runs on Python {here} ({sys.executable})")


def check_local_files(workflow: Workflow, source: str) -> None:
    """working_dir and file exist (the nodes of local and SLURM runs share this view)."""
    if not os.path.isdir(workflow.working_path()):
        raise LaunchError(f"{source}: working_dir: {workflow.working_path()} is not a directory")
    if not os.path.isfile(workflow.file_path()):
        raise LaunchError(f"{source}: file: {workflow.file_path()} does not exist")


def check_local_gpus(workflow: Workflow, source: str) -> None:
    """A GPU count needs that many CUDA devices on this machine."""
    wanted = workflow.resources.gpu.count
    if wanted == 0:
        return
    have = 0
    if shutil.which("nvidia-smi"):
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < wanted:
        raise LaunchError(f"{source}: resources.gpu.count: the workflow asks for {wanted} "
                          f"GPU(s) per node, but this machine has {have}; set count: 0 to "
                          "run on CPU, or use --backend slurm or kubernetes")


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that the active environment does not satisfy."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            raise LaunchError(f"requirements: {text!r} is not a pip requirement") from None
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed,
                                                                        prereleases=True):
            missing.append(text)
    return missing
