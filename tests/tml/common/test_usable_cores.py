"""The default thread count follows the cores a process may use (taskset, cpusets, SLURM
binding), not the host's core count."""

from __future__ import annotations

import os

import pytest

from tml.common.run_training import usable_cores, worker_environment


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and 2 usable cores")
def test_a_process_pinned_to_one_core_counts_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = os.sched_getaffinity(0)
    assert usable_cores() == len(before)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1 < (os.cpu_count() or 1)
        assert worker_environment(1, 0)["OMP_NUM_THREADS"] == "1"
    finally:
        os.sched_setaffinity(0, before)
    cores = len(before)
    assert worker_environment(1, 0)["OMP_NUM_THREADS"] == str(max(1, cores // 2))


def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert "OMP_NUM_THREADS" not in worker_environment(2, 0)
