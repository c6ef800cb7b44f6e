"""`projects.twhin.fit`: import, train (2 spawned workers), evaluate and export from Python.

The slow test fits a tiny graph and checks every field of the result against the files the
commands wrote; the fast ones check that bad input is refused in one line before any worker
starts, and that a user's directory is never reused.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from projects.twhin import fit
from projects.twhin.neighbors import Embeddings
from tml.errors import ConfigError, DataError


def _graph(users: int = 40, items: int = 10, seed: int = 0) -> pa.Table:
    """Users buy the items of their group and follow their neighbours: learnable."""
    rng = np.random.default_rng(seed)
    rows = set()
    for _ in range(2000):
        u, i = int(rng.integers(users)), int(rng.integers(items))
        rows.add((f"user:u{u}", "buys", f"item:i{(u + i % 3) % items}"))
        rows.add((f"user:u{u}", "follows", f"user:u{(u + 1 + i % 2) % users}"))
    heads, relations, tails = zip(*sorted(rows))
    return pa.table({"head": heads, "relation": relations, "tail": tails})


@pytest.mark.slow
def test_fit_a_tiny_graph_returns_config_metrics_evaluation_and_embeddings(tmp_path):
    result = fit(_graph(), dim=8, nproc_per_node=2, **{"training.num_train_steps": 40})
    save_dir = result.save_dir
    assert os.path.basename(save_dir).startswith("twhin-fit-") and os.path.isdir(save_dir)
    # the config used: the import's, with the override
    assert result.config.training.num_train_steps == 40
    assert result.config.model.embeddings.tables[0].embedding_dim == 8
    # metrics history: save_dir/metrics.jsonl, as written
    with open(os.path.join(save_dir, "metrics.jsonl")) as handle:
        assert result.metrics == [json.loads(line) for line in handle]
    assert [r["step"] for r in result.metrics if r["kind"] == "train"][-1] == 40
    assert result.train[0]["final_step"] == result.train[1]["final_step"] == 40
    # evaluation: twhin evaluate's result on the test split, popularity baseline included
    evaluation = result.evaluation
    assert evaluation["split"] == "test" and evaluation["count"] > 0
    for key in ("mrr", "hits_at_1", "hits_at_3", "hits_at_10"):
        assert 0 <= evaluation[key] <= 1
    assert 0 < evaluation["popularity"]["mrr"] <= 1
    assert evaluation["checkpoint"] == os.path.join(save_dir, "40")
    # embeddings: the export's arrays, by id
    ids, vectors = result.vectors("user")
    exported = pq.read_table(os.path.join(result.embeddings_dir, "user.parquet"))
    assert ids == exported.column("id").to_pylist() and vectors.shape == (40, 8)
    np.testing.assert_array_equal(vectors, np.array(exported.column("vector").to_pylist(),
                                                    np.float32))
    np.testing.assert_array_equal(result.vector("user:u3"), vectors[ids.index("user:u3")])
    # neighbours: the relation's operator, best first; and the plain nearest rows
    best = result.neighbors("user:u3", "buys", k=3)
    again = Embeddings.load(result.embeddings_dir).neighbors("user:u3", "buys", k=3,
                                                             exact=True)
    assert best == again and len(best) == 3 and all(i.startswith("item:") for i, _ in best)
    assert [s for _, s in best] == sorted((s for _, s in best), reverse=True)
    near = result.neighbors("user:u3", k=5)
    assert len(near) == 5 and "user:u3" not in [i for i, _ in near]


def test_bad_overrides_are_one_line_errors_naming_the_key(tmp_path):
    for overrides, match in (({"training.num_train_stepz": 3}, "training.num_train_stepz"),
                             ({"training.num_train_steps": "many"}, "training.num_train_steps"),
                             ({"epochs": 3}, "'epochs' is neither an argument of fit"),
                             ({"training.num_train_steps": object()}, "cannot be a config")):
        save_dir = tmp_path / f"run{len(os.listdir(tmp_path))}"
        with pytest.raises(ConfigError, match=match) as error:
            fit(_graph(), save_dir=str(save_dir), **overrides)
        assert "\n" not in str(error.value)
        assert not (save_dir / "40").exists()


def test_bad_triples_are_refused_naming_the_input_and_row(tmp_path):
    table = _graph()
    heads = table.column("head").to_pylist()
    heads[4] = None
    broken = table.set_column(0, "head", pa.array(heads, pa.string()))
    with pytest.raises(DataError, match=r"^triples \(Table\): row 5: column 'head' is null$"):
        fit(broken, save_dir=str(tmp_path / "a"))
    with pytest.raises(DataError, match="expected a pandas DataFrame, a pyarrow Table or a "
                       "path, got list"):
        fit([("a", "r", "b")], save_dir=str(tmp_path / "b"))
    with pytest.raises(DataError, match="needs columns head, relation, tail"):
        fit(table.select(["head", "relation"]), save_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no such file"):
        fit(str(tmp_path / "missing.tsv"), save_dir=str(tmp_path / "d"))


def test_no_test_split_to_evaluate_is_refused_before_training_and_leaves_no_temp_dir(
        tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    table = _graph()
    with pytest.raises(ConfigError, match="the import has no test split"):
        fit(table.slice(0, 150), valid=table.slice(150, 50))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("twhin-fit-")]


def test_a_users_directory_is_never_reused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not empty: fit\\(\\) never"):
        fit(_graph(), save_dir=str(mine))
    assert os.listdir(mine) == ["notes.txt"]
