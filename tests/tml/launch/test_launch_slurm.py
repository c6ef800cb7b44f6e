"""`tml launch --backend slurm` on a real two-node SLURM cluster (tests/slurm_cluster.py).

The cluster is Debian's SLURM 22.05 started from a temporary directory (installed with
apt-get when missing); every job goes through sbatch, srun and one torchrun agent per node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster
from tests.tml.launch.test_launch_workflow import (  # noqa: F401 (tiny_graph is a fixture)
    REPO,
    child_env,
    expected_final_step,
    launch,
    tiny_graph,
    tiny_twhin_workflow,
    write_workflow,
)
from tml.launch.local import free_port

# 15 min: the first test also starts the cluster, installing SLURM with apt-get if missing.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]


def slurm_env(cluster: SlurmCluster) -> dict[str, str]:
    """What tml launch needs to reach the test cluster; a free rendezvous port, since the
    default (20000 + job id) could be taken on a shared test machine."""
    return child_env(SLURM_CONF=str(cluster.conf), TML_RDZV_PORT=str(free_port()))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    start = time.monotonic()
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as error:
        require(False, f"SLURM: {error}")
    print(f"SLURM cluster up in {time.monotonic() - start:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_twhin_trains_on_two_slurm_nodes_and_the_artifacts_come_back(
        slurm: SlurmCluster, tmp_path: Path, tiny_graph: Path) -> None:  # noqa: F811
    """sbatch -> srun -> 2 torchrun agents (c10d at the first node's NodeAddr) -> TwHIN
    trains one epoch at world size 2; the checkpoint, before_run's output and every node's
    log are in the run directory."""
    work = tmp_path / "work"
    work.mkdir()
    workflow = tiny_twhin_workflow(work, tiny_graph, name="twhin-slurm-test")
    start = time.monotonic()
    result = launch([str(workflow), "--backend", "slurm", "--runs-dir", str(tmp_path / "runs")],
                    env=slurm_env(slurm))
    assert result.returncode == 0, result.stderr[-4000:] + slurm.log_tail("slurmctld")
    print(f"tml launch --backend slurm took {time.monotonic() - start:.1f} s")

    run_dir = Path(result.stdout.strip().splitlines()[-1])
    job_id = (run_dir / "job-id").read_text().strip()
    assert f"submitted SLURM job {job_id}" in result.stderr
    assert (run_dir / "exit-code").read_text().strip() == "0"
    final = expected_final_step(tiny_graph, world_size=2)
    assert (run_dir / "artifacts" / "checkpoints" / str(final)).is_dir()
    assert (run_dir / "artifacts" / "before_run.txt").read_text() == \
        "node before_run: from-the-workflow\n" * 2
    node0 = (run_dir / "logs" / "node-0.log").read_text()
    node1 = (run_dir / "logs" / "node-1.log").read_text()
    assert "tml: node 0" in node0 and "tml: node 1" in node1
    # Rank 0 (which logs) is on whichever node c10d gave group rank 0.
    assert f"done: step {final}" in node0 + node1, (node0 + node1)[-3000:]
    batch = (run_dir / "logs" / f"batch-{job_id}.log").read_text()
    assert "tml: rendezvous at 127.0.0.1:" in batch and "on n1" in batch


def test_a_failing_node_fails_the_slurm_launch(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Node 1's worker exits 3: srun stops the job, tml launch exits 2 naming the job's
    state and shows the logs' tails."""
    (tmp_path / "script.py").write_text("import os, sys\n"
                                        "if os.environ['GROUP_RANK'] == '1':\n"
                                        "    print('boom on node 1', flush=True)\n"
                                        "    sys.exit(3)\n")
    path = write_workflow(tmp_path, nodes=2, environment={"PYTHONPATH": "."})
    result = launch([str(path), "--backend", "slurm", "--runs-dir", str(tmp_path / "runs")],
                    env=slurm_env(slurm), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "boom on node 1" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SLURM job ") and " ended FAILED (exit code " in last, last


def test_an_interruptible_job_requeued_mid_training_resumes_from_its_checkpoint(
        slurm: SlurmCluster, tmp_path: Path, tiny_graph: Path) -> None:  # noqa: F811
    """interruptible -> sbatch --requeue: the job is requeued (as on preemption) once its
    first checkpoint exists; SLURM starts it again, TwHIN resumes from that checkpoint,
    and tml launch follows the job through both attempts to its end."""
    work = tmp_path / "work"
    work.mkdir()
    workflow = tiny_twhin_workflow(
        work, tiny_graph, name="twhin-requeue", training={"num_epochs": 2,
                                                          "checkpoint_every_n": 10},
        resources={"cpu": 1, "interruptible": True})
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "tml.launch", str(workflow), "--backend", "slurm",
         "--runs-dir", str(runs)], env=slurm_env(slurm), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (work / "checkpoints" / "10").is_dir():
            assert process.poll() is None and time.monotonic() < deadline, \
                process.communicate()[1][-3000:] if process.poll() is not None else "timeout"
            time.sleep(0.1)
        (job_file,) = runs.glob("twhin-requeue/*/job-id")
        job_id = job_file.read_text().strip()
        requeue = subprocess.run(["scontrol", "requeue", job_id], env=slurm.env,
                                 capture_output=True, text=True, timeout=60)
        assert requeue.returncode == 0, requeue.stderr
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err[-4000:]
    run_dir = Path(out.strip().splitlines()[-1])
    final = 2 * expected_final_step(tiny_graph, world_size=2)
    assert (run_dir / "artifacts" / "checkpoints" / str(final)).is_dir()
    batch = (run_dir / "logs" / f"batch-{job_id}.log").read_text()
    assert f"tml: attempt 1 of job {job_id}" in batch and f"tml: attempt 2 of job {job_id}" \
        in batch, batch
    nodes = (run_dir / "logs" / "node-0.log").read_text() + \
        (run_dir / "logs" / "node-1.log").read_text()
    resumed = re.findall(r"resumed from \S+ at step (\d+)", nodes)
    assert resumed and int(resumed[0]) >= 10, nodes[-3000:]
    assert f"done: step {final}" in nodes


def test_a_slurm_job_gets_awkward_values_whole_and_no_files_from_outside(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    """Through sbatch, srun and torchrun: an environment value full of quotes and shell
    syntax reaches the worker byte for byte and runs nothing; a link the job plants at an
    artifact path brings nothing from outside, and the launch names it in one line."""
    from tests.fuzz_support import files_under
    from tests.tml.launch.test_launch_injection import AWKWARD

    work, secret = tmp_path / "work", tmp_path / "secret"
    work.mkdir()
    secret.mkdir()
    (secret / "key").write_text("SECRET")
    (work / "script.py").write_text(
        "import json, os\n"
        "json.dump(dict(os.environ), open('worker-env.json', 'w'))\n"
        "os.makedirs('ckpt', exist_ok=True)\n"
        "open('ckpt/ok.txt', 'w').write('model')\n"
        f"os.symlink({str(secret)!r}, 'leak')\n"
        f"os.symlink({str(secret / 'key')!r}, 'ckpt/inner')\n")
    path = write_workflow(work, environment={"TML_AWKWARD": AWKWARD, "PYTHONPATH": str(REPO)},
                          artifacts=["ckpt", "leak"])
    runs = tmp_path / "runs"
    result = launch([str(path), "--backend", "slurm", "--runs-dir", str(runs)],
                    env=slurm_env(slurm), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    (run_dir,) = (runs / "wf").iterdir()
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: artifact 'leak': resolves outside {work} (through a symbolic "
                    f"link); not copied; see {run_dir}/refused-artifacts")
    assert json.loads((work / "worker-env.json").read_text())["TML_AWKWARD"] == AWKWARD
    assert not (work / "MARKER").exists()
    assert files_under(run_dir / "artifacts") == {"ckpt", "ckpt/ok.txt"}
    assert files_under(secret) == {"key"}
