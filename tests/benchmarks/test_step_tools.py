"""The step-time tools on the tiny graph, each in its own process (they set up a one-worker
process group in the process that runs them): `benchmarks.step_wall` takes every part of a
step apart consistently, and `benchmarks.local_dists` trains both ways to the same losses."""

import json
import os
import subprocess
import sys

import pytest

from tests.twhin_setup import REPO


def _run(tmp_path, module: str, *args: str) -> dict:
    out = tmp_path / f"{module}.json"
    env = {**os.environ, "PYTHONPATH": REPO}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--steps", "30",
                    *args, "--out", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    return json.load(open(out))


@pytest.mark.slow
@pytest.mark.parametrize("batches", ["prefetch", "inline", "memory"])
def test_step_wall_parts_add_up(tmp_path, batches):
    report = _run(tmp_path, "step_wall", "--batches", batches, "--skip", "5")
    assert report["batches"] == batches and report["steps"] == 30 - 1   # the last step has no next iteration
    step = {key: value["mean_ms"] for key, value in report["per_step"].items()}
    # An iteration is the step plus the loop's own Python around it (same clock).
    assert step["iteration"] == pytest.approx(step["wall"] + step["outside_progress"],
                                              rel=1e-6)
    assert 0 < step["thread_cpu"] <= step["process_cpu"] + 1e-6
    assert step["outside_progress"] > 0 and step["batch_wait"] >= 0
    # Only the prefetch thread is a reader thread; memory batches are never waited for.
    assert (step["reader_cpu"] > 0) == (batches == "prefetch")
    if batches == "memory":
        assert step["batch_wait"] < 0.05


@pytest.mark.slow
def test_step_wall_trains_on_the_batch_size_asked_for(tmp_path):
    report = _run(tmp_path, "step_wall", "--batches", "memory", "--skip", "5", "--batch", "24")
    assert report["batch_rows"] == 24 and report["sizes"]["batch"] == 24
    default = _run(tmp_path, "step_wall", "--batches", "memory", "--skip", "5")
    assert default["batch_rows"] == default["sizes"]["batch"] != 24


@pytest.mark.slow
def test_local_dists_train_like_torchrecs_all_to_alls(tmp_path):
    report = _run(tmp_path, "local_dists")
    assert report["losses_equal"] is True
    assert report["steps"] == 30 - 10
    for side in ("torchrec", "local"):
        assert report[f"{side}_thread_ms_median"] > 0
