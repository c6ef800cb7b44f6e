"""dstack's torchrun example and run management on the test SLURM cluster
(tests/slurm_cluster.py): the workflow file as the provider writes it, its requirements
file installed into the run's environment, `tml runs` and `tml stop` through scancel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster
from tests.tml.launch.test_launch_dstack import (
    EXAMPLE,
    SLEEPER,
    USES_THE_PACKAGE,
    dstack_repo,
    entry,
    workflows_file,
    write_wheel,
)
from tests.twhin_setup import launcher_env
from tml.launch.local import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as error:
        pytest.skip(str(error))
    try:
        yield cluster
    finally:
        cluster.stop()


def env(cluster: SlurmCluster) -> dict[str, str]:
    return launcher_env(SLURM_CONF=str(cluster.conf), TML_RDZV_PORT=str(free_port()))


def tml(argv: list[str], cwd: Path, environment: dict[str, str],
        timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tml.launch.cli import main; main()",
                           *argv], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_the_dstack_example_runs_on_two_slurm_nodes_with_its_requirements(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    """`tml launch train --backend slurm` in a dstack repository: the batch script installs
    requirements.txt (a local wheel) into <run-dir>/env, both nodes run that environment's
    python, the gloo all_reduce sums both ranks, and `model` comes back."""
    wheel = write_wheel(tmp_path / "dist")
    dstack_repo(tmp_path, EXAMPLE + "    environment:\n      - PIP_NO_INDEX=1\n")
    (tmp_path / "train.py").write_text(USES_THE_PACKAGE)
    (tmp_path / "requirements.txt").write_text(f"./dist/{wheel.name}\n")
    result = tml(["launch", "train", "--backend", "slurm", "--runs-dir", "runs"], tmp_path,
                 env(slurm))
    assert result.returncode == 0, result.stderr[-4000:] + slurm.log_tail("slurmctld")
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "artifacts" / "model" / "weights.txt").read_text() == \
        f"from the run env {run_dir / 'env'} world=2 sum=3\n"
    assert "Successfully installed tmlreqprobe-0.1" in \
        (run_dir / "logs" / "requirements.log").read_text()
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["backend"], record["status"], record["exit_code"]) == ("slurm", "done", 0)
    assert record["job_id"] == (run_dir / "job-id").read_text().strip()


def test_a_slurm_run_is_listed_and_stopped_with_scancel(slurm: SlurmCluster,
                                                        tmp_path: Path) -> None:
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    path = workflows_file(tmp_path, entry("sleepy", file="sleeper.py", nodes=2,
                                          artifacts=["progress"]))
    environment = env(slurm)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tml.launch", "--file", str(path), "--workflow", "sleepy",
         "--backend", "slurm", "--runs-dir", "runs"], cwd=tmp_path, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("progress/started-*"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, \
                launcher.communicate()[1][-3000:] if launcher.poll() is not None else ""
            time.sleep(0.5)
        (run_dir,) = (tmp_path / "runs" / "sleepy").iterdir()
        listing = tml(["runs"], tmp_path, environment).stdout.splitlines()
        assert listing[1].split()[:4] == ["sleepy", run_dir.name, "slurm", "running"]
        stopped = tml(["stop", "sleepy"], tmp_path, environment)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"sleepy/{run_dir.name}: stopped"
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2
    assert err.strip().splitlines()[-1] == \
        f"error: run sleepy/{run_dir.name} stopped; logs and artifacts in {run_dir}"
    slurm.wait_for_empty_queue()
    assert tml(["runs"], tmp_path, environment).stdout.splitlines()[1].split()[3] == "stopped"
