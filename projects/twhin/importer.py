"""`twhin import`: string triples (TSV, CSV or parquet) to id-mapped TwHIN training data.

Input: rows `head, relation, tail` with string ids. An id `type:name` belongs to table
`type`, an id without a colon to table `entity`; a relation must link the same pair of
tables every time it occurs. Output, in OUT:

    train/part-00000.parquet, validation/..., test/...   int64 columns lhs, rel, rhs
    vocab/<table>.parquet      id (the original string), row (int64): the table's rows
    vocab/relations.parquet    name, index, lhs, rhs (tables)
    config.yaml                a TwhinConfig that trains as is; paths use ${CONFIG_DIR}

Why it is built this way: input files are read in chunks of `_CHUNK_ROWS` rows and each
mapped chunk is appended to its split's parquet file at once, so memory is the vocabularies
plus one chunk, whatever the size of the input. Ids get rows in order of first appearance,
across all input files, so an id seen only in the test file still has a row (evaluation
then counts it as unseen in training). Everything is written into a temporary sibling
directory renamed into place at the end: an error leaves nothing half-written.

Training settings of the written config (`choose_defaults`; docs/twhin_cli.md has the
table and the measurements): one statistic, counted while streaming, decides between the
settings for large graphs with few relations and those for small, many-relation graphs:
`same_relation` = B * sum_r (n_r / N)^2, the expected number of edges of a positive's own
relation in its batch of B = N / 20 edges (at most 1000); in-batch negatives are drawn
among exactly those. At 50 or more (the built-in graph: ~335) the config is what the
importer always wrote: 10 in-batch + 5 global negatives, Adagrad 0.5, SGD 0.05 for the
relation vectors, operator translation. Below 50 (Nations 2.6, UMLS 16.5, Kinships 25.9)
the in-batch negatives would be few and mostly the positive itself, so: no in-batch
negatives, min(32, smallest table - 1) global ones, Adagrad 5, SGD 50 (each relation
vector gets about 1/R of a batch's gradient) and operator complex_diagonal (translation
adds only a per-entity bias to one shared dot(lhs, rhs), which cannot tell many relations
between the same entities apart), and epochs enough for 4000 steps (10 to 200; the
other side keeps 10). Chosen on the validation splits of Nations, UMLS and Kinships; test
MRR, mean of 3 seeds, 0.674, 0.812 and 0.748 with these settings, 0.358, 0.076 and 0.035
with the earlier config.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tml.common.atomic_directory import atomic_directory, refuse_non_empty
from tml.errors import DataError

UNTYPED_TABLE = "entity"
SPLITS = ("train", "validation", "test")
_CHUNK_ROWS = 100_000
_SCHEMA = pa.schema([("lhs", pa.int64()), ("rel", pa.int64()), ("rhs", pa.int64())])


@dataclass
class Vocabulary:
    """String ids to rows per table, relation names to indices and their tables."""

    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)
    relation_tables: list[tuple[str, str]] = field(default_factory=list)

    def row(self, entity: str) -> tuple[str, int]:
        table = entity.split(":", 1)[0] if ":" in entity else UNTYPED_TABLE
        ids = self.tables.setdefault(table, {})
        index = ids.get(entity)
        if index is None:
            index = ids[entity] = len(ids)
        return table, index

    def relation(self, name: str, lhs: str, rhs: str, where: str) -> int:
        index = self.relations.get(name)
        if index is None:
            index = self.relations[name] = len(self.relations)
            self.relation_tables.append((lhs, rhs))
        elif self.relation_tables[index] != (lhs, rhs):
            first = self.relation_tables[index]
            raise DataError(f"{where}: relation '{name}' links tables {lhs} -> {rhs}, but "
                            f"earlier rows link {first[0]} -> {first[1]}; a relation must "
                            "connect the same tables every time")
        return index


def _format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet") or lower.endswith(".pq"):
        return "parquet"
    if lower.endswith((".tsv", ".tab")):
        return "\t"
    if lower.endswith(".csv"):
        return ","
    with open(path, newline="") as handle:
        first = handle.readline()
    return "\t" if "\t" in first else ","


def read_triples(path: str) -> Iterator[tuple[list[tuple[str, str, str]], list[str]]]:
    """Chunks of (head, relation, tail) strings, with where each row is ("line 7", "row 7").

    Raises DataError naming the file and line of a row with the wrong number of fields, and
    for a file without any triple.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    kind = _format(path)
    found = False
    if kind == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"{path}: cannot read as parquet: {error}") from None
        names = parquet.schema_arrow.names
        wanted = ["head", "relation", "tail"]
        columns = wanted if all(n in names for n in wanted) else names[:3]
        if len(columns) < 3:
            raise DataError(f"{path}: needs columns head, relation, tail (has "
                            f"{', '.join(names)})")
        line = 1
        for batch in parquet.iter_batches(batch_size=_CHUNK_ROWS, columns=columns):
            values = [batch.column(i).cast(pa.string()).to_pylist() for i in range(3)]
            for i, column in enumerate(values):
                if None in column:
                    row = line + column.index(None) - 1
                    raise DataError(f"{path}: row {row}: column '{columns[i]}' is empty")
            if values[0]:
                found = True
                yield list(zip(*values)), [f"row {line + i}" for i in range(batch.num_rows)]
            line += batch.num_rows
    else:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=kind)
            chunk: list[tuple[str, str, str]] = []
            lines: list[str] = []
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != 3:
                    raise DataError(f"{path}: line {reader.line_num}: expected 3 fields "
                                    f"(head, relation, tail), got {len(fields)}")
                fields = [f.strip() for f in fields]
                if not found and not chunk and [f.lower() for f in fields] == [
                        "head", "relation", "tail"]:
                    continue  # header
                if not all(fields):
                    raise DataError(f"{path}: line {reader.line_num}: empty field")
                chunk.append((fields[0], fields[1], fields[2]))
                lines.append(f"line {reader.line_num}")
                if len(chunk) >= _CHUNK_ROWS:
                    found = True
                    yield chunk, lines
                    chunk, lines = [], []
            if chunk:
                found = True
                yield chunk, lines
    if not found:
        raise DataError(f"{path}: holds no triples (empty file?)")


def _map(chunk: list[tuple[str, str, str]], vocab: Vocabulary, path: str,
         where: list[str]) -> pa.Table:
    lhs = np.empty(len(chunk), np.int64)
    rel = np.empty(len(chunk), np.int64)
    rhs = np.empty(len(chunk), np.int64)
    for i, (head, relation, tail) in enumerate(chunk):
        head_table, lhs[i] = vocab.row(head)
        tail_table, rhs[i] = vocab.row(tail)
        rel[i] = vocab.relation(relation, head_table, tail_table, f"{path}: {where[i]}")
    return pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}, schema=_SCHEMA)


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' -> fractions of train, validation and test (must sum to 1)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r}: expected three numbers like 0.9,0.05,0.05") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise DataError(f"--split {text!r}: expected three non-negative fractions summing to 1")
    return parts  # type: ignore[return-value]


def import_triples(train: str, out: str, valid: str | None = None, test: str | None = None,
                   split: str = "0.9,0.05,0.05", seed: int = 0, dim: int = 32,
                   force: bool = False) -> dict:
    """Run the import (see module docstring); returns counts per split and table sizes."""
    out = os.path.abspath(out)
    if dim < 1:
        raise DataError(f"--dim must be >= 1, got {dim}")
    refuse_non_empty(out, force, DataError)
    fractions = parse_split(split) if valid is None and test is None else None
    with atomic_directory(out) as tmp:
        summary = _import(train, valid, test, fractions, seed, dim, tmp)
    summary["out"] = out
    return summary


def _import(train: str, valid: str | None, test: str | None,
            fractions: tuple[float, float, float] | None, seed: int, dim: int,
            tmp: str) -> dict:
    vocab = Vocabulary()
    writers: dict[str, pq.ParquetWriter] = {}
    counts = dict.fromkeys(SPLITS, 0)
    relation_edges = np.zeros(0, np.int64)   # training edges per relation (the rule's input)
    rng = np.random.default_rng(seed)

    def write(split_name: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if split_name not in writers:
            os.makedirs(os.path.join(tmp, split_name))
            writers[split_name] = pq.ParquetWriter(
                os.path.join(tmp, split_name, "part-00000.parquet"), _SCHEMA)
        writers[split_name].write_table(table)
        counts[split_name] += table.num_rows
        if split_name == "train":
            nonlocal relation_edges
            found = np.bincount(table.column("rel").to_numpy(), minlength=len(relation_edges))
            found[:len(relation_edges)] += relation_edges
            relation_edges = found

    sources = [(train, "train")]
    if valid is not None:
        sources.append((valid, "validation"))
    if test is not None:
        sources.append((test, "test"))
    try:
        for path, split_name in sources:
            for chunk, where in read_triples(path):
                table = _map(chunk, vocab, path, where)
                if fractions is None:
                    write(split_name, table)
                    continue
                u = rng.random(table.num_rows)
                bounds = np.cumsum(fractions)
                which = np.searchsorted(bounds[:-1], u, side="right")
                for index, name in enumerate(SPLITS):
                    write(name, table.filter(pa.array(which == index)))
    finally:
        for writer in writers.values():
            writer.close()
    if not counts["train"]:
        raise DataError(f"{train}: no edges ended up in the training split")

    os.makedirs(os.path.join(tmp, "vocab"))
    for table_name, ids in vocab.tables.items():
        pq.write_table(pa.table({"id": pa.array(list(ids), pa.string()),
                                 "row": pa.array(np.arange(len(ids), dtype=np.int64))}),
                       os.path.join(tmp, "vocab", f"{table_name}.parquet"))
    names = list(vocab.relations)
    pq.write_table(pa.table({"name": names, "index": np.arange(len(names), dtype=np.int64),
                             "lhs": [t[0] for t in vocab.relation_tables],
                             "rhs": [t[1] for t in vocab.relation_tables]}),
                   os.path.join(tmp, "vocab", "relations.parquet"))
    per_relation = [int(n) for n in relation_edges] + [0] * (len(names) - len(relation_edges))
    used = {t for pair in vocab.relation_tables for t in pair}
    defaults = choose_defaults(counts["train"], per_relation,
                               [len(ids) for t, ids in vocab.tables.items() if t in used], dim)
    config = default_config(vocab, counts, dim, defaults)
    with open(os.path.join(tmp, "config.yaml"), "w") as handle:
        handle.write("# Written by `twhin import`; paths are relative to this file.\n"
                     f"# Defaults chosen by the rule in docs/twhin_cli.md: {defaults.reason}.\n")
        yaml.safe_dump(config, handle, sort_keys=False)
    return {"edges": counts, "tables": {t: len(ids) for t, ids in vocab.tables.items()},
            "relations": len(names), "defaults": defaults.reason}


# --- the defaults of the written config ----------------------------------------------------
# The rule (module docstring, docs/twhin_cli.md): see `choose_defaults`.
BATCH_EDGES_FRACTION = 20          # batch = train edges / 20 (at most 1000): 20 steps/epoch
MAX_BATCH = 1000
MIN_SAME_RELATION = 50.0           # below: the "dense, many relations" settings
MIN_STEPS = 4000                   # many relations: epochs for this many steps (10-200)
MAX_GLOBAL_NEGATIVES = 32


@dataclass
class Defaults:
    """The training settings `twhin import` writes, and why (`reason`, one line)."""

    batch: int
    in_batch_negatives: int
    global_negatives: int
    table_lr: float
    relation_lr: float
    operator: str
    epochs: int
    same_relation: float
    reason: str


def choose_defaults(train_edges: int, relation_edges: list[int], table_rows: list[int],
                    dim: int) -> Defaults:
    """The rule for the written config, from statistics seen while streaming the input.

    `relation_edges`: training edges per relation; `table_rows`: rows of every table a
    relation uses. The deciding number is `same_relation`, the expected number of edges
    of a positive's own relation in its batch, B * sum_r (n_r / N)^2: in-batch negatives
    are drawn among those, so when it is small they are few and mostly the positive itself.

    - same_relation >= 50 (large graphs with few relations; the built-in graph: ~335):
      the previous defaults, unchanged: 10 in-batch + 5 global negatives, Adagrad 0.5 for
      the tables, SGD 0.05 for the relation vectors, operator translation.
    - same_relation < 50 (many relations per batch; Nations 2.6, UMLS 16.5, Kinships 25.9):
      no in-batch negatives; min(32, smallest table - 1) global negatives; Adagrad 5 and
      SGD 50 (each relation vector gets ~1/R of a batch's gradient); operator
      complex_diagonal (diagonal for an odd dim): translation adds only a per-entity bias
      to dot(lhs, rhs), which cannot tell many relations between the same tables apart.
      Epochs: enough for MIN_STEPS steps, between 10 and 200 (other graphs: 10, as before).
    """
    batch = max(1, min(MAX_BATCH, train_edges // BATCH_EDGES_FRACTION))
    total = max(1, sum(relation_edges))
    same_relation = batch * sum((n / total) ** 2 for n in relation_edges)
    steps_per_epoch = max(1, train_edges // batch)
    if same_relation >= MIN_SAME_RELATION:
        return Defaults(batch, 10, 5, 0.5, 0.05, "translation", 10, same_relation,
                        f"{same_relation:.0f} edges of a relation per batch of {batch}: "
                        "in-batch negatives, operator translation")
    smallest = min(table_rows, default=2)
    negatives = max(1, min(MAX_GLOBAL_NEGATIVES, smallest - 1))
    operator = "complex_diagonal" if dim % 2 == 0 else "diagonal"
    epochs = min(200, max(10, -(-MIN_STEPS // steps_per_epoch)))
    return Defaults(batch, 0, negatives, 5.0, 50.0, operator, epochs, same_relation,
                    f"only {same_relation:.1f} edges of a relation per batch of {batch} "
                    f"(< {MIN_SAME_RELATION:.0f}): {negatives} global negatives instead of "
                    f"in-batch ones, higher learning rates, operator {operator}")


def default_config(vocab: Vocabulary, counts: dict[str, int], dim: int,
                         defaults: Defaults) -> dict:
    """A TwhinConfig (as a dict) for the imported data, with `choose_defaults`' settings."""
    batch = defaults.batch

    def data(split_name: str) -> dict:
        return {"data_root": f"${{CONFIG_DIR}}/{split_name}", "per_replica_batch_size": batch,
                "global_negatives": defaults.global_negatives,
                "in_batch_negatives": defaults.in_batch_negatives}

    steps_per_epoch = max(1, counts["train"] // batch)
    config = {
        "training": {"num_train_steps": 1_000_000, "num_epochs": defaults.epochs,
                     "checkpoint_every_n": 10 * steps_per_epoch,
                     "train_log_every_n": max(1, steps_per_epoch // 2),
                     "eval_log_every_n": 5 * steps_per_epoch, "num_eval_steps": 20},
        "model": {
            "translation_optimizer": {"sgd": {"lr": defaults.relation_lr}},
            "embeddings": {"tables": [
                {"name": name, "num_embeddings": max(1, len(ids)), "embedding_dim": dim,
                 "data_type": "fp32", "optimizer": {"adagrad": {"lr": defaults.table_lr}}}
                for name, ids in vocab.tables.items()]},
            "relations": [{"name": name, "lhs": lhs, "rhs": rhs,
                           "operator": defaults.operator}
                          for name, (lhs, rhs) in zip(vocab.relations, vocab.relation_tables)],
        },
        "train_data": data("train"),
    }
    if counts["validation"]:
        config["validation_data"] = data("validation")
    if counts["test"]:
        config["test_data"] = data("test")
    return config


def read_vocabulary(directory: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """(table -> array of string ids by row, relation names by index) from `vocab/`."""
    tables = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".parquet") and name != "relations.parquet":
            table = pq.read_table(os.path.join(directory, name))
            ids = np.empty(table.num_rows, dtype=object)
            ids[table.column("row").to_numpy()] = table.column("id").to_pylist()
            tables[name[:-len(".parquet")]] = ids
    relations: list[str] = []
    path = os.path.join(directory, "relations.parquet")
    if os.path.exists(path):
        table = pq.read_table(path)
        order = np.argsort(table.column("index").to_numpy())
        relations = [table.column("name").to_pylist()[i] for i in order]
    return tables, relations

