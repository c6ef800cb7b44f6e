"""`twhin import` against hostile or mistaken input: names from the data, unreadable bytes,
unwritable destinations, a --force that would delete something.

Every case performs the attack or the mistake for real and checks the one-line message
(file and line or row) and that nothing was written anywhere, nor anything lost.
"""

import os
import resource
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from projects.twhin.config import TwhinConfig
from projects.twhin.data.data import create_dataset
from projects.twhin.importer import RESERVED_NAMES, import_triples, read_vocabulary
from projects.twhin.triples import MAX_LINE_CHARS
from tests.fuzz_support import files_under
from tests.twhin_setup import REPO, launcher_env
from tml.core.config import load_config_from_yaml
from tml.errors import DataError

GOOD = [("user:a", "buys", "item:x"), ("user:b", "buys", "item:y"),
        ("user:a", "follows", "user:b"), ("tag1", "near", "tag2")]


def _tsv(path, rows, extra=b""):
    path.write_bytes("".join("\t".join(r) + "\n" for r in rows).encode() + extra)
    return str(path)


def _refused(tmp_path, triples, message, **kwargs):
    """Import `triples` into tmp_path/out; the DataError's text must equal `message`, and
    nothing may appear in, or vanish from, tmp_path (or its parent)."""
    before, around = files_under(tmp_path), files_under(tmp_path.parent)
    with pytest.raises(DataError) as error:
        import_triples(triples, str(tmp_path / "out"), **kwargs)
    assert str(error.value) == message
    assert "\n" not in str(error.value)
    assert files_under(tmp_path) == before
    assert files_under(tmp_path.parent) == around
    return error.value


# -- names from the data --------------------------------------------------------------------


@pytest.mark.parametrize("entity", ["../../x:evil", "/etc:passwd", "..:x", ".hidden:x",
                                    "a/b:x", "a b:x", "ü:x", "x" * 65 + ":y", ":x",
                                    "a.b:x", "a\\b:x"])
def test_entity_types_that_are_not_names_are_refused_with_file_and_line(tmp_path, entity):
    path = _tsv(tmp_path / "t.tsv", GOOD + [(entity, "buys", "item:x")])
    kind = entity.split(":", 1)[0]
    _refused(tmp_path, path, f"{path}: line 5: entity type {kind!r} is not a valid name: use "
             "1-64 ASCII letters, digits, '_' or '-', starting with a letter or '_'")


def test_a_traversing_type_writes_nothing_outside_out(tmp_path):
    # Deeper than tmp_path: '../../x' from out/vocab/tables would land in tmp_path/x.
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    path = _tsv(work / "t.tsv", [("../../../x:1", "r", "y:2")])
    before = files_under(tmp_path)
    with pytest.raises(DataError, match=r"line 1: entity type '\.\./\.\./\.\./x' is not a "):
        import_triples(path, str(work / "out"))
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_reserved_types_are_refused_in_any_letter_case(tmp_path, name):
    # 'relations' is the case of the issue: vocab/relations.parquet (and export's
    # relations.parquet) would be where table 'relations' goes.
    path = _tsv(tmp_path / "t.tsv", [(f"{name.upper()}:a", "r", "b")])
    reserved = ", ".join(sorted(RESERVED_NAMES))
    _refused(tmp_path, path, f"{path}: line 1: entity type {name.upper()!r} is reserved "
             f"(reserved names: {reserved})")


def test_types_differing_only_in_case_are_refused(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD + [("User:c", "likes", "item:x")])
    _refused(tmp_path, path, f"{path}: line 5: entity type 'User' differs from 'user' only "
             "in letter case; use one spelling (their files would be one on a "
             "case-insensitive file system)")


def test_tables_live_apart_from_the_relations_file(tmp_path):
    # A table may be called like any file that is not reserved; the layout keeps tables in
    # their own directory, so even the names of the importer's files cannot meet.
    rows = [("relations_x:a", "relations", "parquet:b"), ("entity:c", "x", "d")]
    import_triples(_tsv(tmp_path / "t.tsv", rows), str(tmp_path / "out"), split="1,0,0")
    vocab = tmp_path / "out" / "vocab"
    assert sorted(files_under(vocab)) == [
        "relations.parquet", "tables", "tables/entity.parquet", "tables/parquet.parquet",
        "tables/relations_x.parquet"]
    tables, relations = read_vocabulary(str(vocab))
    assert relations == ["relations", "x"]
    assert tables["entity"].tolist() == ["entity:c", "d"]
    assert pq.read_table(vocab / "relations.parquet").column("name").to_pylist() == \
        ["relations", "x"]


def test_read_vocabulary_still_reads_the_earlier_flat_layout(tmp_path):
    import_triples(_tsv(tmp_path / "t.tsv", GOOD), str(tmp_path / "out"), split="1,0,0")
    vocab = tmp_path / "out" / "vocab"
    for name in os.listdir(vocab / "tables"):
        shutil.move(vocab / "tables" / name, vocab / name)
    os.rmdir(vocab / "tables")
    tables, relations = read_vocabulary(str(vocab))
    assert sorted(tables) == ["entity", "item", "user"] and relations[0] == "buys"


ODD_RELATIONS = ["../../etc/passwd", "/abs", "relations", "config.yaml", "a b", "ünï-cöde",
                 "null", "true", "1", "- x", "#x", "x: y", "'q\"", "{a}", "*anchor", "%", "~",
                 "x" * 500]


def test_odd_relation_names_are_values_only_and_round_trip(tmp_path):
    rows = [(f"user:u{i % 7}", name, f"item:i{i % 5}")
            for i, name in enumerate(ODD_RELATIONS * 3)]
    import_triples(_tsv(tmp_path / "t.tsv", rows), str(tmp_path / "out"), split="1,0,0")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.yaml", "train", "vocab"]
    assert sorted(files_under(out / "vocab")) == ["relations.parquet", "tables",
                                                  "tables/item.parquet", "tables/user.parquet"]
    config = load_config_from_yaml(TwhinConfig, str(out / "config.yaml"))
    assert [r.name for r in config.model.relations] == ODD_RELATIONS
    assert read_vocabulary(str(out / "vocab"))[1] == ODD_RELATIONS
    batch = config.train_data.per_replica_batch_size
    batches = list(create_dataset(config.train_data, config.model))
    assert sum(len(b.rels) for b in batches) == len(rows) // batch * batch


@pytest.mark.parametrize("field, text", [(0, "a\x1bb"), (1, "r\x00"), (2, "x\u2028y"),
                                         (1, "r\x85s")])
def test_control_characters_in_ids_and_relations_are_refused(tmp_path, field, text):
    row = ["user:c", "buys", "item:z"]
    row[field] = text
    path = tmp_path / "t.csv"
    # CSV quoting is the one way to put a control character inside a field
    path.write_text("".join(",".join(r) + "\n" for r in GOOD) + ",".join(
        f'"{v}"' for v in row) + "\n")
    name = ("head", "relation", "tail")[field]
    control = [c for c in text if not c.isprintable()][0]
    _refused(tmp_path, str(path), f"{path}: line 5: {name} {text!r} holds a control "
             f"character ({control!r}); ids and relation names must be printable text")


# -- bytes and lines ------------------------------------------------------------------------


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD, extra=b"user:\xe9t\xe9\tbuys\titem:x\n")
    _refused(tmp_path, path, f"{path}: line 5: not UTF-8 text (byte 0xe9 in the head)")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"\xef\xbb\xbfhead\trelation\ttail\n" + b"user:a\tr\tuser:b\n")
    result = import_triples(str(path), str(tmp_path / "out"), split="1,0,0")
    assert result["tables"] == {"user": 2}


def test_a_line_longer_than_the_limit_is_refused_without_reading_it_whole(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD, extra=b"x" * (3 * MAX_LINE_CHARS))
    _refused(tmp_path, path, f"{path}: line 5: longer than {MAX_LINE_CHARS} characters "
             "(not a file of triples?)")


def test_a_field_over_the_csv_limit_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "t.csv"
    field = "y" * 100_000
    path.write_text("a,r,b\n" + f'"{field}\n{field}",r,b\n' + "c,r,d\n")
    _refused(tmp_path, str(path), f"{path}: line 2: a field is longer than 131072 characters "
             "(a quote that is never closed?)")


@pytest.mark.parametrize("text, line, end", [
    ('a\tr\tb\n"c\tr\td\ne\tr\tf\n', 2, 3),               # runs to the end of the file
    ('a\tr\tb\n\nc\tr\t"d\ne\tr\tf\ng\tr\th', 3, 5),       # after a blank line, no final \n
    ('a\tr\tb\nc\t"r\td\ne\tr"\tf\ng\tr\th\n', 2, 3),        # closed on the next line
])
def test_an_unbalanced_quote_is_reported_on_the_line_it_opens(tmp_path, text, line, end):
    path = tmp_path / "t.tsv"
    path.write_text(text)
    _refused(tmp_path, str(path), f"{path}: line {line}: a quoted field runs on to line {end} "
             "(a quote that is never closed?); ids and relation names cannot hold line "
             "breaks")


def test_wrong_field_count_after_a_multi_line_record_names_its_first_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,r,b\n\n\nc,r\n")
    _refused(tmp_path, str(path), f"{path}: line 4: expected 3 fields (head, relation, tail), "
             "got 2")


# -- parquet --------------------------------------------------------------------------------


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), str(path))
    return str(path)


@pytest.mark.parametrize("head, kind", [
    ([["a"], ["b"], ["c"]], "list<element: string>"),
    ([{"x": 1}, {"x": 2}, {"x": 3}], "struct<x: int64>"),
    (pa.array([b"a", b"b", b"c"], pa.binary()), "binary"),
    ([1.5, 2.5, 3.5], "double"),
    ([True, False, True], "bool"),
])
def test_parquet_columns_of_other_types_are_refused(tmp_path, head, kind):
    path = _parquet(tmp_path / "t.parquet", head=head, relation=["r"] * 3, tail=["x"] * 3)
    _refused(tmp_path, path, f"{path}: column 'head' has type {kind}; expected strings "
             "(or integers)")


@pytest.mark.parametrize("row", [1, 2, 5])
def test_parquet_null_names_the_row_counted_from_1(tmp_path, row):
    relation = ["r"] * 5
    relation[row - 1] = None
    path = _parquet(tmp_path / "t.parquet", head=["a"] * 5, relation=relation, tail=["b"] * 5)
    _refused(tmp_path, path, f"{path}: row {row}: column 'relation' is null")


def test_parquet_rows_are_counted_the_same_way_in_every_message(tmp_path):
    # row 3 links entity -> item where rows 1-2 link entity -> entity
    path = _parquet(tmp_path / "t.parquet", head=["a", "b", "c"], relation=["r"] * 3,
                    tail=["d", "e", "item:f"])
    _refused(tmp_path, path, f"{path}: row 3: relation 'r' links tables entity -> item, but "
             "earlier rows link entity -> entity; a relation must connect the same tables "
             "every time")


def test_parquet_strings_that_are_not_utf8_name_the_row(tmp_path):
    bad = pa.array([b"a", b"b", b"\xff"], pa.binary()).cast(pa.string(), safe=False)
    path = _parquet(tmp_path / "t.parquet", head=bad, relation=["r"] * 3, tail=["x"] * 3)
    _refused(tmp_path, path, f"{path}: row 3: column 'head' is not UTF-8 text")


def test_parquet_empty_strings_and_integer_ids(tmp_path):
    path = _parquet(tmp_path / "t.parquet", head=["a", " "], relation=["r", "r"], tail=["x", "y"])
    _refused(tmp_path, path, f"{path}: row 2: column 'head' is empty")
    ints = _parquet(tmp_path / "i.parquet", head=[1, 2], relation=["r", "r"], tail=[3, 4])
    result = import_triples(ints, str(tmp_path / "out"), split="1,0,0")
    assert result["tables"] == {"entity": 4}


# -- destinations ---------------------------------------------------------------------------


def test_out_under_a_regular_file_is_one_line(tmp_path):
    # Root may write anywhere a mode allows; nobody can create a directory inside a file.
    path = _tsv(tmp_path / "t.tsv", GOOD)
    (tmp_path / "plain").write_text("not a directory\n")
    out = tmp_path / "plain" / "sub" / "out"
    before = files_under(tmp_path)
    with pytest.raises(DataError) as error:
        import_triples(path, str(out))
    assert str(error.value) == f"cannot write {out}: Not a directory"
    assert files_under(tmp_path) == before
    assert (tmp_path / "plain").read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 directory")
def test_out_in_a_read_only_directory_is_one_line(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(DataError, match=rf"^cannot write {locked}/out: Permission denied$"):
        import_triples(path, str(locked / "out"))
    assert os.listdir(locked) == []


def test_a_write_failing_midway_is_one_line_and_leaves_nothing(tmp_path):
    """A full disk, for real: RLIMIT_FSIZE makes writes past 20 kB fail (EFBIG) even for
    root; Python ignores the SIGXFSZ that comes with it."""
    rows = [(f"user:u{i}", f"r{i % 3}", f"item:i{i * 7 % 1000}") for i in range(20_000)]
    path = _tsv(tmp_path / "t.tsv", rows)
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, "-m", "projects.twhin", "import", "--triples",
                             path, "--out", str(out)], capture_output=True, text=True,
                            cwd=REPO, env=launcher_env(), preexec_fn=limit, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: cannot write {out}: ")
    assert "File too large" in result.stderr and result.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == ["t.tsv"]


def test_output_directory_gets_the_umask_not_mkdtemps_0700(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD)
    old = os.umask(0o022)
    try:
        import_triples(path, str(tmp_path / "out"))
        os.umask(0o027)
        import_triples(path, str(tmp_path / "out2"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "out" / "vocab").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "out" / "config.yaml").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "out2").st_mode & 0o777 == 0o750


def test_force_never_deletes_the_input_or_a_foreign_directory(tmp_path):
    path = _tsv(tmp_path / "t.tsv", GOOD)
    # --out is the directory holding the input: replacing it would delete the input.
    before = files_under(tmp_path)
    with pytest.raises(DataError) as error:
        import_triples(path, str(tmp_path), force=True)
    assert str(error.value) == (f"--out {tmp_path} holds the input {path}; writing there "
                                "would delete it: choose another --out")
    assert files_under(tmp_path) == before
    # A directory that is not an earlier import (a home directory, a project).
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    before = files_under(tmp_path)
    with pytest.raises(DataError) as error:
        import_triples(path, str(home), force=True)
    assert str(error.value) == (f"--force replaces only an earlier import; {home} also holds "
                                "'notes.txt', 'src': choose another --out")
    assert files_under(tmp_path) == before
    # A file.
    with pytest.raises(DataError, match="is not a directory"):
        import_triples(path, str(home / "notes.txt"), force=True)
    assert (home / "notes.txt").read_text() == "keep me"
    # An earlier import is replaced.
    import_triples(path, str(tmp_path / "out"))
    import_triples(path, str(tmp_path / "out"), force=True, dim=4)
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["model"]["embeddings"]["tables"][0]["embedding_dim"] == 4


def test_cli_prints_one_line_and_exits_2_for_a_traversing_type(tmp_path):
    path = _tsv(tmp_path / "t.tsv", [("../x:a", "r", "b")])
    result = subprocess.run([sys.executable, "-m", "projects.twhin", "import", "--triples",
                             path, "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, cwd=REPO, env=launcher_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr == (f"error: {path}: line 1: entity type '../x' is not a valid name: "
                             "use 1-64 ASCII letters, digits, '_' or '-', starting with a "
                             "letter or '_'\n")
    assert os.listdir(tmp_path) == ["t.tsv"]


def test_every_destination_is_checked_to_lie_inside_out(tmp_path):
    # The second line of defence behind check_name: a path that leaves the output directory,
    # directly or through a symbolic link planted in it, is refused before it is written.
    from projects.twhin.importer import _destination

    (tmp_path / "out").mkdir()
    os.symlink(tmp_path, tmp_path / "out" / "link")
    assert _destination(str(tmp_path / "out"), "vocab", "tables", "a.parquet") == \
        str(tmp_path / "out" / "vocab" / "tables" / "a.parquet")
    for parts in (("..", "x.parquet"), ("/etc", "passwd"), ("link", "x.parquet")):
        with pytest.raises(DataError, match="outside the output directory"):
            _destination(str(tmp_path / "out"), *parts)
