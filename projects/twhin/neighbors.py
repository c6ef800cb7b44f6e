"""`twhin neighbors`: the k best-scoring entities for entities, from an export directory.

With a relation: the best tails t of (ID, REL, t) by the relation's own operator (the
model's scoring, `operators_np.relation_query`, so the ranking is the one training
optimised). Without: the plain dot product with the other rows of ID's table (ID itself
left out).

Runs on numpy and pyarrow alone, with or without an index: no torch, no torchrec, no
compiled index library, so it works wherever the exported parquet files can be read.

How candidates are found: with an index beside the target table (`twhin export --index`,
`projects.twhin.neighbor_index`, an inverted file of plain arrays) the index proposes the
best rows by inner product among the rows of the `nprobe` lists nearest each query, which
orders candidates exactly as the score does (the operator's constant b is the same for all
candidates of a query); without one, or with `exact=True`, every row is scored in chunks
of `_CHUNK_ROWS` rows with one matrix product each and only each chunk's top is kept, so
memory is the table plus one chunk of scores. Either way the candidates are re-scored from
the exported vectors, so every score shown is exact, and ties are broken by row.

Excluded candidates (the entity itself without a relation; with `known`, the training
edges of that relation from the entity) are asked for on top of k and dropped afterwards,
so k results remain whatever is excluded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tml.errors import TmlError

from .operators_np import relation_query

_CHUNK_ROWS = 1 << 18
METADATA_FILE = "metadata.json"     # as projects.twhin.export writes it (torch-free here)
RELATIONS_FILE = "relations.parquet"
# With an index: queries whose k plus excluded rows exceed this share of the table are
# answered exactly (an index asked for most of the table is slower than a scan).
_INDEX_MAX_SHARE = 0.1


class NeighborsError(TmlError):
    """The entity, relation, file or export directory named is not usable."""


def _vectors(table: pa.Table) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


@dataclass
class Relation:
    name: str
    operator: str
    lhs: str
    rhs: str
    vector: np.ndarray


@dataclass
class Embeddings:
    """An export directory: per table its ids and (N, D) vectors, the relations, indexes.

    Tables are read when first used. `neighbors` / `neighbors_batch` query it; `vector`
    gives one entity's vector.
    """

    directory: str
    metadata: dict
    relations: dict[str, Relation]
    table_names: list[str]
    nprobe: int | None = None
    _ids: dict[str, pa.Array] = field(default_factory=dict, repr=False)
    _vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _indexes: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, directory: str, nprobe: int | None = None) -> Embeddings:
        """Open an export directory (see `projects.twhin.export`); tables load lazily.
        `nprobe`: the index's lists scanned per query (default
        `neighbor_index.DEFAULT_NPROBE`)."""
        if not os.path.isdir(directory):
            raise NeighborsError(f"{directory}: no such export directory")
        names = sorted(n[:-len(".parquet")] for n in os.listdir(directory)
                       if n.endswith(".parquet") and n != RELATIONS_FILE)
        if not names:
            raise NeighborsError(f"{directory}: holds no exported tables (run `twhin export`)")
        metadata: dict = {}
        try:
            with open(os.path.join(directory, METADATA_FILE)) as handle:
                metadata = json.load(handle)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as error:
            raise NeighborsError(f"{directory}/{METADATA_FILE}: unreadable ({error})") from None
        if not isinstance(metadata, dict):
            raise NeighborsError(f"{directory}/{METADATA_FILE}: not a JSON object")
        if not isinstance(metadata.get("entity_bias", False), bool):
            raise NeighborsError(f"{directory}/{METADATA_FILE}: entity_bias must be true or "
                                 f"false, got {metadata['entity_bias']!r}")
        relations: dict[str, Relation] = {}
        path = os.path.join(directory, RELATIONS_FILE)
        if os.path.isfile(path):
            table = pq.read_table(path)
            vectors = _vectors(table)
            for i, name in enumerate(table.column("name").to_pylist()):
                relations[name] = Relation(name, table.column("operator")[i].as_py(),
                                           table.column("lhs")[i].as_py(),
                                           table.column("rhs")[i].as_py(), vectors[i])
        return cls(os.path.abspath(directory), metadata, relations, names, nprobe)

    @property
    def entity_bias(self) -> bool:
        """Whether the vectors end in an entity bias (the trained model's `entity_bias`)."""
        return bool(self.metadata.get("entity_bias", False))   # checked by `load`

    # --- tables ------------------------------------------------------------------------

    def _check_table(self, table: str) -> None:
        if table not in self.table_names:
            raise NeighborsError(f"table '{table}' is not in {self.directory} (tables: "
                                 f"{', '.join(self.table_names)})")

    def _path(self, table: str) -> str:
        return os.path.join(self.directory, f"{table}.parquet")

    def ids(self, table: str) -> pa.Array:
        """The table's ids (row order) as a pyarrow string array."""
        self._check_table(table)
        if table not in self._ids:
            column = pq.read_table(self._path(table), columns=["id"]).column("id")
            self._ids[table] = column.combine_chunks()
        return self._ids[table]

    def vectors(self, table: str) -> np.ndarray:
        """The table's (N, D) float32 vectors, row i for `ids(table)[i]`."""
        self._check_table(table)
        if table not in self._vectors:
            self._vectors[table] = _vectors(pq.read_table(self._path(table),
                                                          columns=["vector"]))
        return self._vectors[table]

    def index(self, table: str) -> object | None:
        """The table's checked approximate index, or None when the export has none."""
        entry = (self.metadata.get("indexes") or {}).get(table)
        if entry is None:
            return None
        if table not in self._indexes:
            from .neighbor_index import DEFAULT_NPROBE, FORMAT, Index

            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                kind = entry.get("library") if isinstance(entry, dict) else None
                raise NeighborsError(
                    f"{self.directory}/{METADATA_FILE}: the index of '{table}' is "
                    f"{kind or 'of an unknown kind'} (an earlier tml's), which `twhin "
                    "neighbors` no longer reads: rebuild the export with `twhin export "
                    "--index`, or pass --exact")
            rows = (self.metadata.get("tables") or {}).get(table)
            dim = self.metadata.get("embedding_dim")
            if not isinstance(rows, int) or not isinstance(dim, int):
                raise NeighborsError(f"{self.directory}/{METADATA_FILE}: names an index for "
                                     f"'{table}' but not its rows and embedding_dim")
            vectors = self.vectors(table)
            if vectors.shape != (rows, dim):
                raise NeighborsError(f"{self._path(table)}: {vectors.shape[0]} rows of dim "
                                     f"{vectors.shape[1]}, {METADATA_FILE} says {rows} of "
                                     f"{dim}")
            self._indexes[table] = Index(self.directory, table, entry, vectors,
                                         nprobe=self.nprobe or DEFAULT_NPROBE)
        return self._indexes[table]

    def find(self, entities: Sequence[str], tables: Sequence[str]) -> tuple[str, np.ndarray]:
        """(table, rows) of `entities`, all in one of `tables`; one line naming the first
        entity that is in none of them, or in several."""
        values = pa.array(list(entities), pa.string())
        found: dict[str, np.ndarray] = {}
        for name in tables:
            rows = pc.index_in(values, value_set=self.ids(name))
            found[name] = rows.to_numpy(zero_copy_only=False)
        present = {name: ~np.isnan(rows.astype(float)) for name, rows in found.items()}
        hits = np.sum([p for p in present.values()], axis=0) if present else np.zeros(0)
        for i, count in enumerate(np.atleast_1d(hits)):
            if count == 0:
                raise NeighborsError(f"entity '{entities[i]}' is in none of the tables "
                                     f"{', '.join(tables)} of {self.directory}")
            if count > 1:
                raise NeighborsError(f"entity '{entities[i]}' is in several tables "
                                     f"({', '.join(n for n in tables if present[n][i])}); "
                                     "pass --table")
        owners = {name for name, p in present.items() if p.any()}
        if len(owners) > 1:
            first = {name: entities[int(np.argmax(present[name]))] for name in owners}
            raise NeighborsError("the entities are in different tables ("
                                 + ", ".join(f"'{e}' in {n}" for n, e in first.items())
                                 + "); query one table at a time")
        owner = owners.pop()
        return owner, found[owner].astype(np.int64)

    # --- queries -----------------------------------------------------------------------

    def vector(self, entity: str, table: str | None = None) -> np.ndarray:
        """The (D,) vector of one entity."""
        name, rows = self.find([entity], [table] if table else self.table_names)
        return self.vectors(name)[rows[0]]

    def neighbors(self, entity: str, relation: str | None = None, k: int = 10,
                  table: str | None = None, known: KnownEdges | None = None,
                  exact: bool = False) -> list[tuple[str, float]]:
        """[(id, score)] of the k best candidates for one entity, best first."""
        result = self.neighbors_batch([entity], relation, k, table, known, exact)
        return list(zip(result.column("id").to_pylist(), result.column("score").to_pylist()))

    def neighbors_batch(self, entities: Sequence[str], relation: str | None = None,
                        k: int = 10, table: str | None = None,
                        known: KnownEdges | None = None, exact: bool = False) -> pa.Table:
        """A table (query, rank, id, score) of the k best candidates of every entity."""
        if k < 1:
            raise NeighborsError(f"--k must be >= 1, got {k}")
        if not len(entities):
            raise NeighborsError("no entities to query")
        if table is not None:
            self._check_table(table)
        if relation is None:
            if known is not None:
                raise NeighborsError("known edges are per relation: pass --relation with "
                                     "--exclude-known")
            source, rows = self.find(entities, [table] if table else self.table_names)
            target = source
            queries = self.vectors(source)[rows]
            if self.entity_bias:
                # Likeness of the vectors the operators use: the bias and the unused
                # coordinate (the last two) left out of the dot product.
                queries = queries.copy()
                queries[:, -2:] = 0.0
            bias = np.zeros(len(rows), np.float32)
            excluded = [np.array([row]) for row in rows]
        else:
            if relation not in self.relations:
                raise NeighborsError(f"unknown relation '{relation}' (relations: "
                                     f"{', '.join(self.relations) or 'none'})")
            spec = self.relations[relation]
            if table is not None and table != spec.lhs:
                raise NeighborsError(f"relation '{relation}' starts at table '{spec.lhs}', "
                                     f"not '{table}'")
            source, rows = self.find(entities, [spec.lhs])
            target = spec.rhs
            queries, bias = relation_query(self.vectors(source)[rows], spec.vector,
                                           spec.operator, "tail", self.entity_bias)
            excluded = ([np.zeros(0, np.int64)] * len(rows) if known is None
                        else known.tails(relation, rows))
        candidates = self.vectors(target)
        k = min(k, len(candidates))
        found = self._search(target, queries, candidates, k, excluded, exact)
        ids = self.ids(target)
        names, ranks, hits, scores = [], [], [], []
        for i, entity in enumerate(entities):
            index = found[i]
            score = candidates[index] @ queries[i] + bias[i]
            order = np.lexsort((index, -score))
            keep = ~np.isin(index[order], excluded[i])
            index, score = index[order][keep][:k], score[order][keep][:k]
            names += [entity] * len(index)
            ranks += list(range(1, len(index) + 1))
            hits.append(index)
            scores.append(score.astype(np.float32))
        chosen = np.concatenate(hits) if hits else np.zeros(0, np.int64)
        return pa.table({"query": pa.array(names, pa.string()),
                         "rank": pa.array(ranks, pa.int32()),
                         "id": ids.take(pa.array(chosen)),
                         "score": pa.array(np.concatenate(scores), pa.float32())})

    def _search(self, target: str, queries: np.ndarray, candidates: np.ndarray, k: int,
                excluded: list[np.ndarray], exact: bool) -> list[np.ndarray]:
        """Per query, at least k + len(excluded) candidate rows (or all rows)."""
        wanted = np.array([min(len(candidates), k + len(e)) for e in excluded])
        out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(queries)
        index = None if exact else self.index(target)
        approximate = np.zeros(len(queries), bool)
        if index is not None:
            approximate = wanted <= max(k, _INDEX_MAX_SHARE * len(candidates))
        for use_index in (True, False):
            chosen = np.nonzero(approximate == use_index)[0]
            if not len(chosen):
                continue
            width = int(wanted[chosen].max())
            if use_index:
                rows = index.search(queries[chosen], width)  # type: ignore[union-attr]
                # a query whose probed lists hold fewer than `width` rows: answered exactly
                short = (rows < 0).any(axis=1)
                if short.any():
                    approximate[chosen[short]] = False
                    chosen = chosen[~short]
                    rows = rows[~short]
            else:
                rows = exact_top_k(candidates, queries[chosen], width)
            for j, i in enumerate(chosen):
                out[i] = rows[j]
        return out


def exact_top_k(candidates: np.ndarray, queries: np.ndarray, k: int,
                chunk: int = _CHUNK_ROWS) -> np.ndarray:
    """(Q, k) rows of the k largest dot products of each query with `candidates`, best
    first (ties: lower row first); memory is one chunk of Q x `chunk` scores."""
    k = min(k, len(candidates))
    best_i = np.empty((len(queries), 0), np.int64)
    best_s = np.empty((len(queries), 0), np.float32)
    for start in range(0, len(candidates), chunk):
        scores = queries @ candidates[start:start + chunk].T
        if scores.shape[1] > k:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        best_i = np.concatenate([best_i, part + start], axis=1)
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_i = np.take_along_axis(best_i, keep, 1)
            best_s = np.take_along_axis(best_s, keep, 1)
    order = np.lexsort((best_i, -best_s), axis=1) if best_i.size else best_i
    return np.take_along_axis(best_i, order, 1) if best_i.size else best_i


class KnownEdges:
    """The training edges of an import (`twhin import`'s OUT), to leave out of answers.

    Rows are the import's vocabulary rows, which are the export's rows when the export was
    trained on that import; the table sizes are checked against the export's and a
    mismatch is refused in one line.
    """

    def __init__(self, import_dir: str, embeddings: Embeddings) -> None:
        self.directory = import_dir
        self.embeddings = embeddings
        self._by_relation: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        vocab = os.path.join(import_dir, "vocab", RELATIONS_FILE)
        if not os.path.isfile(vocab):
            raise NeighborsError(f"--exclude-known {import_dir}: not a `twhin import` output "
                                 f"(no vocab/{RELATIONS_FILE})")
        relations = pq.read_table(vocab)
        self.relation_index = dict(zip(relations.column("name").to_pylist(),
                                       relations.column("index").to_pylist()))

    def _table_rows(self, table: str) -> int:
        path = os.path.join(self.directory, "vocab", "tables", f"{table}.parquet")
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise NeighborsError(f"--exclude-known: cannot read {path}: {error}") from None

    def _edges(self, relation: str) -> tuple[np.ndarray, np.ndarray]:
        if relation in self._by_relation:
            return self._by_relation[relation]
        if relation not in self.relation_index:
            raise NeighborsError(f"--exclude-known {self.directory}: its import has no "
                                 f"relation '{relation}'")
        spec = self.embeddings.relations[relation]
        for side in (spec.lhs, spec.rhs):
            rows = len(self.embeddings.ids(side))
            if self._table_rows(side) != rows:
                raise NeighborsError(f"--exclude-known {self.directory}: table '{side}' has "
                                     f"{self._table_rows(side)} rows there and {rows} in the "
                                     "export: not the import this export was trained on")
        train = os.path.join(self.directory, "train")
        files = sorted(os.path.join(train, n) for n in os.listdir(train)
                       if n.endswith(".parquet")) if os.path.isdir(train) else []
        if not files:
            raise NeighborsError(f"--exclude-known {self.directory}: no train/*.parquet")
        code = self.relation_index[relation]
        heads, tails = [], []
        for path in files:
            table = pq.read_table(path, columns=["lhs", "rel", "rhs"],
                                  filters=[("rel", "=", code)])
            heads.append(table.column("lhs").to_numpy())
            tails.append(table.column("rhs").to_numpy())
        lhs, rhs = np.concatenate(heads), np.concatenate(tails)
        limits = (len(self.embeddings.ids(spec.lhs)), len(self.embeddings.ids(spec.rhs)))
        bad = (lhs < 0) | (lhs >= limits[0]) | (rhs < 0) | (rhs >= limits[1])
        if bad.any():
            raise NeighborsError(f"--exclude-known {self.directory}: an edge of '{relation}' "
                                 "names a row outside the export's tables")
        order = np.argsort(lhs, kind="stable")
        self._by_relation[relation] = (lhs[order], rhs[order])
        return self._by_relation[relation]

    def tails(self, relation: str, heads: np.ndarray) -> list[np.ndarray]:
        """Per head row: the tail rows of its training edges of `relation`."""
        lhs, rhs = self._edges(relation)
        start = np.searchsorted(lhs, heads, "left")
        end = np.searchsorted(lhs, heads, "right")
        return [np.unique(rhs[a:b]) for a, b in zip(start, end)]


def neighbors(directory: str, entity: str, relation: str | None = None, k: int = 10,
              table: str | None = None, known: str | None = None,
              exact: bool = False) -> list[tuple[str, float]]:
    """[(id, score)] of the k best candidates, best first (see module docstring)."""
    embeddings = Embeddings.load(directory)
    edges = KnownEdges(known, embeddings) if known else None
    return embeddings.neighbors(entity, relation, k, table, edges, exact)


def read_entities(path: str) -> list[str]:
    """One entity per line (blank lines skipped); one line naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            entities = [line.strip() for line in handle]
    except OSError as error:
        raise NeighborsError(f"--entities {path}: cannot read: "
                             f"{error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise NeighborsError(f"--entities {path}: not UTF-8 text ({error.reason})") from None
    entities = [e for e in entities if e]
    if not entities:
        raise NeighborsError(f"--entities {path}: holds no entities")
    return entities


def write_results(table: pa.Table, out: str) -> None:
    """`out` as parquet (.parquet / .pq) or TSV (anything else), written whole or not at all."""
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if out.lower().endswith((".parquet", ".pq")):
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write("query\trank\tid\tscore\n")
                for q, r, i, s in zip(*(table.column(c).to_pylist() for c in table.column_names)):
                    handle.write(f"{q}\t{r}\t{i}\t{s:.6g}\n")
        os.replace(tmp, out)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise NeighborsError(f"--out {out}: cannot write ({error.strerror or error})") from None


def format_table(rows: list[tuple[str, float]]) -> str:
    """An aligned text table: rank, id, score."""
    width = max([len("id")] + [len(str(i)) for i, _ in rows])
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>10}"]
    lines += [f"{rank:>4}  {str(i):<{width}}  {s:>10.4f}"
              for rank, (i, s) in enumerate(rows, 1)]
    return "\n".join(lines)
