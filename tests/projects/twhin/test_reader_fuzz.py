"""Fuzz the readers of user data of `twhin import` and training: triples as TSV, CSV and
parquet (through `import_triples`, which reads and writes) and the edge parquet files
(through `EdgesDataset`).

Each example is a mutation of a valid file (tests/fuzz_support.py: flips, inserts of
troublesome bytes, deletions, duplications, truncations) or, for parquet, a table built
with hostile values (nulls, lists, structs, huge or control-character strings, NaN and
negative weights, wrong types, missing and duplicate columns). Every outcome must be a
success or one `TmlError` line, within a few seconds, and nothing may be written outside
--out: the parent directory holds the input, and --out only if the import succeeded.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import signal
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given
from hypothesis import strategies as st

from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.importer import import_triples
from projects.twhin.models.config import Relation
from tests.fuzz_support import FUZZ_SETTINGS, files_under, mutated, outcome

_counter = itertools.count()
SECONDS_PER_EXAMPLE = 10

TRIPLES = [("head", "relation", "tail"), ("user:alice", "follows", "user:bob"),
           ("user:alice", "buys", "item:42"), ("user:bob", "buys", "item:7"),
           ("tag1", "near", "tag2"), ("user:carol", "follows", "user:alice")]


def _text(sep: str) -> bytes:
    return "".join(sep.join(row) + "\n" for row in TRIPLES).encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=3)
    return sink.getvalue()


VALID_TRIPLES_PARQUET = _parquet_bytes(pa.table(
    {name: [row[i] for row in TRIPLES[1:]] for i, name in enumerate(TRIPLES[0])}))

RELATIONS = [Relation(name="fav", lhs="user", rhs="tweet"),
             Relation(name="follow", lhs="user", rhs="user")]
TABLES = {"user": 50, "tweet": 30}
VALID_EDGES_PARQUET = _parquet_bytes(pa.table({
    "lhs": np.arange(10, dtype=np.int64), "rel": np.arange(10, dtype=np.int64) % 2,
    "rhs": np.arange(10, dtype=np.int64) * 2, "weight": np.linspace(0, 2, 10)}))


@contextlib.contextmanager
def _within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs longer than `seconds`."""
    def expire(signum, frame):  # noqa: ANN001, ARG001
        raise AssertionError(f"reader still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _import_once(tmp_path, name: str, data: bytes) -> str:
    """Import `data` (written as `name`) into a fresh directory two levels below tmp_path;
    check that tmp_path gained only the input and, on success, --out's files."""
    case = f"case{next(_counter)}"
    work = tmp_path / case / "deep"
    work.mkdir(parents=True)
    (work / name).write_bytes(data)
    before = files_under(tmp_path)
    with _within(SECONDS_PER_EXAMPLE):
        result = outcome(lambda: import_triples(str(work / name), str(work / "out"),
                                                split="1,0,0"))
    added = files_under(tmp_path) - before
    out = f"{case}/deep/out"
    if result == "ok":
        assert added and all(p == out or p.startswith(out + "/") for p in added), added
        assert {"config.yaml", "train", "vocab"} <= {p.name for p in (work / "out").iterdir()}
    else:
        assert added == set(), added
    return result


@FUZZ_SETTINGS
@given(data=mutated(_text("\t")))
def test_fuzz_tsv_triples(tmp_path, data):
    _import_once(tmp_path, "t.tsv", data)


@FUZZ_SETTINGS
@given(data=mutated(_text(",")))
def test_fuzz_csv_triples(tmp_path, data):
    _import_once(tmp_path, "t.csv", data)


@FUZZ_SETTINGS
@given(data=mutated(_text("\t")))
def test_fuzz_sniffed_text_triples(tmp_path, data):
    _import_once(tmp_path, "t.txt", data)


@FUZZ_SETTINGS
@given(data=mutated(VALID_TRIPLES_PARQUET))
def test_fuzz_parquet_triples_bytes(tmp_path, data):
    _import_once(tmp_path, "t.parquet", data)


# -- hostile parquet tables -----------------------------------------------------------------

_HOSTILE_STRINGS = st.one_of(
    st.sampled_from(["user:a", "item:b", "a", "../../x:y", "/etc:p", ":x", "", " ", "relations:x",
                     "User:a", "a\nb", "x" * 100_000, "tables:y", "ü:z", "a\x00b", "nan"]),
    st.text(max_size=20))


def _column(kind: str, values: list) -> pa.Array:
    if kind == "string":
        return pa.array(values, pa.string())
    if kind == "large_string":
        return pa.array(values, pa.large_string())
    if kind == "dictionary":
        return pa.array(values, pa.string()).dictionary_encode()
    if kind == "binary":
        return pa.array([None if v is None else v.encode("utf-8", "surrogatepass")
                         for v in values], pa.binary())
    if kind == "list":
        return pa.array([None if v is None else [v] for v in values], pa.list_(pa.string()))
    if kind == "struct":
        return pa.array([None if v is None else {"s": v} for v in values],
                        pa.struct([("s", pa.string())]))
    if kind == "int64":
        return pa.array([None if v is None else len(v) - 3 for v in values], pa.int64())
    if kind == "float64":
        return pa.array([None if v is None else math.nan for v in values], pa.float64())
    return pa.array([None] * len(values), pa.null())


_KINDS = ["string", "string", "string", "large_string", "dictionary", "binary", "list",
          "struct", "int64", "float64", "null"]


@st.composite
def hostile_triples(draw: st.DrawFn) -> pa.Table:
    rows = draw(st.integers(0, 6))
    names = draw(st.one_of(st.just(["head", "relation", "tail"]),
                           st.lists(st.sampled_from(["head", "relation", "tail", "x", ""]),
                                    min_size=0, max_size=5)))
    columns = []
    for _ in names:
        values = draw(st.lists(st.one_of(st.none(), _HOSTILE_STRINGS), min_size=rows,
                               max_size=rows))
        columns.append(_column(draw(st.sampled_from(_KINDS)), values))
    return pa.Table.from_arrays(columns, names=names) if names else pa.table({})


@FUZZ_SETTINGS
@given(table=hostile_triples())
def test_fuzz_parquet_triples_hostile_tables(tmp_path, table):
    _import_once(tmp_path, "t.parquet", _parquet_bytes(table))


def test_hostile_triples_with_a_huge_string_import_or_fail_in_one_line(tmp_path):
    big = "user:" + "x" * 5_000_000
    table = pa.table({"head": [big, "user:a"], "relation": ["r", "r"], "tail": ["user:b"] * 2})
    assert _import_once(tmp_path, "t.parquet", _parquet_bytes(table)) == "ok"


# -- the edge reader ------------------------------------------------------------------------


def _read_edges(tmp_path, data: bytes) -> str:
    work = tmp_path / f"case{next(_counter)}"
    work.mkdir()
    path = work / "edges.parquet"
    path.write_bytes(data)
    with _within(SECONDS_PER_EXAMPLE):
        result = outcome(lambda: list(EdgesDataset(str(path), TABLES, RELATIONS,
                                                   batch_size=2, global_negatives=1)))
    assert files_under(work) == {"edges.parquet"}
    return result


@FUZZ_SETTINGS
@given(data=mutated(VALID_EDGES_PARQUET))
def test_fuzz_edge_parquet_bytes(tmp_path, data):
    _read_edges(tmp_path, data)


_ID_TYPES = [pa.int8(), pa.int32(), pa.int64(), pa.uint8(), pa.uint64(), pa.float64(),
             pa.string(), pa.list_(pa.int64()), pa.bool_()]
_WEIGHT_VALUES = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                           st.integers(-5, 5))


def _typed(values: list, kind: pa.DataType) -> pa.Array:
    if pa.types.is_list(kind):
        return pa.array([None if v is None else [int(v) % 2**63] for v in values], kind)
    if pa.types.is_string(kind):
        return pa.array([None if v is None else str(v) for v in values], kind)
    if pa.types.is_boolean(kind):
        return pa.array([None if v is None else bool(v) for v in values], kind)
    if pa.types.is_unsigned_integer(kind):
        top = 2 ** kind.bit_width - 1
        return pa.array([None if v is None else (v % (top + 1)) for v in values], kind)
    if pa.types.is_integer(kind):
        bound = 2 ** (kind.bit_width - 1)
        return pa.array([None if v is None else ((v + bound) % (2 * bound)) - bound
                         for v in values], kind)
    return pa.array([None if v is None else float(v) for v in values], kind)


@st.composite
def hostile_edges(draw: st.DrawFn) -> pa.Table:
    rows = draw(st.integers(0, 8))
    ids = st.one_of(st.none(), st.integers(-3, 60), st.sampled_from([2**63 - 1, -2**63, 2**64 - 1]))
    names = draw(st.one_of(st.just(["lhs", "rel", "rhs", "weight"]),
                           st.lists(st.sampled_from(["lhs", "rel", "rhs", "weight", "x"]),
                                    max_size=6)))
    columns = []
    for name in names:
        if name == "weight":
            values = draw(st.lists(_WEIGHT_VALUES, min_size=rows, max_size=rows))
            kind = draw(st.sampled_from([pa.float64(), pa.float32(), pa.int16(), pa.string()]))
            if pa.types.is_integer(kind):
                values = [None if v is None or not math.isfinite(v) else int(v) for v in values]
        else:
            values = draw(st.lists(ids, min_size=rows, max_size=rows))
            kind = draw(st.sampled_from(_ID_TYPES))
        columns.append(_typed(values, kind))
    return pa.Table.from_arrays(columns, names=names) if names else pa.table({})


@FUZZ_SETTINGS
@given(table=hostile_edges())
def test_fuzz_edge_parquet_hostile_tables(tmp_path, table):
    _read_edges(tmp_path, _parquet_bytes(table))
