"""The approximate nearest-neighbour index `twhin export --index` writes beside each table.

Library: hnswlib (an HNSW graph, inner-product space): on 1,000,000 x 64 rows recall@10
0.997 at the default ef 128, 77 times the queries/s of exact search in the same process
(benchmarks/neighbors.py, benchmarks/results/neighbors-cpu-2core.json). The same benchmark
measured faiss IVFFlat better still (recall 0.9994 at the same queries/s, half the build
time; docs/twhin_cli.md); hnswlib stays until faiss's file format has a checker as strict
as `check_index_file` below.
The score TwHIN ranks by is dot(q, candidate) + b with b one constant per query
(`operators_np.relation_query`), so an inner-product index orders candidates exactly as
the model does; `neighbors` then re-scores the candidates the index returns with the
exported vectors, so every score printed is exact.

The index file is data from someone else (an export can be copied from anywhere), so it is
never handed to hnswlib unchecked. hnswlib's format is plain binary (no pickle, nothing is
executed), but its loader trusts the header's sizes and the graph's neighbour ids, so a
damaged or hostile file could make it allocate without bound or read outside its arrays.
`check_index_file` therefore reads the whole file first with numpy (memory-mapped) and
refuses, in one line, anything but the exact layout hnswlib 0.8 writes for this table:
header fields consistent with the export's metadata (rows, dim) and with each other, the
file size, every neighbour id and link count in range, labels 0..N-1 each once, levels
consistent, and the stored vectors equal to the exported ones (so an index of another
export, or of an earlier export of the same table, is refused as a mismatch).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from tml.errors import TmlError

LIBRARY = "hnswlib"
SPACE = "ip"
M = 16                    # graph degree (hnswlib's default is 16)
EF_CONSTRUCTION = 100     # build-time search width
DEFAULT_EF = 128          # query-time search width: recall@10 0.997 at 1M rows (ef 64: 0.995)
SUFFIX = ".hnsw"

# hnswlib 0.8 header: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
# label_offset, offsetData (size_t); maxlevel (int); enterpoint_node (uint32); maxM,
# maxM0, M (size_t); mult (double); ef_construction (size_t).
_HEADER = np.dtype([("offset_level0", "<u8"), ("max_elements", "<u8"), ("count", "<u8"),
                    ("size_per_element", "<u8"), ("label_offset", "<u8"),
                    ("offset_data", "<u8"), ("max_level", "<i4"), ("enter_point", "<u4"),
                    ("max_m", "<u8"), ("max_m0", "<u8"), ("m", "<u8"), ("mult", "<f8"),
                    ("ef_construction", "<u8")])
_MAX_LEVEL = 64           # HNSW levels grow as log(N)/log(M): far below this


class IndexError_(TmlError):
    """An index file that does not belong to this export, or is not a valid index."""


def index_file(table: str) -> str:
    return f"{table}{SUFFIX}"


class IndexBuilder:
    """Adds a table's rows chunk by chunk (as the export streams them) and saves the index."""

    def __init__(self, rows: int, dim: int, threads: int = -1) -> None:
        import hnswlib

        self.rows, self.dim, self.threads, self.added = rows, dim, threads, 0
        self.index = hnswlib.Index(space=SPACE, dim=dim)
        self.index.init_index(max_elements=max(1, rows), M=M, ef_construction=EF_CONSTRUCTION,
                              random_seed=0)

    def add(self, vectors: np.ndarray) -> None:
        labels = np.arange(self.added, self.added + len(vectors))
        self.index.add_items(np.ascontiguousarray(vectors, np.float32), labels,
                             num_threads=self.threads)
        self.added += len(vectors)

    def save(self, path: str) -> dict:
        if self.added != self.rows:
            raise TmlError(f"index of {self.rows} rows got {self.added}")
        self.index.save_index(path)
        return {"file": os.path.basename(path), "library": LIBRARY, "space": SPACE, "M": M,
                "ef_construction": EF_CONSTRUCTION, "rows": self.rows, "dim": self.dim}


def check_index_file(path: str, rows: int, dim: int, vectors: np.ndarray | None = None) -> None:
    """IndexError_ (one line) unless `path` is hnswlib's layout of exactly this table."""
    def refuse(why: str) -> IndexError_:
        return IndexError_(f"{path}: not the index of this export ({why}); rebuild it with "
                           "`twhin export --index`")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            # A plain ndarray over a read-only mapping: slicing np.memmap costs far more.
            data = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ),
                                 np.uint8) if size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as error:
        raise IndexError_(f"{path}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    if size < _HEADER.itemsize:
        raise refuse(f"{size} bytes, shorter than the header")
    head = data[:_HEADER.itemsize].view(_HEADER)[0]
    max_m0, max_m = int(head["max_m0"]), int(head["max_m"])
    level0_links = 4 + 4 * max_m0
    per_element = level0_links + 4 * dim + 8
    expected = {"count": rows, "max_elements": rows, "offset_level0": 0,
                "offset_data": level0_links, "label_offset": level0_links + 4 * dim,
                "size_per_element": per_element}
    for name, want in expected.items():
        if int(head[name]) != want:
            raise refuse(f"header {name} is {int(head[name])}, expected {want} for {rows} "
                         f"rows of dim {dim}")
    if not (2 <= int(head["m"]) <= 1024 and max_m == int(head["m"]) and max_m0 == 2 * max_m):
        raise refuse(f"header M={int(head['m'])}, maxM={max_m}, maxM0={max_m0} are "
                     "inconsistent")
    max_level = int(head["max_level"])
    if not 0 <= max_level <= _MAX_LEVEL or (rows and int(head["enter_point"]) >= rows):
        raise refuse(f"header maxlevel {max_level} or entry point "
                     f"{int(head['enter_point'])} out of range")
    start = _HEADER.itemsize
    end = start + rows * per_element
    if size < end:
        raise refuse(f"{size} bytes, shorter than the {rows} rows it must hold")
    level0 = data[start:end].reshape(rows, per_element)
    header = level0[:, :4].copy().view("<u2")          # (count u16, flags u16) per row
    counts, flags = header[:, 0], header[:, 1]
    if (counts > max_m0).any() or flags.any():
        raise refuse("a level-0 link count above maxM0 or a deleted mark")
    links = level0[:, 4:level0_links].copy().view("<u4")
    used = np.arange(max_m0)[None, :] < counts[:, None]
    if rows and (links[used] >= rows).any():
        raise refuse("a level-0 neighbour id beyond the rows")
    labels = level0[:, per_element - 8:].copy().view("<u8").reshape(-1)
    if not np.array_equal(np.sort(labels), np.arange(rows, dtype=np.uint64)):
        raise refuse("labels are not the rows 0..N-1 each once")
    if vectors is not None:
        stored = level0[:, level0_links:level0_links + 4 * dim].copy().view("<f4")
        order = np.argsort(labels)
        if vectors.shape != (rows, dim) or not np.array_equal(stored[order], vectors):
            raise refuse("its vectors differ from the exported ones: an index of another "
                         "export")
    _check_upper_levels(data, end, size, rows, max_m, max_level, refuse)


def _check_upper_levels(data: np.ndarray, offset: int, size: int, rows: int, max_m: int,
                        max_level: int, refuse) -> None:  # noqa: ANN001 (the error factory)
    """Each row's upper-level link lists: a u32 byte length, then that many bytes. The
    lengths are read in one sequential pass (struct, no numpy per row); the lists are then
    checked together."""
    import struct

    per_level = 4 + 4 * max_m
    base = offset
    buffer = data[base:size].tobytes()      # bytes: struct reads them fastest
    unpack = struct.Struct("<I").unpack_from
    starts, lengths = [], []
    for _ in range(rows):
        if offset + 4 > size:
            raise refuse("it ends inside the upper levels")
        (length,) = unpack(buffer, offset - base)
        offset += 4
        if length:
            if length % per_level or length // per_level > max_level or offset + length > size:
                raise refuse(f"an upper-level link list of {length} bytes")
            starts.append(offset)
            lengths.append(length)
            offset += length
    if offset != size:
        raise refuse(f"{size - offset} bytes after the last link list")
    top = max(lengths) // per_level if lengths else 0
    if rows and top != max_level:
        raise refuse(f"header maxlevel {max_level}, but the highest level is {top}")
    if not starts:
        return
    blocks = np.concatenate([data[a:a + n] for a, n in zip(starts, lengths)])
    blocks = blocks.reshape(-1, per_level)
    counts = blocks[:, :4].copy().view("<u2")
    links = blocks[:, 4:].copy().view("<u4")
    if (counts[:, 0] > max_m).any() or counts[:, 1].any():
        raise refuse("an upper-level link count above maxM")
    used = np.arange(max_m)[None, :] < counts[:, :1]
    if (links[used] >= rows).any():
        raise refuse("an upper-level neighbour id beyond the rows")


class Index:
    """A checked index: `search(queries, k)` -> (Q, k) row numbers, best first (approximate)."""

    def __init__(self, path: str, rows: int, dim: int, vectors: np.ndarray | None = None,
                 ef: int = DEFAULT_EF) -> None:
        import hnswlib

        check_index_file(path, rows, dim, vectors)
        self.rows, self.ef = rows, ef
        self.index = hnswlib.Index(space=SPACE, dim=dim)
        self.index.load_index(path, max_elements=rows)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        k = min(k, self.rows)
        self.index.set_ef(max(self.ef, k))
        return self.index.knn_query(np.ascontiguousarray(queries, np.float32), k=k)[0].astype(
            np.int64)
