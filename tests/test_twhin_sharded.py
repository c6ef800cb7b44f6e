"""A sharded TwHIN step on 2 gloo workers equals plain torch on the full tables."""

import os

import pytest

from tests.twhin_setup import REPO
from tml.common.run_training import launch_function


@pytest.fixture(autouse=True)
def _importable_repo(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_forward_backward_and_update_match_reference_for_every_sharding_type():
    from tests.distributed_checks import sharded_matches_unsharded

    types = ["table_wise", "row_wise", "column_wise"]
    results = launch_function(sharded_matches_unsharded, 2, types)
    assert sorted(results) == [0, 1]
    for rank, per_type in results.items():
        for sharding_type in types:
            diffs = per_type[sharding_type]
            assert diffs["changed"] > 1e-3, (rank, sharding_type, diffs)  # the step did update
            for key, value in diffs.items():
                if key != "changed":
                    assert value < 1e-5, (rank, sharding_type, key, diffs)


@pytest.mark.slow
def test_global_negatives_and_operators_match_reference_when_sharded():
    """Global negative ids travel in the batch KJT through the sharded tables."""
    from tests.distributed_checks import sharded_matches_unsharded

    types = ["table_wise", "row_wise"]
    results = launch_function(sharded_matches_unsharded, 2, types, 2,
                              ("translation", "diagonal", "complex_diagonal"))
    for rank, per_type in results.items():
        for sharding_type in types:
            diffs = per_type[sharding_type]
            assert diffs["changed"] > 1e-3, (rank, sharding_type, diffs)
            for key, value in diffs.items():
                if key != "changed":
                    assert value < 1e-5, (rank, sharding_type, key, diffs)


@pytest.mark.slow
def test_adam_on_the_tables_is_refused_on_cpu_by_table_name():
    from tests.distributed_checks import adam_tables_train
    from tml.errors import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="ConfigError: table 'user': adam is not "
                                                  "available for embedding tables on CPU"):
        launch_function(adam_tables_train, 1)
