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
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib import metadata

import pydantic

from tml.core.config import BaseConfig, Field, load_config_from_yaml
from tml.errors import TmlError


class LaunchError(TmlError):
    """A workflow cannot be launched as asked (bad file, missing tool, wrong machine)."""


class LaunchFailedError(TmlError):
    """A launched workflow ran and failed (a node exited non-zero, the job failed)."""


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def memory_bytes(text: str) -> int:
    """`"16Gi"` -> 17179869184; accepts Kubernetes (`Gi`, `G`) and SLURM-ish (`16GB`) units."""
    match = _MEMORY.match(str(text))
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


class GpuResources(BaseConfig):
    """GPUs per node."""

    count: pydantic.NonNegativeInt = Field(0, description="GPUs per node; also the number of "
                                           "workers per node (0: one CPU worker).")
    name: str | None = Field(None, description="GPU type, e.g. a100 (SLURM gres type, "
                             "Kubernetes nvidia.com/gpu.product label).")
    memory: str | None = Field(None, description="Least memory per GPU, e.g. 40Gi "
                               "(Kubernetes: node affinity on nvidia.com/gpu.memory).")

    _memory = pydantic.field_validator("memory")(_check_memory)


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


class Workflow(BaseConfig):
    """A torchrun workflow: one agent per node, `gpu.count` (or 1) workers per agent."""

    name: str = Field(description="Name of the workflow; runs go to runs/<name>/<run-id>/.")
    file: str = Field(description="The Python script every worker runs, relative to "
                      "working_dir.")
    args: list[str] = Field(default_factory=list, description="Arguments of the script.")
    nodes: pydantic.PositiveInt = Field(1, description="Nodes (torch elastic agents).")
    requirements: list[str] = Field(default_factory=list, description="pip requirements; "
                                    "checked before the launch, installed into the active "
                                    "environment with --install-requirements.")
    before_run: list[str] = Field(default_factory=list, description="Shell commands run once "
                                  "per node, in working_dir, before its agent starts.")
    environment: dict[str, str] = Field(default_factory=dict, description="Environment "
                                        "variables of every node.")
    artifacts: list[str] = Field(default_factory=list, description="Paths, relative to the "
                                 "master node's working_dir, copied into the run directory.")
    working_dir: str = Field(".", description="Directory the nodes run in (relative paths: "
                             "to where tml launch runs).")
    version: str | None = Field(None, description="Python major.minor the workflow needs; "
                                "checked against the launching interpreter.")
    resources: Resources = Field(default_factory=Resources, description="Per-node resources.")

    @pydantic.field_validator("name")
    @classmethod
    def _name_is_a_label(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} must be letters, digits, '-', '_' or '.' (it names "
                             "directories and jobs)")
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
