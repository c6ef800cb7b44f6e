"""Approximate nearest-neighbour indexes for `twhin neighbors`: the IVF index of plain
arrays that `twhin export --index` writes (k-means and scan by faiss or by numpy) against
hnswlib's HNSW graph (and, with --all, faiss's own IVFFlat and HNSWFlat files).

On N rows of D-dimensional float32 vectors (default 1,000,000 x 64) shaped like trained
embeddings (clustered, with norms that vary by row, as popular entities get longer vectors),
each candidate index is built, saved, loaded and queried with Q query vectors, and compared
with exact search (one matrix product per chunk of rows, what `twhin neighbors` did before):

* build seconds, index file bytes, load seconds (for the IVF index: every check and the
  digest `twhin neighbors` runs, plus faiss's in-memory index built from the arrays);
* recall@k: the share of the exact top k (by dot product) the index returns in its top k;
* queries/s: Q queries in one batch call, on every core the process may use; every index
  stays loaded and the queries run in --rounds interleaved rounds (median reported), so
  the methods meet the same load.

The score is a dot product (plus a per-query constant, which does not change a query's
order), so each index ranks by inner product: hnswlib's space "ip", faiss's
METRIC_INNER_PRODUCT. The usual alternative for HNSW, the reduction of inner product to L2
(one more coordinate sqrt(M^2 - |x|^2) per row, 0 per query; Bachrach et al. 2014), is
measured with `--reduction` and left out of the default set: on these 1M rows hnswlib with
the reduction (M=16, efC=100) reached recall@10 0.087 / 0.107 / 0.137 at ef 32 / 64 / 128
(built in 1154 s on a loaded 2-core host), as the extra coordinate dominates the distances.

    python -m benchmarks.neighbors [--rows 1000000] [--dim 64] [--queries 1000] [--rounds 3]
                                   [--all] [--quick]

Writes benchmarks/results/neighbors-<name>.json (default name cpu-<cores>core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def embeddings(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered vectors with log-normal norms (a stand-in for trained embeddings)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, rows // 1000), dim)).astype(np.float32)
    out = np.empty((rows, dim), np.float32)
    step = 1 << 18
    for start in range(0, rows, step):
        end = min(rows, start + step)
        which = rng.integers(0, len(centers), end - start)
        part = centers[which] + 0.5 * rng.standard_normal((end - start, dim), np.float32)
        part *= rng.lognormal(0.0, 0.3, (end - start, 1)).astype(np.float32) / np.sqrt(dim)
        out[start:end] = part
    return out


def augment(vectors: np.ndarray) -> np.ndarray:
    """The inner-product-to-L2 reduction of the rows (module docstring)."""
    norms = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1))


def pad_queries(queries: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(
        [queries, np.zeros((len(queries), 1), np.float32)], axis=1))


# Each method: build(vectors, path) -> None; load(path, vectors) -> {variant: search}, where
# search(queries, k, setting) -> (Q, k) rows.
Search = Callable[[np.ndarray, int, int], np.ndarray]
Method = tuple[Callable[[np.ndarray, str], None], Callable[[str, np.ndarray], dict[str, Search]],
               str, list[int]]


def _hnswlib_build(m: int, ef_construction: int, reduction: bool = False
                   ) -> Callable[[np.ndarray, str], None]:
    def build(vectors: np.ndarray, path: str) -> None:
        import hnswlib

        data = augment(vectors) if reduction else vectors
        index = hnswlib.Index(space="l2" if reduction else "ip", dim=data.shape[1])
        index.init_index(max_elements=len(data), M=m, ef_construction=ef_construction,
                         random_seed=0)
        index.add_items(data, np.arange(len(data)))
        index.save_index(path)
    return build


def _hnswlib_load(reduction: bool = False
                  ) -> Callable[[str, np.ndarray], dict[str, Search]]:
    def load(path: str, vectors: np.ndarray) -> dict[str, Search]:
        import hnswlib

        index = hnswlib.Index(space="l2" if reduction else "ip",
                              dim=vectors.shape[1] + reduction)
        index.load_index(path)

        def search(queries: np.ndarray, k: int, ef: int) -> np.ndarray:
            index.set_ef(max(ef, k))
            padded = pad_queries(queries) if reduction else queries
            return index.knn_query(padded, k=k)[0].astype(np.int64)
        return {"hnswlib": search}
    return load


def _faiss_hnsw_build(m: int, ef_construction: int) -> Callable[[np.ndarray, str], None]:
    def build(vectors: np.ndarray, path: str) -> None:
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(np.ascontiguousarray(vectors))
        faiss.write_index(index, path)
    return build


def _faiss_hnsw_load(path: str, vectors: np.ndarray) -> dict[str, Search]:
    import faiss

    index = faiss.read_index(path)

    def search(queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        index.hnsw.efSearch = max(ef, k)
        return index.search(np.ascontiguousarray(queries), k)[1].astype(np.int64)
    return {"faiss": search}


def _faiss_ivf_build(lists: int) -> Callable[[np.ndarray, str], None]:
    def build(vectors: np.ndarray, path: str) -> None:
        import faiss

        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], lists,
                                   faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(len(vectors), min(len(vectors), 64 * lists),
                                    replace=False)]
        index.train(sample)
        index.add(vectors)
        faiss.write_index(index, path)
    return build


def _faiss_ivf_search(index: object) -> Search:
    def search(queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        index.nprobe = nprobe  # type: ignore[attr-defined]
        return index.search(np.ascontiguousarray(queries), k)[1].astype(np.int64)  # type: ignore[attr-defined]
    return search


def _faiss_ivf_load(path: str, vectors: np.ndarray) -> dict[str, Search]:
    import faiss

    return {"faiss": _faiss_ivf_search(faiss.read_index(path))}


def _tml_ivf_build(use_faiss: bool) -> Callable[[np.ndarray, str], None]:
    """The index `twhin export --index` writes (projects.twhin.neighbor_index), its
    k-means by faiss or by numpy."""
    def build(vectors: np.ndarray, path: str) -> None:
        from projects.twhin.neighbor_index import IndexBuilder

        builder = IndexBuilder(*vectors.shape)
        builder.add(vectors)
        entry = builder.save(os.path.dirname(path), "table", use_faiss=use_faiss)
        with open(path, "w") as handle:
            json.dump(entry, handle)
    return build


def _tml_ivf_load(with_faiss: bool) -> Callable[[str, np.ndarray], dict[str, Search]]:
    """What `twhin neighbors` does: every file checked, the digest compared (timed as the
    load), then numpy's search; with `with_faiss` also faiss's scan of the same lists."""
    def load(path: str, vectors: np.ndarray) -> dict[str, Search]:
        from projects.twhin.neighbor_index import Index, faiss_ivf_from_arrays, ivf_search

        with open(path) as handle:
            entry = json.load(handle)
        index = Index(os.path.dirname(path), "table", entry, vectors, use_faiss=False)

        def numpy_search(queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
            return ivf_search(vectors, index.centroids, index.rows, index.offsets, queries, k,
                              nprobe)
        found = {"numpy": numpy_search}
        if with_faiss:
            start = time.perf_counter()
            rebuilt = faiss_ivf_from_arrays(vectors, index.centroids, index.rows,
                                            index.offsets)
            print(f"  faiss IndexIVFFlat from the checked arrays: "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
            found["faiss from arrays"] = _faiss_ivf_search(rebuilt)
        return found
    return load


def methods(rows: int, reduction: bool = False, everything: bool = False) -> dict[str, Method]:
    """name -> (build, load, the search knob, its settings). hnswlib's row uses the build
    parameters `twhin export --index` used before the IVF index; the tml IVF rows are what
    it writes now (k-means by faiss when installed, else numpy)."""
    from projects.twhin.neighbor_index import list_count

    lists = list_count(rows)
    probes = [4, 8, 16, 32, 64]
    found: dict[str, Method] = {
        "hnswlib HNSW ip M=16 efC=100": (
            _hnswlib_build(16, 100), _hnswlib_load(), "ef", [16, 32, 64, 128, 256]),
        f"tml IVF arrays nlist={lists}, k-means faiss": (
            _tml_ivf_build(True), _tml_ivf_load(True), "nprobe", probes),
        f"tml IVF arrays nlist={lists}, k-means numpy": (
            _tml_ivf_build(False), _tml_ivf_load(True), "nprobe", probes),
    }
    if everything:
        found[f"faiss IVFFlat ip nlist={lists}"] = (
            _faiss_ivf_build(lists), _faiss_ivf_load, "nprobe", probes)
        found["faiss HNSWFlat ip M=16 efC=100"] = (
            _faiss_hnsw_build(16, 100), _faiss_hnsw_load, "efSearch", [16, 32, 64, 128, 256])
    if reduction:
        found["hnswlib HNSW l2-reduction M=16 efC=100"] = (
            _hnswlib_build(16, 100, True), _hnswlib_load(True), "ef", [32, 64, 128])
    return found


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / exact.size


def measure(rows: int, dim: int, queries: int, k: int, only: list[str] | None = None,
            reduction: bool = False, everything: bool = False, rounds: int = 3) -> dict:
    """Every method's build, load, recall and speed on one data set (module docstring).
    Builds run one after the other; then every loaded index stays in memory and the
    queries run in `rounds` interleaved rounds (each method and setting once per round,
    exact search included), reported as the median queries/s and every round's figure."""
    vectors = embeddings(rows, dim)
    rng = np.random.default_rng(1)
    picked = vectors[rng.choice(rows, queries, replace=False)]
    query = (picked + 0.1 * rng.standard_normal(picked.shape).astype(np.float32)
             * np.abs(picked).mean()).astype(np.float32)
    from projects.twhin.neighbors import exact_top_k  # what `twhin neighbors --exact` runs

    exact = exact_top_k(vectors, query, k, chunk=1 << 16)
    report: dict = {"rows": rows, "dim": dim, "queries": queries, "k": k, "rounds": rounds,
                    "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
                    "methods": {}}
    loaded: dict[str, tuple[str, list[int], dict[str, Search]]] = {}
    with tempfile.TemporaryDirectory(prefix="neighbors-bench-") as work:
        for number, (name, (build, load, knob, settings)) in enumerate(
                methods(rows, reduction, everything).items()):
            if only and not any(word in name for word in only):
                continue
            folder = os.path.join(work, str(number))
            os.makedirs(folder)
            path = os.path.join(folder, "index.bin")
            start = time.perf_counter()
            build(vectors, path)
            built_s = time.perf_counter() - start
            start = time.perf_counter()
            searchers = load(path, vectors)
            load_s = time.perf_counter() - start
            files = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
            row = {"build_s": round(built_s, 2), "load_s": round(load_s, 3),
                   "file_bytes": files, "load_average_after_build":
                   [round(x, 2) for x in os.getloadavg()], "search": {}}
            for variant, search in searchers.items():
                row["search"][variant] = []
                for setting in settings:
                    found = search(query, k, setting)
                    row["search"][variant].append(
                        {knob: setting, f"recall_at_{k}": round(recall(found, exact), 4),
                         "queries_per_s_rounds": []})
            print(name, json.dumps(row), flush=True)
            report["methods"][name] = row
            loaded[name] = (knob, settings, searchers)
        exact_rounds: list[float] = []
        for _ in range(rounds):
            start = time.perf_counter()
            exact_top_k(vectors, query, k, chunk=1 << 16)
            exact_rounds.append(round(queries / (time.perf_counter() - start), 1))
            for name, (_, settings, searchers) in loaded.items():
                for variant, search in searchers.items():
                    for entry, setting in zip(report["methods"][name]["search"][variant],
                                              settings):
                        search(query[:10], k, setting)   # warm
                        start = time.perf_counter()
                        search(query, k, setting)
                        seconds = time.perf_counter() - start
                        entry["queries_per_s_rounds"].append(round(queries / seconds, 1))
            print(f"round done, load {os.getloadavg()[0]:.2f}", flush=True)
        report["exact"] = {"queries_per_s": float(np.median(exact_rounds)),
                           "queries_per_s_rounds": exact_rounds}
        for row in report["methods"].values():
            for entries in row["search"].values():
                for entry in entries:
                    entry["queries_per_s"] = float(np.median(entry["queries_per_s_rounds"]))
    report["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="Methods whose name holds one of these words.")
    parser.add_argument("--reduction", action="store_true", help="Also hnswlib with the "
                        "inner-product-to-L2 reduction.")
    parser.add_argument("--all", action="store_true", help="Also faiss's own IVFFlat and "
                        "HNSWFlat (their files are faiss's binary format).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved query rounds.")
    parser.add_argument("--quick", action="store_true", help="20,000 rows (a smoke test).")
    parser.add_argument("--name", default=f"cpu-{os.cpu_count()}core")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    rows = 20_000 if args.quick else args.rows
    report = measure(rows, args.dim, args.queries, args.k, args.only, args.reduction,
                     args.all, args.rounds)
    report["host"] = {"cores": os.cpu_count(), "machine": platform.machine()}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"neighbors-{args.name}.json")
    if not args.quick:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
