"""Read string triples (head, relation, tail) from TSV, CSV or parquet, for `twhin import`.

Whatever a file holds, reading it either yields chunks of triples or raises a `DataError`
of one line naming the file and the line (text, counted from 1) or row (parquet, counted
from 1 as well, so that "row 1" is the first row in every importer message): a line too
long, bytes that are not UTF-8, an unbalanced quote, a parquet column of another type
(lists, structs, binary), a null, an empty field or a control character. Text lines are
read with a bounded length (`MAX_LINE_CHARS`), so a file without line breaks cannot
exhaust memory.

Why control characters are refused in ids and relation names: these strings end up in
one-line error messages, in printed tables (`twhin evaluate`, `twhin neighbors`) and in
config.yaml; a line break inside an id is almost always a quote that was never closed,
and is reported as such, at the line where the quote opened.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from tml.errors import DataError, error_line

CHUNK_ROWS = 100_000
# Longest text line read (characters): far above any id, far below memory trouble.
MAX_LINE_CHARS = 1 << 20
FIELDS = ("head", "relation", "tail")
# Control characters (and Unicode's line separators), and what surrogateescape makes of a
# byte that is not UTF-8 (U+DC80..U+DCFF: never produced by valid UTF-8).
_SUSPECT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


@dataclass
class Chunk:
    """Up to `CHUNK_ROWS` triples and where each came from (`unit` `positions[i]`)."""

    triples: list[tuple[str, str, str]]
    positions: list[int]
    unit: str                      # "line" (text) or "row" (parquet)

    def where(self, i: int) -> str:
        return f"{self.unit} {self.positions[i]}"


def file_format(path: str) -> str:
    """'parquet', or the delimiter of a text file (by extension, else sniffed)."""
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".tsv", ".tab")):
        return "\t"
    if lower.endswith(".csv"):
        return ","
    try:
        with open(path, "rb") as handle:
            first = handle.readline(MAX_LINE_CHARS)
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error_line(error)}") from None
    return "\t" if b"\t" in first else ","


def read_triples(path: str) -> Iterator[Chunk]:
    """Chunks of (head, relation, tail) strings from one file (see module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    kind = file_format(path)
    chunks = _read_parquet(path) if kind == "parquet" else _read_text(path, kind)
    found = False
    for chunk in chunks:
        _check_text(path, chunk)
        found = True
        yield chunk
    if not found:
        raise DataError(f"{path}: holds no triples (empty file?)")


def _check_text(path: str, chunk: Chunk) -> None:
    """Refuse bytes that were not UTF-8 and control characters, naming the first line."""
    # One search over the whole chunk; rows are looked at only when it finds something.
    if not _SUSPECT.search("".join(field for triple in chunk.triples for field in triple)):
        return
    for i, triple in enumerate(chunk.triples):
        for name, value in zip(FIELDS, triple):
            found = _SUSPECT.search(value)
            if found is None:
                continue
            char = found.group()
            if "\udc80" <= char <= "\udcff":
                raise DataError(f"{path}: {chunk.where(i)}: not UTF-8 text (byte "
                                f"0x{ord(char) - 0xDC00:02x} in the {name})")
            raise DataError(f"{path}: {chunk.where(i)}: {name} {_shorten(value)} holds a "
                            f"control character ({char!r}); ids and relation names must be "
                            "printable text")


def _shorten(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# -- text ----------------------------------------------------------------------------------


def _lines(path: str, handle) -> Iterator[str]:  # noqa: ANN001 (a text file)
    """The file's lines, read at most `MAX_LINE_CHARS` at a time (bounded memory)."""
    readline = handle.readline
    number = 0
    while True:
        try:
            line = readline(MAX_LINE_CHARS)
        except OSError as error:
            raise DataError(f"{path}: line {number + 1}: cannot read: "
                            f"{error.strerror or error_line(error)}") from None
        if not line:
            return
        number += 1
        if len(line) == MAX_LINE_CHARS and line[-1] not in "\r\n":
            raise DataError(f"{path}: line {number}: longer than {MAX_LINE_CHARS} characters "
                            "(not a file of triples?)")
        yield line


def _read_text(path: str, delimiter: str) -> Iterator[Chunk]:
    try:
        handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error_line(error)}") from None
    with handle:
        reader = csv.reader(_lines(path, handle), delimiter=delimiter)
        chunk = Chunk([], [], "line")
        first = True
        while True:
            start = reader.line_num + 1          # the line this record starts on
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise DataError(f"{path}: line {start}: {_csv_problem(error)}") from None
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if reader.line_num > start and any("\n" in f or "\r" in f for f in fields):
                raise DataError(f"{path}: line {start}: a quoted field runs on to line "
                                f"{reader.line_num} (a quote that is never closed?); ids and "
                                "relation names cannot hold line breaks")
            if len(fields) != 3:
                raise DataError(f"{path}: line {start}: expected 3 fields "
                                f"(head, relation, tail), got {len(fields)}")
            fields = [f.strip() for f in fields]
            if first and [f.lower() for f in fields] == list(FIELDS):
                first = False
                continue                          # header
            first = False
            if not all(fields):
                raise DataError(f"{path}: line {start}: empty field")
            chunk.triples.append((fields[0], fields[1], fields[2]))
            chunk.positions.append(start)
            if len(chunk.triples) >= CHUNK_ROWS:
                yield chunk
                chunk = Chunk([], [], "line")
        if chunk.triples:
            yield chunk


def _csv_problem(error: csv.Error) -> str:
    text = error_line(error)
    if "field larger than field limit" in text:
        return (f"a field is longer than {csv.field_size_limit()} characters (a quote that "
                "is never closed?)")
    return text


# -- parquet -------------------------------------------------------------------------------


def _string_like(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _string_like(kind.value_type)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_integer(kind)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)))


def _parquet_columns(path: str, parquet: pq.ParquetFile) -> list[str]:
    schema = parquet.schema_arrow
    names = schema.names
    wanted = list(FIELDS) if all(n in names for n in FIELDS) else names[:3]
    if len(wanted) < 3:
        raise DataError(f"{path}: needs columns head, relation, tail (has "
                        f"{', '.join(map(repr, names)) or 'none'})")
    for name in wanted:
        if names.count(name) > 1:
            raise DataError(f"{path}: column {name!r} occurs {names.count(name)} times")
        kind = schema.field(name).type
        if not _string_like(kind):
            raise DataError(f"{path}: column {name!r} has type {kind}; expected strings "
                            "(or integers)")
    return wanted


def _strings(path: str, column: pa.Array, name: str, first_row: int) -> list[str]:
    """A parquet column chunk as Python strings; nulls, empty values and bad UTF-8 refused."""
    try:
        column = column.cast(pa.string())
        column.validate(full=True)
        values = column.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, ValueError) as error:
        for i in range(len(column)):           # find the row (only on this error path)
            try:
                column.slice(i, 1).validate(full=True)
                column.slice(i, 1).to_pylist()
            except (pa.ArrowException, UnicodeDecodeError, ValueError):
                raise DataError(f"{path}: row {first_row + i}: column {name!r} is not UTF-8 "
                                "text") from None
        raise DataError(f"{path}: column {name!r}: {error_line(error)}") from None
    for i, value in enumerate(values):
        if value is None or not value.strip():
            what = "null" if value is None else "empty"
            raise DataError(f"{path}: row {first_row + i}: column {name!r} is {what}")
    return values


def _read_parquet(path: str) -> Iterator[Chunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise DataError(f"{path}: cannot read as parquet: {error_line(error)}") from None
    with parquet:
        columns = _parquet_columns(path, parquet)
        first_row = 1                             # rows are counted from 1, like lines
        batches = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException, ValueError) as error:
                raise DataError(f"{path}: cannot read the rows from row {first_row} on: "
                                f"{error_line(error)}") from None
            if batch.num_columns != 3:
                raise DataError(f"{path}: expected columns {', '.join(columns)}, read "
                                f"{', '.join(batch.schema.names)}")
            values = [_strings(path, batch.column(i), columns[i], first_row)
                      for i in range(3)]
            if batch.num_rows:
                yield Chunk(list(zip(*values)), list(range(first_row,
                                                           first_row + batch.num_rows)), "row")
            first_row += batch.num_rows
