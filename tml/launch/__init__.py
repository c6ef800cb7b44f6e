"""Declarative torchrun workflows, run locally, on SLURM, or exported for Kubernetes.

`tml launch WORKFLOW.yaml --backend local|slurm|kubernetes`. Every backend runs torch
elastic agents (c10d rendezvous); tml never schedules or rendezvous on its own.
"""

from tml.launch.workflow import LaunchError, LaunchFailedError, Workflow, load_workflow

__all__ = ["LaunchError", "LaunchFailedError", "Workflow", "load_workflow"]
