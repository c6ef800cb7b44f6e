"""`tml launch`: workflow checks, the local backend with real torch elastic agents, the
SLURM script and the Kubernetes manifest. The SLURM cluster runs are in test_launch_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from projects.twhin.data.generate import generate_graph
from tests.twhin_setup import REPO as TWHIN_REPO
from tml.launch.cli import main
from tml.launch.workflow import memory_bytes, memory_mebibytes

REPO = Path(TWHIN_REPO)
RUN = REPO / "projects" / "twhin" / "run.py"
LOCAL = REPO / "projects" / "twhin" / "config" / "local.yaml"
WORKFLOWS = REPO / "projects" / "twhin" / "workflows"
BATCH = 200


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def launch(args: list[str], env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m tml.launch ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tml.launch", *args], env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The graph of `python -m projects.twhin.data.generate --out DIR --num_users 2000
    --num_tweets 500 --num_edges 20000 --num_communities 5`."""
    out = tmp_path_factory.mktemp("graph")
    generate_graph(str(out), num_users=2000, num_tweets=500, num_edges=20_000,
                   num_communities=5)
    return out


def expected_final_step(graph: Path, world_size: int) -> int:
    """One epoch: every rank reads rows // world_size rows in full batches."""
    rows = pq.read_table(graph / "train").num_rows
    return rows // world_size // BATCH


def tiny_twhin_workflow(directory: Path, graph: Path, name: str = "twhin-tiny",
                        training: dict | None = None, **fields: object) -> Path:
    """A TwHIN config on the tiny graph (one epoch) and a 2-node workflow training it."""
    config = yaml.safe_load(LOCAL.read_text())
    tables = config["model"]["embeddings"]["tables"]
    tables[0]["num_embeddings"], tables[1]["num_embeddings"] = 2000, 500
    config["train_data"].update(data_root=f"{graph}/train", per_replica_batch_size=BATCH)
    config["validation_data"].update(data_root=f"{graph}/validation",
                                     per_replica_batch_size=BATCH)
    config["training"].update({"num_epochs": 1, "train_log_every_n": 10,
                               "checkpoint_every_n": 1000, "eval_log_every_n": 100000,
                               "num_eval_steps": 2, **(training or {})})
    (directory / "twhin.yaml").write_text(yaml.safe_dump(config))
    workflow = {
        "name": name,
        "file": str(RUN),
        "args": ["--config_yaml_path=twhin.yaml", "--save_dir=checkpoints"],
        "nodes": 2,
        "working_dir": str(directory),
        "environment": {"PYTHONPATH": str(REPO), "TML_TEST_MARK": "from-the-workflow"},
        "before_run": ['echo "node before_run: $TML_TEST_MARK" >> before_run.txt'],
        "artifacts": ["checkpoints", "before_run.txt"],
        "version": f"{sys.version_info.major}.{sys.version_info.minor}",
        # One core per node: the test cluster's nodes share this host's cores.
        "resources": {"cpu": 1, "gpu": {"count": 0}},
        **fields,
    }
    path = directory / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


def write_workflow(directory: Path, **fields: object) -> Path:
    workflow = {"name": "wf", "file": "script.py", "working_dir": str(directory), **fields}
    if not (directory / "script.py").exists():
        (directory / "script.py").write_text("print('hello')\n")
    path = directory / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


# --- the local backend, for real ---------------------------------------------------------

@pytest.mark.slow
def test_local_two_nodes_train_twhin_and_bring_back_artifacts_and_logs(
        tmp_path: Path, tiny_graph: Path) -> None:
    """2 torchrun agents x 1 worker meet by c10d and train TwHIN: the final step is one
    epoch at world size 2 (not 1), before_run ran once per node with the workflow's
    environment, and the checkpoint and every node's log are in runs/<name>/<run-id>/."""
    work = tmp_path / "work"
    work.mkdir()
    workflow = tiny_twhin_workflow(work, tiny_graph)
    result = launch([str(workflow), "--runs-dir", str(tmp_path / "runs")])
    assert result.returncode == 0, result.stderr[-4000:]

    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "twhin-tiny"
    final = expected_final_step(tiny_graph, world_size=2)
    assert (run_dir / "artifacts" / "checkpoints" / str(final)).is_dir(), \
        sorted(os.listdir(run_dir / "artifacts" / "checkpoints"))
    assert (run_dir / "artifacts" / "before_run.txt").read_text() == \
        "node before_run: from-the-workflow\n" * 2
    node0 = (run_dir / "logs" / "node-0.log").read_text()
    node1 = (run_dir / "logs" / "node-1.log").read_text()
    # Rank 0 (which logs) is on whichever node c10d gave group rank 0.
    assert f"done: step {final}" in node0 + node1, (node0 + node1)[-3000:]
    assert "--nnodes 2" in node1 and "is_host=0" in node1


@pytest.mark.slow
def test_a_failing_node_fails_the_launch_with_its_log_tail(tmp_path: Path) -> None:
    """Node 1's worker exits 3: the launch exits 2 naming node 1, with its log tail."""
    script = tmp_path / "script.py"
    script.write_text("import os, sys\n"
                      "if os.environ['GROUP_RANK'] == '1':\n"
                      "    print('boom on node 1', flush=True)\n"
                      "    sys.exit(3)\n")
    path = write_workflow(tmp_path, nodes=2, file="script.py")
    result = launch([str(path), "--runs-dir", str(tmp_path / "runs")], timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "boom on node 1" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: node 1 failed (exit code 1)"), result.stderr[-3000:]


def test_a_failing_before_run_stops_the_launch(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, nodes=2, before_run=["echo preparing", "exit 7"])
    err = _error([str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    (log,) = (tmp_path / "runs" / "wf").glob("*/logs/node-0.log")
    assert err == f"error: node 0: before_run command 'exit 7' exited with code 7 (log: {log})"
    assert log.read_text() == "$ echo preparing\npreparing\n$ exit 7\n"


# --- bad input: one clear line, nothing started -------------------------------------------

def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("fields, message", [
    ({"nodez": 2}, "nodez: unknown field (not allowed here; check the spelling)"),
    ({"nodes": 0}, "nodes: Input should be greater than 0"),
    ({"resources": {"gpu": {"cuont": 1}}}, "resources.gpu.cuont: unknown field"),
    ({"resources": {"memory": "lots"}}, "resources.memory: not a memory size: 'lots'"),
    ({"version": "3"}, "version: '3' is not a Python major.minor version"),
])
def test_invalid_workflow_fields_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           fields: dict, message: str) -> None:
    path = write_workflow(tmp_path, **fields)
    assert _error([str(path), "--runs-dir", str(tmp_path / "runs")], capsys) \
        .startswith(f"error: {path}: {message}")
    assert not (tmp_path / "runs").exists()


def test_missing_file_field_and_missing_script(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"name": "wf"}))
    assert _error([str(path)], capsys) == f"error: {path}: file: Field required"
    path = write_workflow(tmp_path, file="nope.py")
    assert _error([str(path)], capsys) == \
        f"error: {path}: file: {tmp_path}/nope.py does not exist"
    assert _error([str(tmp_path / "absent.yaml")], capsys) == \
        f"error: workflow file not found: {tmp_path}/absent.yaml"


def test_python_version_must_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, version="2.7")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert _error([str(path)], capsys).startswith(
        f"error: {path}: version: the workflow needs Python 2.7, but tml launch runs on "
        f"Python {here}")


def test_gpus_asked_for_on_a_machine_without_them(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    path = write_workflow(tmp_path, resources={"gpu": {"count": 2}})
    assert _error([str(path), "--runs-dir", str(tmp_path / "runs")], capsys).startswith(
        f"error: {path}: resources.gpu.count: the workflow asks for 2 GPU(s) per node, "
        "but this machine has 0")
    assert not (tmp_path / "runs").exists()


def test_slurm_backend_without_sbatch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue, scontrol here
    path = write_workflow(tmp_path)
    assert _error([str(path), "--backend", "slurm", "--runs-dir", str(tmp_path / "runs")],
                  capsys) == ("error: --backend slurm needs sbatch, squeue, scontrol on PATH "
                              "(run tml launch on a SLURM login node, or use --dry-run to "
                              "only write the script)")
    assert not (tmp_path / "runs").exists()


def test_missing_requirements_are_named(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, requirements=["pyyaml>=1", "tml-no-such-package==1.0",
                                                  "pydantic<1"])
    assert _error([str(path)], capsys) == (
        f"error: {path}: requirements not installed: tml-no-such-package==1.0, pydantic<1 "
        "(pass --install-requirements to pip install them)")


# --- what the backends write ------------------------------------------------------------

def test_local_dry_run_shows_one_c10d_agent_per_node(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, nodes=3, args=["--x=1"], before_run="echo hi")
    main(["launch", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    agents = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(agents) == 3 and out.count("echo hi") == 3
    endpoints = {line.split("--rdzv_endpoint ")[1].split()[0] for line in agents}
    assert len(endpoints) == 1 and endpoints.pop().startswith("127.0.0.1:")
    assert ["is_host=1" in a for a in agents] == [True, False, False]
    assert all("--nnodes 3 --nproc_per_node 1" in a and a.endswith("script.py --x=1")
               for a in agents)
    assert not (tmp_path / "runs").exists()


def test_slurm_script_asks_for_the_resources_and_is_valid_bash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, nodes=4, environment={"A": "x y"},
                          artifacts=["out/model", "logs/x.txt"],
                          resources={"cpu": 8, "memory": "16Gi", "time": "02:00:00",
                                     "interruptible": True,
                                     "gpu": {"count": 2, "name": "a100"}})
    main(["launch", str(path), "--backend", "slurm", "--dry-run", "--partition", "gpu",
          "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    for directive in ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=8",
                      "--mem=16384M", "--gres=gpu:a100:2", "--time=02:00:00", "--requeue",
                      "--partition=gpu"]:
        assert f"#SBATCH {directive}\n" in out
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in out
    assert "srun --nodes=4 --ntasks-per-node=1" in out
    assert "export A='x y'" in out
    assert ('--nnodes 4 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint '
            '"$TML_RDZV_ENDPOINT"') in out
    batch, node = out.split("# ", 1)[1].split("\n# " + str(tmp_path))
    for script in (batch, node):
        text = script.split("\n", 1)[1]
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, text
    assert not (tmp_path / "runs").exists()
    not_interruptible = write_workflow(tmp_path)
    main(["launch", str(not_interruptible), "--backend", "slurm", "--dry-run"])
    assert "#SBATCH --no-requeue\n" in capsys.readouterr().out


def test_kubernetes_manifest_is_a_pytorchjob_with_master_and_workers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = WORKFLOWS / "twhin-kubernetes.yaml"
    main(["launch", str(path), "--backend", "kubernetes", "--dry-run", "--image", "reg/tml:1",
          "--workdir", "/workspace"])
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    name = job["metadata"]["name"]
    assert name.startswith("twhin-k8s-") and len(name) <= 63
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 3}
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"  # interruptible
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "reg/tml:1"
        assert container["workingDir"] == "/workspace"
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"] == \
            {"cpu": "16", "memory": "65536Mi", "nvidia.com/gpu": 8}
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                "sizeLimit": "8192Mi"}}]
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
        command = container["command"]
        assert command[:2] == ["bash", "-c"]
        script = command[2]
        assert "python -m projects.twhin.data.generate" in script  # before_run
        assert ('--nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint '
                f'"${{MASTER_ADDR}}:${{MASTER_PORT}}" --rdzv_id {name}') in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_kubernetes_export_writes_the_manifest_into_the_run_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, nodes=1)
    main(["launch", str(path), "--backend", "kubernetes", "--runs-dir", str(tmp_path / "runs")])
    written = Path(capsys.readouterr().out.strip())
    assert written.parent.parent == tmp_path / "runs" / "wf"
    job = yaml.safe_load(written.read_text())
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]  # one node: no workers
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "volumes" not in pod and job["spec"]["runPolicy"]["backoffLimit"] == 0


def test_example_workflows_load() -> None:
    from tml.launch import load_workflow

    for path in sorted(WORKFLOWS.glob("*.yaml")):
        workflow = load_workflow(str(path))
        assert workflow.file == "projects/twhin/run.py"
        # "." (kubernetes): the image's working directory, a copy of this repository
        root = str(REPO) if workflow.working_dir == "." else workflow.working_path()
        assert os.path.isfile(os.path.join(root, workflow.file)), (path, root)


def test_memory_sizes() -> None:
    assert memory_bytes("16Gi") == 16 * 1024**3 and memory_bytes("16G") == 16 * 10**9
    assert memory_bytes("512Mi") == memory_bytes("512MiB") == 512 * 1024**2
    assert memory_mebibytes("1G") == 954 and memory_mebibytes("100") == 1
    with pytest.raises(ValueError):
        memory_bytes("16 gigs")
