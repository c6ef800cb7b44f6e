"""One ranker step on 2 gloo workers, tables sharded row_wise and column_wise, equals the same
step unsharded in one process on both workers' batches (logits, tables, dense weights; not
batch-norm running statistics, which the reference updates once per worker batch)."""

import os

import pytest

from tests.launch_checks import launch_checks
from tests.twhin_setup import REPO


@pytest.mark.slow
def test_sharded_step_equals_unsharded():
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + (previous or "")
    try:
        from tests.recap_distributed_checks import recap_sharded_matches_unsharded

        results = launch_checks(recap_sharded_matches_unsharded, 2)
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    assert sorted(results) == [0, 1]
    for rank, diffs in results.items():
        assert diffs["tables_changed"] > 1e-3, diffs          # the step did move the tables
        assert any(k.startswith("table ") for k in diffs), diffs
        bad = {k: v for k, v in diffs.items() if k != "tables_changed" and not v < 1e-5}
        assert not bad, (rank, bad)
