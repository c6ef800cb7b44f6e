"""The Kubernetes export: a Kubeflow `PyTorchJob` manifest (training-operator, kubeflow.org/v1).

The operator creates one Master pod and `nodes - 1` Worker pods and gives each
`MASTER_ADDR`, `MASTER_PORT` and `RANK` (the pod's index, 0 on the master); every pod runs
one torchrun agent with c10d rendezvous at the master, exactly like the other backends.
We only write the manifest (`kubectl apply -f` is yours): the image, volumes for
checkpoints and artifacts, and cluster policies differ too much between clusters.
"""

from __future__ import annotations

import copy
import re
import shlex

import yaml

from tml.launch.common import node_argv, torchrun_args, workflow_environment
from tml.launch.workflow import Workflow, memory_mebibytes

DEFAULT_IMAGE = "REPLACE-ME/tml:latest"
CONTAINER = "pytorch"  # the container name the training operator looks for
RDZV_PORT = 23456  # the operator's default MASTER_PORT


def job_name(workflow: Workflow, run_id: str) -> str:
    """A DNS-1123 name (lowercase, digits, '-'), short enough for the pods' service names."""
    base = re.sub(r"[^a-z0-9-]+", "-", workflow.name.lower()).strip("-")[:40] or "tml"
    return f"{base}-{run_id.rsplit('-', 1)[-1]}"


K8S_ENV = "/tmp/tml-run-env"


def _resources(workflow: Workflow) -> dict:
    resources = workflow.resources
    amounts: dict[str, str | int] = {}
    if resources.cpu:
        amounts["cpu"] = str(resources.cpu)
    if resources.memory:
        amounts["memory"] = f"{memory_mebibytes(resources.memory)}Mi"
    if resources.gpu.count:
        amounts["nvidia.com/gpu"] = resources.gpu.count
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _node_script(workflow: Workflow, name: str, python: str,
                 install_requirements: bool) -> str:
    lines = ["set -euo pipefail"]
    if workflow.requirements_file is not None:
        # Into an environment of the pod that sees the image's packages (tml.launch.run_env).
        lines.append(shlex.join([python, "-m", "tml.launch.run_env", K8S_ENV, ".",
                                 workflow.requirements_file]))
        python = f"{K8S_ENV}/bin/python"
    command = torchrun_args(workflow, "${MASTER_ADDR}:${MASTER_PORT}", name, "${is_host}")
    expand = {"${MASTER_ADDR}:${MASTER_PORT}", "is_host=${is_host}"}
    # tml is the image's own (tml_root None): the node's readers start from it.
    quoted = [f'"{c}"' if c in expand else shlex.quote(c)
              for c in node_argv(workflow, python, command, None)]
    if install_requirements and workflow.requirement_specs:
        lines.append(shlex.join([python, "-m", "pip", "install", *workflow.requirement_specs]))
    lines += list(workflow.before_run)
    lines += ['is_host=0; if [ "${RANK:-0}" = 0 ]; then is_host=1; fi',
              "exec " + " ".join(quoted)]
    return "\n".join(lines)


def manifest(workflow: Workflow, run_id: str, image: str = DEFAULT_IMAGE,
             python: str = "python", workdir: str | None = None,
             install_requirements: bool = False) -> dict:
    """The PyTorchJob as a dict (see `render`)."""
    name = job_name(workflow, run_id)
    resources = workflow.resources
    env = [{"name": k, "value": v} for k, v in workflow_environment(workflow).items()]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    container: dict = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bash", "-c", _node_script(workflow, name, python, install_requirements)],
        "env": env,
        # The operator reads MASTER_PORT from the port with this name.
        "ports": [{"name": "pytorchjob-port", "containerPort": RDZV_PORT}],
    }
    if workdir:
        container["workingDir"] = workdir
    if _resources(workflow):
        container["resources"] = _resources(workflow)
    pod: dict = {"containers": [container]}
    if resources.shm_size:
        # /dev/shm of a container is 64 MiB by default; torch workers exchange tensors there.
        pod["volumes"] = [{"name": "dshm", "emptyDir": {
            "medium": "Memory", "sizeLimit": f"{memory_mebibytes(resources.shm_size)}Mi"}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if resources.gpu.name:
        pod["nodeSelector"] = {"nvidia.com/gpu.product": resources.gpu.name}
    if resources.gpu.memory:
        least = memory_mebibytes(resources.gpu.memory)
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "nvidia.com/gpu.memory", "operator": "Gt",
                "values": [str(least - 1)]}]}]}}}
    restart = "OnFailure" if resources.interruptible else "Never"

    def replica(count: int) -> dict:
        return {"replicas": count, "restartPolicy": restart,
                "template": {"metadata": {"labels": {"app.kubernetes.io/name": name}},
                             "spec": copy.deepcopy(pod)}}

    replicas = {"Master": replica(1)}
    if workflow.nodes > 1:
        replicas["Worker"] = replica(workflow.nodes - 1)
    spec: dict = {"pytorchReplicaSpecs": replicas,
                  "runPolicy": {"cleanPodPolicy": "None",
                                "backoffLimit": 3 if resources.interruptible else 0}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"tml/workflow": workflow.name}},
            "spec": spec}


def render(workflow: Workflow, run_id: str, **options: object) -> str:
    """The manifest as YAML, with a header saying what is left to the user."""
    header = (f"# PyTorchJob for tml workflow {workflow.name} (kubectl apply -f this file).\n"
              "# Set the image (--image); artifacts are not collected: write them to a "
              "mounted volume.\n")
    text = yaml.dump(manifest(workflow, run_id, **options), Dumper=_Dumper, sort_keys=False)
    return header + text


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the node script) as literal blocks, readable as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
