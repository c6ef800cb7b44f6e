"""`twhin import --vocab PREVIOUS`: day 2's import keeps every day-1 id at its row and
every relation at its index, appends the new ones, and refuses a damaged or hostile
PREVIOUS with one line before anything is written."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given

from projects.twhin.importer import import_triples, previous_vocabulary, read_vocabulary
from tests.fuzz_support import FUZZ_SETTINGS, files_under, mutated, outcome
from tml.errors import DataError

DAY1 = [("user:a", "buys", "item:x"), ("user:b", "buys", "item:y"),
        ("user:a", "follows", "user:b"), ("user:c", "buys", "item:x")]
DAY2 = [("user:d", "likes", "item:z"), ("user:b", "buys", "item:x"),
        ("user:e", "follows", "user:a"), ("user:a", "buys", "item:w")]


def _tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def _day1(tmp_path):
    out = tmp_path / "day1"
    import_triples(_tsv(tmp_path / "d1.tsv", DAY1), str(out), split="1,0,0")
    return out


def test_known_ids_keep_their_rows_and_new_ones_are_appended(tmp_path):
    day1 = _day1(tmp_path)
    summary = import_triples(_tsv(tmp_path / "d2.tsv", DAY2), str(tmp_path / "day2"),
                             split="1,0,0", vocab=str(day1 / "vocab"))
    old, old_relations = read_vocabulary(str(day1 / "vocab"))
    new, new_relations = read_vocabulary(str(tmp_path / "day2" / "vocab"))
    for table, ids in old.items():
        assert list(new[table][:len(ids)]) == list(ids)
    assert list(new["user"][len(old["user"]):]) == ["user:d", "user:e"]
    assert list(new["item"][len(old["item"]):]) == ["item:z", "item:w"]
    assert new_relations[:len(old_relations)] == old_relations
    assert new_relations[len(old_relations):] == ["likes"]
    assert summary["appended"] == {"user": 2, "item": 2}
    # The import's OUT works as PREVIOUS too, and an id seen only on day 1 keeps its row.
    import_triples(_tsv(tmp_path / "d3.tsv", [("user:f", "buys", "item:x")]),
                   str(tmp_path / "day3"), split="1,0,0", vocab=str(tmp_path / "day2"))
    day3, _ = read_vocabulary(str(tmp_path / "day3" / "vocab"))
    assert list(day3["user"]) == list(new["user"]) + ["user:f"]
    # Edges are mapped with the kept rows.
    edges = pq.read_table(tmp_path / "day3" / "train" / "part-00000.parquet").to_pylist()
    assert edges == [{"lhs": 5, "rel": 0, "rhs": 0}]


def _write_tables(vocab, tables):
    os.makedirs(vocab / "tables", exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, vocab / "tables" / f"{name}.parquet")


@pytest.mark.parametrize("tables,message", [
    ({"user": pa.table({"id": ["user:a", "user:a"], "row": [0, 1]})},
     "table file user.parquet: id 'user:a' is at rows 0 and 1"),
    ({"user": pa.table({"id": ["user:a", "item:x"], "row": [0, 1]})},
     "table file user.parquet: row 1 holds id 'item:x' of entity type 'item', not 'user'"),
    ({"user": pa.table({"id": ["user:a", None], "row": [0, 1]})},
     "table file user.parquet: row 1 has no id"),
    ({"..": pa.table({"id": ["x"], "row": [0]})}, None),
    ({"user": pa.table({"id": ["user:a", "user:b"], "row": [0, 5]})},
     "user.parquet: column 'row' must number the rows 0..1, each once"),
])
def test_a_bad_previous_vocab_is_refused_in_one_line_and_nothing_is_written(
        tmp_path, tables, message):
    vocab = tmp_path / "prev" / "vocab"
    _write_tables(vocab, tables)
    triples = _tsv(tmp_path / "d2.tsv", DAY2)
    before = files_under(tmp_path)
    with pytest.raises(DataError) as error:
        import_triples(triples, str(tmp_path / "out"), vocab=str(vocab))
    text = str(error.value)
    assert "\n" not in text
    assert text.endswith(message) if message else "not a valid name" in text or \
        "no tables" in text
    assert files_under(tmp_path) == before


def test_bad_relations_and_missing_vocab_are_refused(tmp_path):
    vocab = tmp_path / "prev" / "vocab"
    _write_tables(vocab, {"user": pa.table({"id": ["user:a"], "row": [0]})})
    relations = vocab / "relations.parquet"
    pq.write_table(pa.table({"name": ["r", "s"], "index": [0, 0], "lhs": ["user", "user"],
                             "rhs": ["user", "user"]}), relations)
    with pytest.raises(DataError, match=r"column 'index' must number the relations 0\.\.1"):
        previous_vocabulary(str(vocab))
    pq.write_table(pa.table({"name": ["r"], "index": [0], "lhs": ["user"],
                             "rhs": ["../etc"]}), relations)
    with pytest.raises(DataError, match="relation 'r' names table '../etc', which has no "
                       "table file"):
        previous_vocabulary(str(vocab))
    with pytest.raises(DataError, match="not a directory"):
        previous_vocabulary(str(tmp_path / "nowhere"))
    # --out may not be the import holding PREVIOUS (replacing it would delete the input).
    day1 = _day1(tmp_path)
    with pytest.raises(DataError, match="holds the input"):
        import_triples(_tsv(tmp_path / "d2.tsv", DAY2), str(day1), vocab=str(day1 / "vocab"),
                       force=True)


def test_fuzzed_previous_vocab_files_give_a_vocabulary_or_one_line(tmp_path):
    day1 = _day1(tmp_path)
    good = (day1 / "vocab" / "tables" / "user.parquet").read_bytes()
    good_relations = (day1 / "vocab" / "relations.parquet").read_bytes()

    @FUZZ_SETTINGS
    @given(mutated(good), mutated(good_relations))
    def check(table_bytes, relation_bytes):
        (day1 / "vocab" / "tables" / "user.parquet").write_bytes(table_bytes)
        (day1 / "vocab" / "relations.parquet").write_bytes(relation_bytes)
        outcome(lambda: previous_vocabulary(str(day1)))

    check()


def test_cli_vocab_appends_and_a_bad_one_is_error_line_exit_2(tmp_path, capsys):
    from projects.twhin.cli import main

    day1 = _day1(tmp_path)
    main(["import", "--triples", _tsv(tmp_path / "d2.tsv", DAY2), "--out",
          str(tmp_path / "day2"), "--split", "1,0,0", "--vocab", str(day1)])
    new, _ = read_vocabulary(str(tmp_path / "day2" / "vocab"))
    assert list(new["user"][:3]) == ["user:a", "user:b", "user:c"]
    pq.write_table(pa.table({"id": ["user:a", "user:a"], "row": [0, 1]}),
                   day1 / "vocab" / "tables" / "user.parquet")
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["import", "--triples", str(tmp_path / "d2.tsv"), "--out",
              str(tmp_path / "day3"), "--vocab", str(day1)])
    assert code.value.code == 2
    assert capsys.readouterr().err == (f"error: --vocab {day1}: table file user.parquet: id "
                                       "'user:a' is at rows 0 and 1\n")
    assert not (tmp_path / "day3").exists()
