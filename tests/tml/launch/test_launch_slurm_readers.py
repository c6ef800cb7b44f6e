"""`tml launch --backend slurm` with `readers: {per_node: 1}` on the real two-node test
cluster (tests/slurm_cluster.py): each node's script starts its reader, then its agent;
both trainers are served by their own node's reader and the run trains to its final step.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster
from tests.tml.launch.test_launch_slurm import slurm_env
from tests.tml.launch.test_launch_workflow import (  # noqa: F401 (tiny_graph is a fixture)
    expected_final_step,
    launch,
    tiny_graph,
    tiny_twhin_workflow,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as error:
        require(False, f"SLURM: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_each_slurm_node_starts_its_readers_and_the_run_trains(
        slurm: SlurmCluster, tmp_path: Path, tiny_graph: Path) -> None:  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    path = tiny_twhin_workflow(work, tiny_graph, name="twhin-slurm-readers")
    workflow = yaml.safe_load(path.read_text())
    workflow["readers"] = {"per_node": 1, "start_timeout_s": 240}
    path.write_text(yaml.safe_dump(workflow))
    start = time.monotonic()
    result = launch([str(path), "--backend", "slurm", "--runs-dir", str(tmp_path / "runs")],
                    env=slurm_env(slurm))
    assert result.returncode == 0, result.stderr[-4000:] + slurm.log_tail("slurmctld")
    print(f"tml launch --backend slurm with readers took {time.monotonic() - start:.1f} s")
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    final = expected_final_step(tiny_graph, world_size=2)
    assert (run_dir / "artifacts" / "checkpoints" / str(final)).is_dir()
    logs = [(run_dir / "logs" / f"node-{n}.log").read_text() for n in range(2)]
    for log in logs:
        # Each node: its own reader on 127.0.0.1, serving the rank its trainer got.
        assert "started 1 reader(s) beside the trainers: 127.0.0.1:" in log, log[-3000:]
        assert re.search(r"serving rank [01] \(part 0 of 1\) from batch 0", log), log[-3000:]
        assert "reader 0 stopped after" in log
    assert f"done: step {final}" in logs[0] + logs[1]
