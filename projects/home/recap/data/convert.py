"""Convert the original's TFRecord files (tf.Example, segdense features) to tml's parquet.

    python -m projects.home.recap.data.convert --out DIR [--schema segdense.json] FILE...

Each input (plain or gzip-compressed TFRecord, told apart by its first bytes) becomes
`DIR/<name>.parquet` in the layout of `projects.home.recap.data.schema`: one row per
tf.Example, one column per schema feature. Examples are decoded by the `tfrecord` package's
generated protobuf classes (`tfrecord.example_pb2`) and record checksums are checked with
its `TFRecordWriter.masked_crc`; the record framing (length, crc, bytes, crc) is read here
because `tfrecord`'s own iterator trusts the length field (a corrupt length makes it allocate
that many bytes) and skips the checksums. A record longer than `MAX_RECORD_BYTES`, a bad
checksum, a truncated file, an example that does not decode or lacks a schema feature, or a
value list of the wrong type or length is a one-line DataError naming the file and the
0-based record; nothing is written for that file (output goes to a temporary name renamed
when complete).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import google.protobuf.message
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter

from tml.common.cli import StrictArgumentParser, run_cli
from tml.errors import DataError, error_line

from .generate import DEFAULT_SCHEMA
from .schema import Feature, arrow_schema, load_schema

MAX_RECORD_BYTES = 64 << 20
ROWS_PER_GROUP = 1024
_KINDS = {"int64_list": "int64_list", "float_list": "float_list"}


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    return data if data is not None else b""


def read_records(handle: BinaryIO, display: str) -> Iterator[bytes]:
    """The records of an open TFRecord stream, framing and checksums checked."""
    index = 0
    while True:
        header = _read_exact(handle, 8)
        if not header:
            return
        if len(header) < 8:
            raise DataError(f"{display}: record {index}: file ends inside the length field")
        length_crc = _read_exact(handle, 4)
        if length_crc != TFRecordWriter.masked_crc(header):
            raise DataError(f"{display}: record {index}: bad length checksum (not a TFRecord "
                            "file, or corrupt)")
        (length,) = struct.unpack("<Q", header)
        if length > MAX_RECORD_BYTES:
            raise DataError(f"{display}: record {index}: length {length} exceeds "
                            f"{MAX_RECORD_BYTES} bytes")
        data = _read_exact(handle, length)
        if len(data) < length:
            raise DataError(f"{display}: record {index}: file ends inside the record")
        if _read_exact(handle, 4) != TFRecordWriter.masked_crc(data):
            raise DataError(f"{display}: record {index}: bad data checksum (corrupt record)")
        yield data
        index += 1


def decode_example(data: bytes, features: dict[str, Feature], display: str,
                   index: int) -> dict[str, np.ndarray]:
    """The schema's features of one serialized tf.Example, checked."""
    example = example_pb2.Example()
    try:
        example.ParseFromString(data)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as error:
        raise DataError(f"{display}: record {index}: not a tf.Example: {error_line(error)}") \
            from None
    found = example.features.feature
    out = {}
    for feature in features.values():
        if feature.name not in found:
            raise DataError(f"{display}: record {index}: feature '{feature.name}' is missing")
        kind = found[feature.name].WhichOneof("kind")
        if kind != _KINDS[feature.dtype]:
            raise DataError(f"{display}: record {index}: feature '{feature.name}' is "
                            f"{kind or 'empty'}; the schema says {feature.dtype}")
        values = getattr(found[feature.name], kind).value
        if len(values) != feature.length:
            raise DataError(f"{display}: record {index}: feature '{feature.name}' holds "
                            f"{len(values)} values; the schema says {feature.length}")
        dtype = np.int64 if feature.dtype == "int64_list" else np.float32
        out[feature.name] = np.asarray(values, dtype=dtype)
    return out


def _table(rows: list[dict[str, np.ndarray]], features: dict[str, Feature],
           schema: pa.Schema) -> pa.Table:
    arrays = []
    for feature in features.values():
        values = np.stack([row[feature.name] for row in rows])
        if feature.length == 1:
            arrays.append(pa.array(values.reshape(-1)))
        else:
            offsets = np.arange(0, (len(rows) + 1) * feature.length, feature.length, np.int32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets),
                                                   pa.array(values.reshape(-1))))
    return pa.Table.from_arrays(arrays, schema=schema)


def _open(path: str) -> BinaryIO:
    handle = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    magic = handle.peek(2)[:2] if hasattr(handle, "peek") else b""
    if magic == b"\x1f\x8b":
        return gzip.open(handle, "rb")  # type: ignore[return-value]
    return handle


def convert_file(path: str, out_dir: str, features: dict[str, Feature]) -> tuple[str, int]:
    """Convert one TFRecord file; the parquet path and the number of rows."""
    name = os.path.basename(path)
    for suffix in (".gz", ".tfrecord", ".tfrecords"):
        name = name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name
    target = os.path.join(out_dir, name + ".parquet")
    if os.path.exists(target):
        raise DataError(f"{target} exists already (remove it or choose another --out)")
    temporary = target + ".tmp"
    schema = arrow_schema(features)
    rows: list[dict[str, np.ndarray]] = []
    total, done = 0, False
    try:
        with _open(path) as handle, pq.ParquetWriter(temporary, schema) as writer:
            for index, data in enumerate(read_records(handle, path)):
                rows.append(decode_example(data, features, path, index))
                if len(rows) == ROWS_PER_GROUP:
                    writer.write_table(_table(rows, features, schema))
                    total, rows = total + len(rows), []
            if rows:
                writer.write_table(_table(rows, features, schema))
                total, rows = total + len(rows), []
        done = True
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: cannot read: {error_line(error)}") from None
    finally:
        if not done and os.path.exists(temporary):
            os.remove(temporary)
    if total == 0:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise DataError(f"{path}: no records")
    os.replace(temporary, target)
    return target, total


def convert(paths: list[str], out_dir: str, schema_path: str = DEFAULT_SCHEMA) -> list[str]:
    """Convert every file; the parquet paths written."""
    features = load_schema(schema_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in paths:
        try:
            target, _ = convert_file(path, out_dir, features)
        finally:
            _remove_temporaries(out_dir)
        written.append(target)
    return written


def _remove_temporaries(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if name.endswith(".parquet.tmp"):
            os.remove(os.path.join(out_dir, name))


# Its name as run (projects.… in a checkout, tml_projects.… when installed).
_PROG = f"python -m {__spec__.name if __spec__ else 'projects.home.recap.data.convert'}"


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(prog=_PROG,
                                  description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for the parquet files.")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA, help="segdense.json.")
    parser.add_argument("files", nargs="+", help="TFRecord files (plain or gzip).")
    args = parser.parse_args(argv)
    written = convert(args.files, args.out, args.schema)
    print(f"wrote {len(written)} parquet file(s) to {args.out}")


if __name__ == "__main__":
    run_cli(main)
