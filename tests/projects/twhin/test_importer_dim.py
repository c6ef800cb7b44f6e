"""`twhin import` chooses the embedding dim when `--dim` is not given (issue 20, third round).

Few relations per batch: LARGE_DIM, halved while the tables' fp32 weights would pass
MAX_TABLE_BYTES; many relations per batch: SMALL_DIM (the dim those settings were chosen
at); a given `--dim` always wins. Checked on statistics alone and through imports of
generated graphs of each shape.
"""

import shutil

import pytest
import yaml

from projects.twhin.data.kg_generate import generate
from projects.twhin.importer import (
    LARGE_DIM,
    MAX_TABLE_BYTES,
    SMALL_DIM,
    SPARSE_DIM,
    choose_defaults,
    import_triples,
)
from tml.errors import DataError

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


def test_sparse_graphs_start_from_the_sparse_dim_also_halved_to_fit():
    edges, per_relation = FEW                      # 2 x 1.96M edge ends
    assert SPARSE_DIM == 256 > LARGE_DIM
    sparse = choose_defaults(edges, per_relation, [200_000, 200_000])   # 9.8 ends per entity
    dense = choose_defaults(edges, per_relation, [190_000, 190_000])    # 10.3
    assert (sparse.dim, dense.dim) == (SPARSE_DIM, LARGE_DIM)
    assert "dim 256 (a sparse graph" in sparse.reason
    rows = MAX_TABLE_BYTES // (4 * SPARSE_DIM)     # sparse, and past 4 GiB at 256: halved
    assert choose_defaults(edges, per_relation, [rows]).dim == SPARSE_DIM
    assert choose_defaults(edges, per_relation, [rows + 1]).dim == LARGE_DIM


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
    # patterns: ~16 training edge ends per entity; longtail: ~6.4, a sparse graph
    for shape, entities, edges, dim, why in (
            ("patterns", 2000, 25000, LARGE_DIM, "(validation MRR rose"),
            ("longtail", 1500, 6000, SPARSE_DIM, "(a sparse graph: with N3 0.03")):
        result, text, config = _imported(tmp_path, shape, entities, edges)
        assert "shared by the batch" in result["defaults"], shape      # few relations
        tables = config["model"]["embeddings"]["tables"]
        assert {t["embedding_dim"] for t in tables} == {dim}, shape
        assert f"dim {dim} {why}" in text.splitlines()[1], shape
        assert {r["operator"] for r in config["model"]["relations"]} == {"complex_diagonal"}


def test_a_given_dim_is_written_as_given(tmp_path):
    result, text, config = _imported(tmp_path, "longtail", 1500, 6000, dim=16)
    assert {t["embedding_dim"] for t in config["model"]["embeddings"]["tables"]} == {16}
    assert "dim 16 (--dim)" in result["defaults"]


def _tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def test_day_two_keeps_the_earlier_imports_dim_so_its_checkpoint_warm_starts(tmp_path):
    day1 = [(f"user:u{i % 300}", "likes", f"item:i{(7 * i) % 97}") for i in range(1300)]
    day2 = day1 + [("user:new", "likes", "item:i1")]
    import_triples(_tsv(tmp_path / "d1.tsv", day1), str(tmp_path / "day1"), dim=16)
    result = import_triples(_tsv(tmp_path / "d2.tsv", day2), str(tmp_path / "day2"),
                            vocab=str(tmp_path / "day1" / "vocab"))
    config = yaml.safe_load((tmp_path / "day2" / "config.yaml").read_text())
    assert {t["embedding_dim"] for t in config["model"]["embeddings"]["tables"]} == {16}
    assert "dim 16 (the earlier import's, --vocab)" in result["defaults"]
    # PREVIOUS given as the earlier OUT works the same; a given --dim still wins.
    result = import_triples(str(tmp_path / "d2.tsv"), str(tmp_path / "day2b"),
                            vocab=str(tmp_path / "day1"), dim=24)
    assert "dim 24 (--dim)" in result["defaults"]
    # A vocab/ copied without its config: the rule chooses.
    shutil.copytree(tmp_path / "day1" / "vocab", tmp_path / "alone" / "vocab")
    result = import_triples(str(tmp_path / "d2.tsv"), str(tmp_path / "day2c"),
                            vocab=str(tmp_path / "alone" / "vocab"))
    assert f"dim {SPARSE_DIM} (a sparse graph" in result["defaults"]    # 6.5 ends per entity
    # An earlier config that does not say a dim: one line naming it, nothing written.
    (tmp_path / "day1" / "config.yaml").write_text("model: {embeddings: {tables: []}}\n")
    with pytest.raises(DataError, match=r"day1/config.yaml: cannot read model.embeddings"
                       r".tables\[0\].embedding_dim .*give --dim") as error:
        import_triples(str(tmp_path / "d2.tsv"), str(tmp_path / "day2d"),
                       vocab=str(tmp_path / "day1"))
    assert "\n" not in str(error.value) and not (tmp_path / "day2d").exists()
