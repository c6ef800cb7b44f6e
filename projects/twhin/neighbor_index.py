"""The approximate nearest-neighbour index `twhin export --index` writes beside each table.

An inverted file (IVF): the rows are clustered into `lists` groups by k-means; a query scores
the group centroids, scans the rows of its `nprobe` best groups exactly, and keeps the best.
Chosen by measurement against hnswlib (benchmarks/neighbors.py, same data and process,
benchmarks/results/neighbors-cpu-2core.json, docs/twhin_cli.md): on 1,000,000 x 64 rows,
with faiss's k-means and scan, recall@10 0.9995 at nprobe 16 against hnswlib's 0.9971 at
its default ef 128, at 1.8 times its queries/s, built in 28% of its time; and it needs no
compiled library at all (numpy does the same work, slower).

The score TwHIN ranks by is dot(q, candidate) + b with b one constant per query
(`operators_np.relation_query`), so an inner-product index orders candidates exactly as
the model does: groups are formed and probed by inner product (as faiss's IndexIVFFlat
with METRIC_INNER_PRODUCT does), and `neighbors` re-scores the candidates with the exported
vectors, so every score printed is exact.

The index is three plain arrays in .npy files, never pickles and never a library's own
binary format, because an export can be copied from anywhere and its files are data from
someone else:

    <table>.ivf-centroids.npy   float32 (lists, D)   the k-means centroids
    <table>.ivf-rows.npy        int64 (N,)           the table's rows grouped by list
    <table>.ivf-offsets.npy     int64 (lists + 1,)   list j is rows[offsets[j]:offsets[j+1]]

`load_index` reads each file's header itself and refuses, in one line naming the file,
anything but exactly that dtype, C order and a shape fitting the export's metadata, and a
file size equal to header plus data (a truncated or padded file); then checks the values:
finite centroids, offsets from 0 to N never decreasing, rows a permutation of 0..N-1. The
export's metadata.json holds the SHA-256 of the table's vectors and the three arrays, so
an index of another export, or of an earlier export of the same table, is refused as a
mismatch rather than silently giving poor neighbours.

Building: faiss's k-means (multi-threaded C++) when faiss is installed (the optional extra
`tml[index]`), else the same algorithm in numpy (at 1M rows it gave less even lists and
recall 0.9947 at nprobe 16); either way the result is the same three arrays, read the same
way. Querying: numpy, or faiss's scan of the same lists when installed (`Index`).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from tml.errors import TmlError

FORMAT = "ivf"
FORMAT_VERSION = 1
DEFAULT_NPROBE = 16       # lists scanned per query: recall@10 0.9995 at 1M rows (benchmark)
NITER = 10                # k-means iterations (faiss's IndexIVF default)
SAMPLE_PER_LIST = 64      # k-means trains on at most this many rows per list
MIN_PER_LIST = 39         # faiss warns below 39 training rows per centroid
PARTS = {"centroids": "<f4", "rows": "<i8", "offsets": "<i8"}
SUFFIX = ".npy"
_SCORE_BYTES = 64 << 20   # scores held at once while assigning rows to lists
# Queries x rows x dim of one product in the search: OpenBLAS runs a product above 2^18
# multiply-adds on all its threads, which for these small products costs 4-20 times the
# single-threaded time on a busy host (measured: 91 queries x 250 rows x 64, 2 cores at
# load 8: 378 us threaded, 92 us on one thread), so larger groups are split.
_SMALL_PRODUCT = 1 << 18


class BadIndexError(TmlError):
    """An index file that does not belong to this export, or is not a valid index."""


def index_files(table: str) -> dict[str, str]:
    """part -> file name of a table's index (see module docstring)."""
    return {part: f"{table}.ivf-{part}{SUFFIX}" for part in PARTS}


def list_count(rows: int) -> int:
    """Lists for `rows` rows: 4 sqrt(N) (faiss's guideline for up to a few million rows),
    at most N / 39 so each centroid trains on enough rows, at least 1."""
    return int(max(1, min(4 * np.sqrt(rows), rows // MIN_PER_LIST)))


def digest(vectors: np.ndarray, centroids: np.ndarray, rows: np.ndarray,
           offsets: np.ndarray) -> str:
    """SHA-256 of the table's vectors and the index arrays, little-endian."""
    hasher = hashlib.sha256()
    for array, dtype in ((vectors, "<f4"), (centroids, "<f4"), (rows, "<i8"),
                         (offsets, "<i8")):
        hasher.update(np.ascontiguousarray(array, dtype).data)
    return hasher.hexdigest()


# --- building ------------------------------------------------------------------------------

def _assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's list: the centroid of largest inner product (first on ties)."""
    out = np.empty(len(vectors), np.int64)
    step = max(1, _SCORE_BYTES // (4 * len(centroids)))
    for start in range(0, len(vectors), step):
        out[start:start + step] = np.argmax(vectors[start:start + step] @ centroids.T, axis=1)
    return out


def _kmeans_numpy(sample: np.ndarray, lists: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means assigning by inner product (as faiss's IVF training does): NITER
    rounds; an empty list takes a random training row."""
    centroids = sample[rng.choice(len(sample), lists, replace=False)].copy()
    for _ in range(NITER):
        assign = _assign(sample, centroids)
        counts = np.bincount(assign, minlength=lists)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, sample)
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None]
        empty = np.nonzero(~full)[0]
        if len(empty):
            centroids[empty] = sample[rng.choice(len(sample), len(empty), replace=False)]
    return centroids


def _kmeans_faiss(sample: np.ndarray, lists: int, seed: int) -> np.ndarray:
    import faiss

    clustering = faiss.Clustering(sample.shape[1], lists)
    clustering.niter, clustering.seed = NITER, seed
    clustering.max_points_per_centroid = SAMPLE_PER_LIST
    quantizer = faiss.IndexFlatIP(sample.shape[1])
    clustering.train(sample, quantizer)
    return faiss.vector_to_array(clustering.centroids).reshape(lists, sample.shape[1])


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def build(vectors: np.ndarray, seed: int = 0, use_faiss: bool | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, rows, offsets) of the IVF index of `vectors` (module docstring).
    `use_faiss`: None: faiss's k-means when installed, else numpy's."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    count, dim = vectors.shape
    lists = list_count(count)
    if count == 0:
        return (np.zeros((1, dim), np.float32), np.zeros(0, np.int64),
                np.zeros(2, np.int64))
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(count, min(count, SAMPLE_PER_LIST * lists),
                                        replace=False))]
    if use_faiss is None:
        use_faiss = _faiss_available()
    if use_faiss:
        centroids = _kmeans_faiss(sample, lists, seed)
    else:
        centroids = _kmeans_numpy(sample, lists, rng)
    centroids = np.ascontiguousarray(centroids, np.float32)
    assign = _assign(vectors, centroids)
    rows = np.argsort(assign, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=lists))])
    return centroids, rows, offsets.astype(np.int64)


class IndexBuilder:
    """Takes a table's rows chunk by chunk (as the export streams them), then builds and
    saves the index: k-means needs every row, so the rows are held until `save`."""

    def __init__(self, rows: int, dim: int) -> None:
        self.rows, self.dim, self.added = rows, dim, 0
        self.vectors = np.empty((rows, dim), np.float32)

    def add(self, vectors: np.ndarray) -> None:
        if self.added + len(vectors) > self.rows:
            raise TmlError(f"index of {self.rows} rows got more")
        self.vectors[self.added:self.added + len(vectors)] = vectors
        self.added += len(vectors)

    def save(self, directory: str, table: str, use_faiss: bool | None = None) -> dict:
        """Write the three files of `table` into `directory`; returns the metadata entry.
        `use_faiss`: as for `build`."""
        if self.added != self.rows:
            raise TmlError(f"index of {self.rows} rows got {self.added}")
        centroids, rows, offsets = build(self.vectors, use_faiss=use_faiss)
        files = index_files(table)
        for part, array in (("centroids", centroids), ("rows", rows), ("offsets", offsets)):
            np.save(os.path.join(directory, files[part]),
                    np.ascontiguousarray(array, PARTS[part]), allow_pickle=False)
        entry = {"format": FORMAT, "format_version": FORMAT_VERSION, "lists": len(centroids),
                 "rows": self.rows, "dim": self.dim, "files": files,
                 "sha256": digest(self.vectors, centroids, rows, offsets)}
        self.vectors = np.empty((0, self.dim), np.float32)
        return entry


# --- reading -------------------------------------------------------------------------------

def _refuse(path: str, why: str) -> BadIndexError:
    return BadIndexError(f"{path}: not a valid index of this export ({why}); rebuild it with "
                       "`twhin export --index`")


def read_array(path: str, dtype: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """The array in the .npy file `path`, refused in one line unless it is exactly `dtype`,
    C order, `shape` (None: any length) and the file holds nothing else. The header is
    parsed by numpy's header reader (a literal, no pickle); the data is read as raw bytes."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                version = npy.read_magic(handle)
                if version == (1, 0):
                    header = npy.read_array_header_1_0(handle)
                elif version in ((2, 0), (3, 0)):
                    header = npy.read_array_header_2_0(handle)
                else:
                    raise ValueError(f"format version {version}")
            except (ValueError, SyntaxError, TypeError, EOFError) as error:
                raise _refuse(path, f"not a .npy file: {str(error).splitlines()[0]}") from None
            found_shape, fortran, found_dtype = header
            if found_dtype.hasobject or found_dtype != np.dtype(dtype):
                raise _refuse(path, f"dtype {found_dtype.str}, expected {dtype}")
            if fortran:
                raise _refuse(path, "Fortran order")
            if len(found_shape) != len(shape) or any(
                    want is not None and got != want for got, want in zip(found_shape, shape)):
                want_text = "x".join("any" if w is None else str(w) for w in shape)
                got_text = "x".join(str(s) for s in found_shape) or "scalar"
                raise _refuse(path, f"shape {got_text}, expected {want_text}")
            count = int(np.prod(found_shape, dtype=np.int64))
            data_bytes = count * found_dtype.itemsize
            if size != handle.tell() + data_bytes:
                raise _refuse(path, f"{size} bytes, expected {handle.tell() + data_bytes} for "
                                    f"its shape (truncated or padded)")
            array = np.fromfile(handle, dtype=found_dtype, count=count)
    except OSError as error:
        raise BadIndexError(f"{path}: cannot read: {error.strerror or error}") from None
    if array.size != count:
        raise _refuse(path, "truncated while reading")
    return array.reshape(found_shape)


def load_index(directory: str, table: str, entry: dict, vectors: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, rows, offsets) of `table`, checked against its metadata `entry` and the
    exported `vectors` (module docstring); BadIndexError in one line otherwise."""
    count, dim = vectors.shape
    files = index_files(table)
    paths = {part: os.path.join(directory, name) for part, name in files.items()}
    lists = entry.get("lists")
    if (entry.get("format") != FORMAT or entry.get("format_version") != FORMAT_VERSION
            or not isinstance(lists, int) or not 1 <= lists <= max(1, count)):
        raise _refuse(paths["centroids"], "metadata.json's entry for it is not an IVF index "
                                          f"of {count} rows (format {entry.get('format')!r})")
    centroids = read_array(paths["centroids"], PARTS["centroids"], (lists, dim))
    if not np.isfinite(centroids).all():
        raise _refuse(paths["centroids"], "a centroid is not finite")
    offsets = read_array(paths["offsets"], PARTS["offsets"], (lists + 1,))
    if offsets[0] != 0 or offsets[-1] != count or (np.diff(offsets) < 0).any():
        raise _refuse(paths["offsets"], f"offsets must rise from 0 to the {count} rows")
    rows = read_array(paths["rows"], PARTS["rows"], (count,))
    if count and (rows.min() < 0 or rows.max() >= count):
        raise _refuse(paths["rows"], f"a row outside 0..{count - 1}")
    if count and not (np.bincount(rows, minlength=count) == 1).all():
        raise _refuse(paths["rows"], "not every row exactly once")
    if entry.get("sha256") != digest(vectors, centroids, rows, offsets):
        raise _refuse(paths["rows"], "its arrays and the exported vectors do not match the "
                                     "digest in metadata.json: an index of another export")
    return centroids, rows, offsets


class Index:
    """A checked IVF index: `search(queries, k)` -> (Q, k) rows, best first by inner product
    among the rows of each query's `nprobe` best lists; -1 where those lists hold fewer than
    k rows.

    The scan runs in faiss when it is installed (`use_faiss` None) and in numpy otherwise:
    the same lists, so the same candidates; faiss's C++ scan answered about 4 times the
    queries/s of numpy's on 1M rows (benchmark). faiss gets the arrays only after they are
    checked, through its in-memory API (`faiss_ivf_from_arrays`), never a file."""

    def __init__(self, directory: str, table: str, entry: dict, vectors: np.ndarray,
                 nprobe: int = DEFAULT_NPROBE, use_faiss: bool | None = None) -> None:
        self.centroids, self.rows, self.offsets = load_index(directory, table, entry, vectors)
        self.vectors, self.nprobe = vectors, nprobe
        if use_faiss is None:
            use_faiss = _faiss_available()
        self.faiss = (faiss_ivf_from_arrays(vectors, self.centroids, self.rows, self.offsets)
                      if use_faiss else None)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.ascontiguousarray(queries, np.float32)
        if self.faiss is not None:
            self.faiss.nprobe = self.nprobe  # type: ignore[attr-defined]
            return self.faiss.search(queries, k)[1].astype(np.int64)  # type: ignore[attr-defined]
        return ivf_search(self.vectors, self.centroids, self.rows, self.offsets, queries, k,
                          self.nprobe)


def faiss_ivf_from_arrays(vectors: np.ndarray, centroids: np.ndarray, rows: np.ndarray,
                          offsets: np.ndarray) -> object:
    """A faiss IndexIVFFlat (inner product) holding exactly the lists of checked arrays:
    the centroids as its coarse quantizer, each list's rows (ids) and vectors (codes) added
    with `add_entries`, which copies them."""
    import faiss

    dim, lists = vectors.shape[1], len(centroids)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(np.ascontiguousarray(centroids, np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    ids = np.ascontiguousarray(rows, np.int64)
    for j in range(lists):
        start, end = int(offsets[j]), int(offsets[j + 1])
        if end > start:
            codes = np.ascontiguousarray(vectors[ids[start:end]], np.float32).view(np.uint8)
            index.invlists.add_entries(j, end - start, faiss.swig_ptr(ids[start:end]),
                                       faiss.swig_ptr(codes))
    index.ntotal = len(vectors)
    return index


def ivf_search(vectors: np.ndarray, centroids: np.ndarray, rows: np.ndarray,
               offsets: np.ndarray, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """(Q, k) rows (see `Index`). Batched by list: every list probed by any query is scored
    once against all the queries probing it (one matrix product per list), each query keeps
    its best k per list, and the best k of those are its answer."""
    count_q, lists = len(queries), len(centroids)
    nprobe = min(nprobe, lists)
    if count_q == 0:
        return np.zeros((0, k), np.int64)
    coarse = queries @ centroids.T
    if nprobe < lists:
        probe = np.argpartition(-coarse, nprobe - 1, axis=1)[:, :nprobe]
    else:
        probe = np.broadcast_to(np.arange(lists), (count_q, lists))
    best_s = np.full((count_q, nprobe, k), -np.inf, np.float32)
    best_i = np.full((count_q, nprobe, k), -1, np.int64)
    flat = probe.ravel()
    order = np.argsort(flat, kind="stable")
    pair_list = flat[order]
    pair_query, pair_slot = np.divmod(order, nprobe)
    bounds = np.flatnonzero(np.diff(pair_list)) + 1
    for group in np.split(np.arange(len(order)), bounds):
        which = pair_list[group[0]]
        start, end = offsets[which], offsets[which + 1]
        if start == end:
            continue
        members = rows[start:end]
        block = vectors[members]
        step = max(1, _SMALL_PRODUCT // (block.size or 1))
        for first in range(0, len(group), step):
            part = group[first:first + step]
            asking, slots = pair_query[part], pair_slot[part]
            scores = queries[asking] @ block.T
            if end - start > k:
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores = np.take_along_axis(scores, top, 1)
            else:
                top = np.broadcast_to(np.arange(end - start), scores.shape)
            width = scores.shape[1]
            best_s[asking, slots, :width] = scores
            best_i[asking, slots, :width] = members[top]
    best_s = best_s.reshape(count_q, -1)
    best_i = best_i.reshape(count_q, -1)
    keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k] if best_s.shape[1] > k \
        else np.broadcast_to(np.arange(best_s.shape[1]), best_s.shape)
    best_s = np.take_along_axis(best_s, keep, 1)
    best_i = np.take_along_axis(best_i, keep, 1)
    ranked = np.lexsort((best_i, -best_s), axis=1)
    found = np.take_along_axis(best_i, ranked, 1)
    found[np.take_along_axis(best_s, ranked, 1) == -np.inf] = -1
    return found
