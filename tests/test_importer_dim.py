"""`twhin import` chooses the embedding dim when `--dim` is not given (issue 20, third round).

Few relations per batch: LARGE_DIM, halved while the tables' fp32 weights would pass
MAX_TABLE_BYTES; many relations per batch: SMALL_DIM (the dim those settings were chosen
at); a given `--dim` always wins. Checked on statistics alone and through imports of
generated graphs of each shape.
"""

import yaml

from projects.twhin.data.kg_generate import generate
from projects.twhin.importer import (
    LARGE_DIM,
    MAX_TABLE_BYTES,
    SMALL_DIM,
    choose_defaults,
    import_triples,
)

FEW = (1_960_000, [490_000, 490_000, 490_000, 490_000])   # same_relation 250


def test_few_relations_get_the_large_dim_unless_the_tables_would_not_fit():
    edges, per_relation = FEW
    assert choose_defaults(edges, per_relation, [100_000, 20_000]).dim == LARGE_DIM == 128
    # Halved while rows * dim * 4 bytes > MAX_TABLE_BYTES, never below SMALL_DIM.
    rows = MAX_TABLE_BYTES // (4 * LARGE_DIM)
    assert choose_defaults(edges, per_relation, [rows]).dim == LARGE_DIM
    assert choose_defaults(edges, per_relation, [rows + 1]).dim == LARGE_DIM // 2
    assert choose_defaults(edges, per_relation, [rows // 2, rows // 2 + 1]).dim == 64
    assert choose_defaults(edges, per_relation, [4 * rows + 1]).dim == SMALL_DIM
    assert choose_defaults(edges, per_relation, [10**12]).dim == SMALL_DIM
    d = choose_defaults(edges, per_relation, [100_000])
    assert "dim 128 (validation MRR rose with the dim" in d.reason


def test_many_relations_keep_the_small_dim_and_a_given_dim_wins():
    counts = [1592 // 55] * 55                               # Nations-like
    assert choose_defaults(1592, counts, [14]).dim == SMALL_DIM == 32
    edges, per_relation = FEW
    given = choose_defaults(edges, per_relation, [100_000], 48)
    assert given.dim == 48 and "dim 48 (--dim)" in given.reason
    assert choose_defaults(edges, per_relation, [100_000], 31).operator == "diagonal"
    assert choose_defaults(1592, counts, [14], 200).dim == 200


def _imported(tmp_path, shape, entities, edges, dim=None):
    raw, out = tmp_path / f"{shape}_raw", tmp_path / f"{shape}_out"
    generate(str(raw), shape, entities=entities, edges=edges, seed=5)
    result = import_triples(str(raw / "train.tsv"), str(out), valid=str(raw / "valid.tsv"),
                            test=str(raw / "test.tsv"), dim=dim)
    text = (out / "config.yaml").read_text()
    return result, text, yaml.safe_load(text)


def test_generated_graphs_of_each_shape_get_the_large_dim_written_with_the_reason(tmp_path):
    for shape, entities, edges in (("patterns", 2000, 25000), ("longtail", 1500, 6000)):
        result, text, config = _imported(tmp_path, shape, entities, edges)
        assert "shared by the batch" in result["defaults"], shape      # few relations
        tables = config["model"]["embeddings"]["tables"]
        assert {t["embedding_dim"] for t in tables} == {LARGE_DIM}, shape
        assert f"dim {LARGE_DIM} (validation MRR rose" in text.splitlines()[1], shape
        assert {r["operator"] for r in config["model"]["relations"]} == {"complex_diagonal"}


def test_a_given_dim_is_written_as_given(tmp_path):
    result, text, config = _imported(tmp_path, "longtail", 1500, 6000, dim=16)
    assert {t["embedding_dim"] for t in config["model"]["embeddings"]["tables"]} == {16}
    assert "dim 16 (--dim)" in result["defaults"]
