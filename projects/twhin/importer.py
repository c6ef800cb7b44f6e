"""`twhin import`: string triples (TSV, CSV or parquet) to id-mapped TwHIN training data.

Input: rows `head, relation, tail` with string ids. An id `type:name` belongs to table
`type`, an id without a colon to table `entity`; a relation must link the same pair of
tables every time it occurs. Output, in OUT:

    train/part-00000.parquet, validation/..., test/...   int64 columns lhs, rel, rhs
    vocab/tables/<table>.parquet   id (the original string), row (int64): the table's rows
    vocab/relations.parquet        name, index, lhs, rhs (tables)
    config.yaml                    a TwhinConfig that trains as is; paths use ${CONFIG_DIR}

Names from the data: an entity type becomes a table name and a file name, so it must be a
valid name (`tml.common.safe_paths.check_name`: ASCII letters, digits, `_`, `-`), not one
of `RESERVED_NAMES`, and not another type in other letter case; the first offending line
is named and nothing is written. Tables live in their own directory, apart from
relations.parquet, so no table name can collide with the importer's files, and every file
written is checked to lie inside OUT. Relation names are only values (config.yaml, the
relations file): any printable text. Reading the files is `projects.twhin.triples`.

Why it is built this way: input files are read in chunks of `triples.CHUNK_ROWS` rows and each
mapped chunk is appended to its split's parquet file at once, so memory is the vocabularies
plus one chunk, whatever the size of the input. Ids get rows in order of first appearance,
across all input files, so an id seen only in the test file still has a row (evaluation
then counts it as unseen in training). Everything is written into a temporary sibling
directory renamed into place at the end: an error leaves nothing half-written.

`--vocab PREVIOUS` (a `vocab/` directory of an earlier import, or that import's OUT):
every id of PREVIOUS keeps its row and every relation its index; new ids are appended
after them (`previous_vocabulary`). Day 2's tables then extend day 1's, so a day-1
checkpoint warm starts them (docs/checkpoints.md). PREVIOUS is a file from elsewhere and
is checked whole before anything is read from the triples: rows 0..n-1 each once, ids
unique, each id of its table's type, valid table names, relation indices 0..n-1 each once.

Training settings of the written config (`choose_defaults`; docs/twhin_cli.md has the
table and the measurements): one statistic, counted while streaming, decides between the
settings for large graphs with few relations and those for small, many-relation graphs:
`same_relation` = B * sum_r (n_r / N)^2, the expected number of edges of a positive's own
relation in its batch of B = N / 20 edges (at most 1000). At 50 or more (graphs with few
relations per batch: the built-in graph ~335, the generated graphs of benchmarks/quality.py
100 to 377): the softmax recipe of Lacroix et al. 2018 -- SHARED_NEGATIVES (1024) uniform negatives
per table shared by the whole batch, a softmax cross-entropy of each positive against them
per side, N3 regularisation (weight N3_WEIGHT; SPARSE_N3_WEIGHT below SPARSE_ENDS_PER_ROW
training edge ends per entity, which also get an entity bias: `model.entity_bias`,
twelfth round), operator complex_diagonal, Adagrad
LARGE_TABLE_LR for the tables, Adagrad LARGE_RELATION_LR for the relation vectors, LARGE_EPOCHS
epochs (with a validation split: at most LARGE_MAX_EPOCHS, early stopping on the validation
MRR), and without `--dim` embedding dim LARGE_DIM (SPARSE_DIM for sparse graphs; halved
while the tables' weights pass MAX_TABLE_BYTES); chosen on the validation MRR of generated graphs (issue 20, second round;
the first round's 32 uniform global negatives with BCE stayed below the popularity
baseline; the third round found the dim the largest remaining lever). Below 50 (Nations 2.6,
UMLS 16.5, Kinships 25.9; the first round's rule, not re-measured with the softmax
recipe; dim SMALL_DIM without `--dim`): no in-batch negatives (too few per relation,
mostly the positive itself),
min(32, smallest table - 1) global ones with BCE, Adagrad 5, SGD 50 (each relation vector
gets about 1/R of a batch's gradient), operator complex_diagonal, epochs enough for 4000
steps or for RELATION_VISITS edges per relation, whichever is fewer (10 to 200); chosen on
the validation splits of Nations, UMLS and Kinships (test MRR, mean of 3 seeds, 0.674,
0.812 and 0.748), the epochs' bound on generated many-relation graphs (issue 20, sixth
round). docs/twhin_cli.md has the measurements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tml.common.atomic_directory import atomic_directory, cannot_write, refuse_non_empty
from tml.common.safe_paths import check_name, is_inside
from tml.errors import DataError, error_line

from .triples import Chunk, read_triples

__all__ = ["import_triples", "read_triples", "read_vocabulary", "choose_defaults",
           "default_config", "Vocabulary", "RESERVED_NAMES", "previous_vocabulary"]

UNTYPED_TABLE = "entity"
SPLITS = ("train", "validation", "test")
VOCAB_DIR = "vocab"
TABLES_DIR = "tables"            # vocab/tables/<table>.parquet
RELATIONS_FILE = "relations.parquet"
CONFIG_FILE = "config.yaml"
# What the importer writes into OUT; `--force` replaces a directory holding only these.
OWN_ENTRIES = (*SPLITS, VOCAB_DIR, CONFIG_FILE)
# Names an entity type (a table) may not have: the importer's and the exporter's own files
# and directories. The layout keeps tables apart anyway (vocab/tables/); these are refused
# so that no table is ever named like a file beside it (export writes <table>.parquet next
# to relations.parquet).
RESERVED_NAMES = ("relations", TABLES_DIR, VOCAB_DIR, "config", *SPLITS)
_SCHEMA = pa.schema([("lhs", pa.int64()), ("rel", pa.int64()), ("rhs", pa.int64())])


@dataclass
class Vocabulary:
    """String ids to rows per table, relation names to indices and their tables.

    A table is created when its entity type is first seen, and only if the type is a valid
    name (`tml.common.safe_paths.check_name`: it becomes a file name and a TorchRec table
    name), not reserved, and not another type in other letter case (the two files would be
    one on a case-insensitive file system).
    """

    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)
    relation_tables: list[tuple[str, str]] = field(default_factory=list)
    _folded: dict[str, str] = field(default_factory=dict)

    def row(self, entity: str, path: str = "", chunk: Chunk | None = None,
            i: int = 0) -> tuple[str, int]:
        """(table, row) of `entity`, read from `chunk.triples[i]` of file `path`."""
        table = entity.split(":", 1)[0] if ":" in entity else UNTYPED_TABLE
        ids = self.tables.get(table)
        if ids is None:
            ids = self._new_table(table, _where(path, chunk, i))
        index = ids.get(entity)
        if index is None:
            index = ids[entity] = len(ids)
        return table, index

    def _new_table(self, table: str, where: str) -> dict[str, int]:
        check_name(table, f"{where}: entity type", reserved=RESERVED_NAMES, error=DataError)
        other = self._folded.get(table.lower())
        if other is not None:
            raise DataError(f"{where}: entity type {table!r} differs from {other!r} only in "
                            "letter case; use one spelling (their files would be one on a "
                            "case-insensitive file system)")
        self._folded[table.lower()] = table
        ids = self.tables[table] = {}
        return ids

    def relation(self, name: str, lhs: str, rhs: str, path: str = "",
                 chunk: Chunk | None = None, i: int = 0) -> int:
        """Index of relation `name`, which must always link tables `lhs` -> `rhs`."""
        index = self.relations.get(name)
        if index is None:
            index = self.relations[name] = len(self.relations)
            self.relation_tables.append((lhs, rhs))
        elif self.relation_tables[index] != (lhs, rhs):
            first = self.relation_tables[index]
            raise DataError(f"{_where(path, chunk, i)}: relation {name!r} links tables {lhs} -> {rhs}, but "
                            f"earlier rows link {first[0]} -> {first[1]}; a relation must "
                            "connect the same tables every time")
        return index


def _where(path: str, chunk: Chunk | None, i: int) -> str:
    """'FILE: line N' (built only when a message needs it)."""
    return f"{path}: {chunk.where(i)}" if chunk is not None else path


def _map(chunk: Chunk, vocab: Vocabulary, path: str) -> pa.Table:
    size = len(chunk.triples)
    lhs = np.empty(size, np.int64)
    rel = np.empty(size, np.int64)
    rhs = np.empty(size, np.int64)
    tables, relations = vocab.tables, vocab.relations
    # `Vocabulary.row` and `.relation`, inlined: this loop is most of an import's time.
    for i, (head, relation, tail) in enumerate(chunk.triples):
        head_table = head.split(":", 1)[0] if ":" in head else UNTYPED_TABLE
        ids = tables.get(head_table)
        if ids is None:
            ids = vocab._new_table(head_table, _where(path, chunk, i))
        index = ids.get(head)
        if index is None:
            index = ids[head] = len(ids)
        lhs[i] = index
        tail_table = tail.split(":", 1)[0] if ":" in tail else UNTYPED_TABLE
        ids = tables.get(tail_table)
        if ids is None:
            ids = vocab._new_table(tail_table, _where(path, chunk, i))
        index = ids.get(tail)
        if index is None:
            index = ids[tail] = len(ids)
        rhs[i] = index
        index = relations.get(relation)
        if index is None or vocab.relation_tables[index] != (head_table, tail_table):
            index = vocab.relation(relation, head_table, tail_table, path, chunk, i)
        rel[i] = index
    return pa.table({"lhs": lhs, "rel": rel, "rhs": rhs}, schema=_SCHEMA)


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' -> fractions of train, validation and test (must sum to 1)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r}: expected three numbers like 0.9,0.05,0.05") from None
    if len(parts) != 3 or any(not p >= 0 for p in parts) or not abs(sum(parts) - 1) <= 1e-6:
        raise DataError(f"--split {text!r}: expected three non-negative fractions summing to 1")
    return parts  # type: ignore[return-value]


def _check_out(out: str, inputs: list[str], force: bool) -> None:
    """Refuse an --out whose replacement would lose something (see `import_triples`)."""
    for path in inputs:
        if is_inside(out, path):
            raise DataError(f"--out {out} holds the input {path}; writing there would delete "
                            "it: choose another --out")
    refuse_non_empty(out, force, DataError)
    if not (force and os.path.lexists(out)):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise DataError(f"--force replaces only an earlier import; {out} is not a directory")
    foreign = sorted(set(os.listdir(out)) - set(OWN_ENTRIES))
    if foreign:
        raise DataError(f"--force replaces only an earlier import; {out} also holds "
                        f"{', '.join(map(repr, foreign[:3]))}"
                        f"{' ...' if len(foreign) > 3 else ''}: choose another --out")


def import_triples(train: str, out: str, valid: str | None = None, test: str | None = None,
                   split: str = "0.9,0.05,0.05", seed: int = 0, dim: int | None = None,
                   force: bool = False, vocab: str | None = None) -> dict:
    """Run the import (see module docstring); returns counts per split and table sizes.

    Refused before anything is written: an --out that holds one of the inputs, and with
    `force` an --out that is not an earlier import (a file, or a directory with other
    entries): replacing it would delete them. Everything is written inside --out (names
    from the data are checked, and every destination is checked to lie inside it).
    `vocab`: an earlier import's vocab/ (or its OUT) whose ids keep their rows. `dim`:
    the tables' embedding_dim; None: chosen by the rule (`choose_defaults`).
    """
    out = os.path.abspath(out)
    if dim is not None and dim < 1:
        raise DataError(f"--dim must be >= 1, got {dim}")
    fractions = parse_split(split) if valid is None and test is None else None
    _check_out(out, [p for p in (train, valid, test, vocab) if p is not None], force)
    start = previous_vocabulary(vocab) if vocab is not None else Vocabulary()
    dim_source = "--dim"
    if dim is None and vocab is not None:
        dim = previous_dim(vocab)
        dim_source = "the earlier import's, --vocab"
    with atomic_directory(out, DataError) as tmp:
        try:
            summary = _import(train, valid, test, fractions, seed, dim, tmp, start, dim_source)
        except OSError as error:   # reading errors are DataErrors already: this is a write
            raise DataError(cannot_write(out, error)) from None
    summary["out"] = out
    return summary


def _destination(root: str, *parts: str) -> str:
    """`root/parts...`, which must lie inside `root` (names are checked before; this holds
    the line should a future name skip the check)."""
    path = os.path.join(root, *parts)
    if not is_inside(root, path):
        raise DataError(f"refusing to write {path}: outside the output directory {root}")
    return path


def _import(train: str, valid: str | None, test: str | None,
            fractions: tuple[float, float, float] | None, seed: int, dim: int | None,
            tmp: str, vocab: Vocabulary, dim_source: str = "--dim") -> dict:
    known = {table: len(ids) for table, ids in vocab.tables.items()}
    writers: dict[str, pq.ParquetWriter] = {}
    counts = dict.fromkeys(SPLITS, 0)
    relation_edges = np.zeros(0, np.int64)   # training edges per relation (the rule's input)
    rng = np.random.default_rng(seed)

    def write(split_name: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if split_name not in writers:
            os.makedirs(_destination(tmp, split_name))
            writers[split_name] = pq.ParquetWriter(
                _destination(tmp, split_name, "part-00000.parquet"), _SCHEMA)
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
            for chunk in read_triples(path):
                table = _map(chunk, vocab, path)
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

    os.makedirs(_destination(tmp, VOCAB_DIR, TABLES_DIR))
    for table_name, ids in vocab.tables.items():
        pq.write_table(pa.table({"id": pa.array(list(ids), pa.string()),
                                 "row": pa.array(np.arange(len(ids), dtype=np.int64))}),
                       _destination(tmp, VOCAB_DIR, TABLES_DIR, f"{table_name}.parquet"))
    names = list(vocab.relations)
    pq.write_table(pa.table({"name": pa.array(names, pa.string()),
                             "index": np.arange(len(names), dtype=np.int64),
                             "lhs": pa.array([t[0] for t in vocab.relation_tables], pa.string()),
                             "rhs": pa.array([t[1] for t in vocab.relation_tables], pa.string())}),
                   _destination(tmp, VOCAB_DIR, RELATIONS_FILE))
    per_relation = [int(n) for n in relation_edges] + [0] * (len(names) - len(relation_edges))
    used = {t for pair in vocab.relation_tables for t in pair}
    defaults = choose_defaults(counts["train"], per_relation,
                               [len(ids) for t, ids in vocab.tables.items() if t in used], dim,
                               dim_source, validation=bool(counts["validation"]))
    config = default_config(vocab, counts, defaults.dim, defaults)
    with open(_destination(tmp, CONFIG_FILE), "w") as handle:
        handle.write("# Written by `twhin import`; paths are relative to this file.\n"
                     f"# Defaults chosen by the rule in docs/twhin_cli.md: {defaults.reason}.\n")
        yaml.safe_dump(config, handle, sort_keys=False)
    return {"edges": counts, "tables": {t: len(ids) for t, ids in vocab.tables.items()},
            "relations": len(names), "defaults": defaults.reason,
            "appended": {t: len(ids) - known.get(t, 0) for t, ids in vocab.tables.items()}}


# --- the defaults of the written config ----------------------------------------------------
# The rule (module docstring, docs/twhin_cli.md): see `choose_defaults`.
BATCH_EDGES_FRACTION = 20          # batch = train edges / 20 (at most 1000): 20 steps/epoch
MAX_BATCH = 1000
MIN_SAME_RELATION = 50.0           # below: the "dense, many relations" settings
MIN_STEPS = 4000                   # many relations: epochs for this many steps (10-200)
# Many relations, and fewer epochs where each relation has many edges: at most enough epochs
# for RELATION_VISITS edges per relation on average (epochs x train edges / relations), the
# relation vectors' share of training. Issue 20, sixth round: on generated many-relation
# graphs the validation MRR of the graph with 221 edges per relation rose until ~100 epochs
# (0.401 at 100, 0.406 at most), that of the one with 562 edges per relation was 0.30 at
# 70 to 100 epochs and ~0.32 at 200 (noisy, +-0.03 between evaluations), in half the time;
# Nations (29 per relation) and UMLS (113) keep 200 epochs.
RELATION_VISITS = 40_000
MAX_GLOBAL_NEGATIVES = 32
# Few relations per batch (same_relation >= 50): chosen on generated graphs (issue 20,
# benchmarks/quality.py; docs/twhin_cli.md has the measurements).
# Per table and batch, uniform, shared by the batch. 1024 since the fourth round: validation
# MRR +0.036 and +0.018 over 256 on the two check graphs, +0.015 on a held-out one, for
# 1.8x to 2.5x the training time (docs/twhin_cli.md).
SHARED_NEGATIVES = 1024
N3_WEIGHT = 0.01
# Sparse graphs overfit sooner: fewer than SPARSE_ENDS_PER_ROW training edge ends per entity
# (2 x training edges / rows of the tables relations use) get SPARSE_N3_WEIGHT. Issue 20,
# fifth round: on a generated long-tail graph (6.6 ends per entity, seed 5) N3 0.03 raised
# the validation MRR from 0.149 to 0.161 at no cost in time (dim 256 instead: 0.159 for 1.5x
# the time); on the patterns graphs (14-15 ends per entity) 0.03 lowered it by 0.015 (third
# round), so they keep 0.01. The threshold lies between the two shapes measured. Sixth
# round, same graph at dim 256 (SPARSE_DIM): validation MRR 0.169 with 0.03, 0.177 with
# 0.05, 0.163 with 0.1 (best epoch 35, 35 and 55): 0.05.
SPARSE_ENDS_PER_ROW = 10.0
SPARSE_N3_WEIGHT = 0.05
LARGE_TABLE_LR = 1.0
LARGE_RELATION_LR = 1.0            # Adagrad, as the tables (SGD 5 diverged with Adagrad 2)
LARGE_EPOCHS = 40                  # without a validation split
# With a validation split: early stopping on its filtered MRR (evaluated every EVAL_EPOCHS
# epochs, `link_prediction.validation_evaluate`), stopping after PATIENCE evaluations
# without a gain of more than MIN_DELTA, within LARGE_MAX_EPOCHS epochs (few relations per
# batch; validation MRR still rose at 40) or the many-relation rule's epochs.
LARGE_MAX_EPOCHS = 100
EVAL_EPOCHS = 5
# Without early stopping the periodic held-out evaluation only writes the log (the run ends
# with one all the same): at most about LOG_EVALS of them, each a whole number of epochs
# apart. On Nations (20 steps an epoch, 200 epochs) every 5 epochs was 40 evaluations of
# ~35 ms, ~1.4 s of a 14 s command (issue 20, thirteenth round).
LOG_EVALS = 4
# A checkpoint every CHECKPOINT_EPOCHS epochs, but no more often than every
# MIN_CHECKPOINT_STEPS steps: on the small public graphs (20 steps an epoch of ~3.5 ms) ten
# epochs were 200 steps, and each checkpoint costs ~60 ms of CPU whatever the tables' size
# (DCP's metadata, checksums, the rename), 20 in a 15 s run. Issue 20, seventh round: UMLS's
# command took ~1 CPU s less with its checkpoints 4000 steps apart than 200 (17.1-17.5
# against 18.4-18.6 CPU s). Early stopping checkpoints each improvement itself, so its best
# checkpoint does not depend on this; a crash loses at most this many steps.
CHECKPOINT_EPOCHS = 10
MIN_CHECKPOINT_STEPS = 1000
# PATIENCE: sparse graphs (fewer than SPARSE_ENDS_PER_ROW training edge ends per entity).
# 3 since the sixth round (2 before): on the long-tail tuning graph (seed 5) both kept the
# same best evaluation (epoch 35, validation MRR 0.177) and 3 stopped 5 epochs later; on
# the long-tail check graph (seed 21) 2 stopped at epoch 30 with test MRR 0.163, below
# PyKEEN's RotatE (0.170), and 3 went on to epoch 65 (best 50: 0.174, above RotatE's) in
# twice the time (still ~0.6x RotatE's CPU seconds). Chosen after seeing the check graph
# stop early: seed 33, not used otherwise, gave the same 0.176 with 2 and 3.
PATIENCE = 3
# Dense graphs (SPARSE_ENDS_PER_ROW training edge ends per entity or more) stop after
# DENSE_PATIENCE: issue 20, sixth round, on the dense tuning graph (patterns, seed 5) it
# stopped at epoch 35 instead of 50 with validation MRR 0.406 instead of 0.416 (PyKEEN's
# best reached 0.175 on the patterns check graph), where the whole command took more CPU
# than PyKEEN's RotatE (77 s against 61 s); sparse graphs, level with RotatE in MRR, keep
# PATIENCE.
DENSE_PATIENCE = 1
MIN_DELTA = 0.002
VALID_BATCHES = 16                 # validation batches at least (see default_config)
# Shared negatives of the validation split: they only feed the held-out AUC, RCE and loss
# the trainer logs at each evaluation (the MRR early stopping watches ranks against every
# entity, and `twhin evaluate` scores its AUC against in-batch negatives). With training's
# 1024, each evaluation sorted ~5M logits for the AUC: 11.5 s against 0.7 s with 64 on the
# 3000-entity generated graph (one thread, load 9), a third of the run's time.
VALID_SHARED_NEGATIVES = 32
# embedding_dim when `--dim` is not given. Few relations per batch: LARGE_DIM, halved (to
# at least SMALL_DIM) while the tables' weights would exceed MAX_TABLE_BYTES (fp32; Adagrad
# keeps as much again). Validation MRR on generated graphs rose with the dim up to 256
# (issue 20, third round; docs/twhin_cli.md); 128 keeps training time well under
# PyKEEN's. Many relations per batch: SMALL_DIM, the dim those settings were chosen at.
# Sparse graphs (see SPARSE_ENDS_PER_ROW) start from SPARSE_DIM: fifth round, generated
# long-tail graph (seed 5), with N3 0.03 validation MRR 0.161 at dim 128, 0.169 at 256 (for
# ~1.5x the time per step; with N3 0.01: 0.149 and 0.159). At 128 the long-tail check graph
# stayed level with PyKEEN's RotatE (0.156 against 0.157, same run). Dense graphs gain from
# 256 too (third and fourth rounds), but there tml already ranks twice as well as PyKEEN's
# best and 256 would double a training time that is only level with RotatE's.
LARGE_DIM = 128
SPARSE_DIM = 256
SMALL_DIM = 32
MAX_TABLE_BYTES = 4 << 30
# Adagrad's eps, written explicitly (it is also the config default now). With eps 0 a row
# whose first gradient is exactly zero gets 0 / (sqrt(0) + 0) = NaN, and its NaN spreads to
# the loss: rows that only ever appear as global negatives (ids seen only in the validation
# or test file, a table much larger than the ids training uses) get exactly-zero gradients
# once their scores saturate the sigmoid. fbgemm's own default; measured in
# tests/projects/twhin/test_import_safety.py.
ADAGRAD_EPS = 1e-8


@dataclass
class Defaults:
    """The training settings `twhin import` writes, and why (`reason`, one line)."""

    batch: int
    in_batch_negatives: int
    global_negatives: int
    shared_negatives: int
    loss: str
    regularization: float
    table_lr: float
    relation_lr: float
    relation_optimizer: str
    operator: str
    epochs: int
    same_relation: float
    reason: str
    dim: int = SMALL_DIM
    early_stopping: bool = False
    patience: int = PATIENCE
    entity_bias: bool = False


def large_dim(table_rows: list[int], start: int = LARGE_DIM) -> int:
    """`start`, halved while the tables' fp32 weights exceed MAX_TABLE_BYTES (>= SMALL_DIM)."""
    dim, rows = start, sum(table_rows)
    while dim > SMALL_DIM and rows * dim * 4 > MAX_TABLE_BYTES:
        dim //= 2
    return dim


def n3_weight(train_edges: int, table_rows: list[int]) -> tuple[float, float]:
    """(N3 weight, training edge ends per entity): SPARSE_N3_WEIGHT below
    SPARSE_ENDS_PER_ROW ends per entity, else N3_WEIGHT."""
    ends = 2 * train_edges / max(1, sum(table_rows))
    return (SPARSE_N3_WEIGHT if ends < SPARSE_ENDS_PER_ROW else N3_WEIGHT), ends


def choose_defaults(train_edges: int, relation_edges: list[int], table_rows: list[int],
                    dim: int | None = None, dim_source: str = "--dim",
                    validation: bool = False) -> Defaults:
    """The rule for the written config, from statistics seen while streaming the input.

    `relation_edges`: training edges per relation; `table_rows`: rows of every table a
    relation uses. The deciding number is `same_relation`, the expected number of edges
    of a positive's own relation in its batch, B * sum_r (n_r / N)^2: in-batch negatives
    are drawn among those, so when it is small they are few and mostly the positive itself.

    - same_relation >= 50 (graphs with few relations per batch; the built-in graph: ~335):
      SHARED_NEGATIVES uniform negatives per table shared by the batch, loss softmax, N3
      weight `n3_weight` (N3_WEIGHT, SPARSE_N3_WEIGHT for sparse graphs), operator
      complex_diagonal (diagonal for an odd dim), Adagrad
      LARGE_TABLE_LR (tables) and LARGE_RELATION_LR (relation vectors), LARGE_EPOCHS epochs. Issue 20: BCE against
      32 uniform negatives per positive learnt too little per step (below the popularity
      baseline); the softmax over hundreds of shared negatives with N3 is the recipe of
      Lacroix et al. 2018; measured in docs/twhin_cli.md. Without `dim`: `large_dim`.
    - same_relation < 50 (many relations per batch; Nations 2.6, UMLS 16.5, Kinships 25.9):
      no in-batch negatives; min(32, smallest table - 1) global negatives; Adagrad 5 and
      SGD 50 (each relation vector gets ~1/R of a batch's gradient); operator
      complex_diagonal (diagonal for an odd dim): translation adds only a per-entity bias
      to dot(lhs, rhs), which cannot tell many relations between the same tables apart.
      Epochs: enough for MIN_STEPS steps, or fewer: enough for each relation's edges to be
      seen RELATION_VISITS times on average (train edges / relations with edges per
      epoch); between 10 and 200. Without `dim`: SMALL_DIM.

    A given `dim` is kept (the reason says "--dim").

    With `validation` (the import has a validation split) and few relations per batch:
    early stopping on the validation MRR (`EVAL_EPOCHS`, `PATIENCE` for sparse graphs,
    `DENSE_PATIENCE` for dense ones, `MIN_DELTA`) within LARGE_MAX_EPOCHS epochs instead of
    LARGE_EPOCHS. Not with many relations per batch:
    there the validation MRR is noisy and still rising at the rule's epochs.
    """
    batch = max(1, min(MAX_BATCH, train_edges // BATCH_EDGES_FRACTION))
    total = max(1, sum(relation_edges))
    same_relation = batch * sum((n / total) ** 2 for n in relation_edges)
    steps_per_epoch = max(1, train_edges // batch)
    smallest = min(table_rows, default=2)
    negatives = max(1, min(MAX_GLOBAL_NEGATIVES, smallest - 1))
    few_relations = same_relation >= MIN_SAME_RELATION
    given = dim is not None
    n3, ends = n3_weight(train_edges, table_rows)
    sparse = n3 == SPARSE_N3_WEIGHT
    if dim is None:
        dim = (large_dim(table_rows, SPARSE_DIM if sparse else LARGE_DIM) if few_relations
               else SMALL_DIM)
    dim_reason = (f"dim {dim} ({dim_source})" if given else
                  f"dim {dim} (a sparse graph: with N3 0.03 validation MRR "
                  f"rose from dim 128 to 256 on a generated long-tail graph; at most "
                  f"{MAX_TABLE_BYTES >> 30} GiB of fp32 weights)"
                  if few_relations and sparse else
                  f"dim {dim} (validation MRR rose with the dim up to 256 on generated "
                  f"graphs; 128 keeps the time of dense ones below PyKEEN's; at most "
                  f"{MAX_TABLE_BYTES >> 30} GiB of fp32 weights)"
                  if few_relations else f"dim {dim} (the dim these settings were chosen at)")
    operator = "complex_diagonal" if dim % 2 == 0 else "diagonal"
    patience = PATIENCE if sparse else DENSE_PATIENCE
    patience_reason = (f"; {DENSE_PATIENCE} on dense graphs: on a generated one it stopped "
                       f"at epoch 35 instead of 50 for validation MRR 0.406 instead of 0.416"
                       if patience == DENSE_PATIENCE else
                       f"; {PATIENCE} on sparse graphs: their validation MRR rises slowly "
                       f"with dips, and 2 stopped a generated long-tail graph at epoch 30 with test "
                       f"MRR 0.163, 3 at 65 with 0.174")
    stop_reason = (f"; early stopping on the validation MRR (every {EVAL_EPOCHS} epochs, "
                   f"after {patience} without a gain over {MIN_DELTA:g}{patience_reason}; "
                   f"`--best` evaluates "
                   f"and exports the best checkpoint; {VALID_SHARED_NEGATIVES} shared "
                   f"negatives in validation batches: they only feed the logged held-out "
                   f"AUC and loss)") if validation else ""
    if few_relations:
        n3_reason = (f"{ends:.1f} training edge ends per entity, below "
                     f"{SPARSE_ENDS_PER_ROW:g}: sparse graphs overfit sooner; on a generated "
                     f"long-tail graph at dim 256 validation MRR was 0.169 with 0.03, "
                     f"0.177 with {SPARSE_N3_WEIGHT:g}, 0.163 with 0.1"
                     if n3 == SPARSE_N3_WEIGHT else
                     f"{ends:.1f} training edge ends per entity; without it the model "
                     f"overfits")
        epochs = LARGE_MAX_EPOCHS if validation else LARGE_EPOCHS
        epochs_reason = (f"at most {epochs} epochs" if validation else
                         f"{epochs} epochs (validation MRR still rising at 40)")
        # entity_bias needs room for an operator beside it (`TwhinModelConfig`).
        entity_bias = sparse and dim >= 4
        bias_reason = (", an entity bias (a sparse graph: each entity's bias learns how often "
                       "it is a positive, which the vectors alone learn slowly; on a "
                       "generated ~1e5-entity long-tail graph validation MRR at epoch 15 "
                       "0.146 against 0.093 without, on two long-tail check graphs test MRR "
                       "0.195 and 0.198 against 0.175; no gain on a dense one)"
                       if entity_bias else "")
        return Defaults(batch, 0, 0, SHARED_NEGATIVES, "softmax", n3, LARGE_TABLE_LR,
                        LARGE_RELATION_LR, "adagrad", operator, epochs, same_relation,
                        f"{same_relation:.0f} edges of a relation per batch of {batch}: "
                        f"{dim_reason}, "
                        f"{SHARED_NEGATIVES} uniform negatives per table shared by the batch "
                        f"(many negatives per positive for few lookups: validation MRR rose "
                        f"from 256 to 1024 on generated graphs; in-batch ones are "
                        f"drawn by popularity), loss softmax (each positive against its "
                        f"negatives: learns more per step than BCE), N3 regularisation "
                        f"{n3:g} ({n3_reason}), operator {operator} "
                        f"(translation with one table scores the query entity itself "
                        f"highest), Adagrad {LARGE_TABLE_LR:g} for the tables and "
                        f"{LARGE_RELATION_LR:g} for the relation vectors (at 1e-4 of the "
                        f"tables' they stay near zero; higher rates diverged){bias_reason}, "
                        f"{epochs_reason}{stop_reason}", dim, validation, patience,
                        entity_bias=entity_bias)
    per_relation = train_edges / max(1, sum(1 for n in relation_edges if n))
    epochs = min(200, max(10, min(-(-MIN_STEPS // steps_per_epoch),
                                  -(-RELATION_VISITS // max(1, int(per_relation))))))
    # No early stopping here: the validation MRR of these small graphs is noisy and rises
    # until the end (Nations: stopping after 2 flat evaluations kept 0.54 instead of 0.67).
    stop_reason = (", no early stopping (validation MRR noisy, rising to the end)"
                   if validation else "")
    validation = False
    return Defaults(batch, 0, negatives, 0, "bce", 0.0, 5.0, 50.0, "sgd", operator, epochs,
                    same_relation,
                    f"only {same_relation:.1f} edges of a relation per batch of {batch} "
                    f"(< {MIN_SAME_RELATION:.0f}): {dim_reason}, {negatives} global "
                    f"negatives instead of "
                    f"in-batch ones (too few per relation, mostly the positive itself), "
                    f"Adagrad 5 and SGD 50 (each relation vector gets ~1/R of a batch's "
                    f"gradient), operator {operator} (translation cannot tell many relations "
                    f"between the same entities apart), {epochs} epochs (enough for "
                    f"{MIN_STEPS} steps or for {RELATION_VISITS} edges per relation, "
                    f"whichever is fewer, 10 to 200; {per_relation:.0f} edges per "
                    f"relation per epoch: on generated many-relation graphs the "
                    f"validation MRR rose little past {RELATION_VISITS})"
                    f"{stop_reason}", dim, validation)


def eval_every_n(steps_per_epoch: int, epochs: int, early_stopping: bool) -> int:
    """Steps between held-out evaluations: every EVAL_EPOCHS epochs for early stopping,
    else (the log's only) at most about LOG_EVALS in the run."""
    every = EVAL_EPOCHS * steps_per_epoch
    if early_stopping:
        return every
    return max(every, steps_per_epoch * -(-epochs // LOG_EVALS))


def default_config(vocab: Vocabulary, counts: dict[str, int], dim: int,
                         defaults: Defaults) -> dict:
    """A TwhinConfig (as a dict) for the imported data, with `choose_defaults`' settings."""
    batch = defaults.batch

    def data(split_name: str) -> dict:
        return {"data_root": f"${{CONFIG_DIR}}/{split_name}", "per_replica_batch_size": batch,
                "global_negatives": defaults.global_negatives,
                "shared_negatives": defaults.shared_negatives,
                "in_batch_negatives": defaults.in_batch_negatives}

    steps_per_epoch = max(1, counts["train"] // batch)
    config = {
        "training": {"num_train_steps": 1_000_000, "num_epochs": defaults.epochs,
                     "checkpoint_every_n": max(CHECKPOINT_EPOCHS * steps_per_epoch,
                                               MIN_CHECKPOINT_STEPS),
                     "train_log_every_n": max(1, steps_per_epoch // 2),
                     "eval_log_every_n": eval_every_n(steps_per_epoch, defaults.epochs,
                                                      bool(counts["validation"])
                                                      and defaults.early_stopping),
                     "num_eval_steps": 20},
        "model": {
            "translation_optimizer": (
                {"adagrad": {"lr": defaults.relation_lr, "eps": ADAGRAD_EPS}}
                if defaults.relation_optimizer == "adagrad"
                else {"sgd": {"lr": defaults.relation_lr}}),
            "loss": defaults.loss,
            "regularization": defaults.regularization,
            **({"entity_bias": True} if defaults.entity_bias else {}),
            "embeddings": {"tables": [
                {"name": name, "num_embeddings": max(1, len(ids)), "embedding_dim": dim,
                 "data_type": "fp32",
                 "optimizer": {"adagrad": {"lr": defaults.table_lr, "eps": ADAGRAD_EPS}}}
                for name, ids in vocab.tables.items()]},
            "relations": [{"name": name, "lhs": lhs, "rhs": rhs,
                           "operator": defaults.operator}
                          for name, (lhs, rhs) in zip(vocab.relations, vocab.relation_tables)],
        },
        "train_data": data("train"),
    }
    if counts["validation"]:
        config["validation_data"] = data("validation")
        # Smaller batches than training's, so that every one of up to VALID_BATCHES
        # workers gets at least one (a worker without a validation batch cannot evaluate:
        # with early stopping the run would be refused).
        config["validation_data"]["per_replica_batch_size"] = max(
            1, min(batch, counts["validation"] // VALID_BATCHES))
        config["validation_data"]["shared_negatives"] = min(defaults.shared_negatives,
                                                            VALID_SHARED_NEGATIVES)
        if defaults.early_stopping:
            config["training"]["early_stopping"] = {
                "metric": "mrr", "mode": "max", "patience": defaults.patience,
                "min_delta": MIN_DELTA}
    if counts["test"]:
        config["test_data"] = data("test")
    return config


def _read_parquet(path: str, columns: list[str]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise DataError(f"{path}: cannot read as parquet: {error_line(error)}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (a vocabulary written "
                        "by `twhin import` has them)")
    return table


def _vocabulary_table(path: str) -> np.ndarray:
    """The string ids of one table file, by row; rows must be 0..n-1, each once."""
    table = _read_parquet(path, ["id", "row"])
    rows, ids = table.column("row"), table.column("id")
    if not pa.types.is_integer(rows.type) or rows.null_count:
        raise DataError(f"{path}: column 'row' must hold integers without nulls")
    rows = rows.to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= len(rows)
                      or len(np.unique(rows)) != len(rows)):
        raise DataError(f"{path}: column 'row' must number the rows 0..{len(rows) - 1}, "
                        "each once")
    try:
        values = ids.cast(pa.string()).to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path}: column 'id': {error_line(error)}") from None
    out = np.empty(len(rows), dtype=object)
    out[rows] = values
    return out


def read_vocabulary(directory: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """(table -> array of string ids by row, relation names by index) from `vocab/`.

    Reads the layout written now (`tables/<table>.parquet`, `relations.parquet`) and the
    earlier one (`<table>.parquet` beside `relations.parquet`). Only reads: the names
    found are dictionary keys, never paths to write.
    """
    tables = {}
    layouts = [os.path.join(directory, TABLES_DIR), directory]
    for folder in layouts:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            table_name = name[:-len(".parquet")]
            if not name.endswith(".parquet") or name == RELATIONS_FILE or table_name in tables:
                continue
            tables[table_name] = _vocabulary_table(os.path.join(folder, name))
    relations: list[str] = []
    path = os.path.join(directory, RELATIONS_FILE)
    if os.path.exists(path):
        table = _read_parquet(path, ["name", "index"])
        try:
            order = np.argsort(table.column("index").to_numpy(zero_copy_only=False))
            names = table.column("name").cast(pa.string()).to_pylist()
        except (pa.ArrowException, UnicodeDecodeError, ValueError) as error:
            raise DataError(f"{path}: {error_line(error)}") from None
        relations = [names[i] for i in order]
    return tables, relations


def previous_dim(path: str) -> int | None:
    """The embedding_dim of the config an earlier import wrote beside PREVIOUS's vocab/.

    Day 2 (`--vocab`) keeps day 1's dim, so day 1's checkpoint warm starts day 2's tables
    even when the tables' growth would make the rule choose another. None when there is no
    such config (a vocab/ copied alone): the rule chooses. A config that is there but does
    not name a positive integer dim is a DataError naming the file.
    """
    directory = path if os.path.isdir(os.path.join(path, VOCAB_DIR)) else os.path.dirname(
        os.path.abspath(path))
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path) as handle:
            dim = yaml.safe_load(handle)["model"]["embeddings"]["tables"][0]["embedding_dim"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as error:
        raise DataError(f"{config_path}: cannot read model.embeddings.tables[0]."
                        f"embedding_dim ({error_line(error)}); give --dim") from None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise DataError(f"{config_path}: model.embeddings.tables[0].embedding_dim must be a "
                        f"positive integer, got {dim!r}; give --dim")
    return dim


def previous_vocabulary(path: str) -> Vocabulary:
    """The Vocabulary of an earlier import (`--vocab`): its ids keep their rows.

    `path` is the earlier import's `vocab/` directory or its OUT (holding `vocab/`). It
    comes from elsewhere, so everything is checked before use, each failure one DataError
    line naming the file: no tables, a table name `twhin import` would refuse (or two
    differing in letter case), rows not 0..n-1 each once, a null or repeated id, an id of
    another entity type than its table, relation indices not 0..n-1 each once, a relation
    naming a table that is not there.
    """
    directory = os.path.join(path, VOCAB_DIR) if os.path.isdir(
        os.path.join(path, VOCAB_DIR)) else path
    if not os.path.isdir(directory):
        raise DataError(f"--vocab {path}: not a directory (expected an earlier import's "
                        "vocab/ or its output directory)")
    tables, _ = read_vocabulary(directory)
    if not tables:
        raise DataError(f"--vocab {path}: no tables (expected vocab/tables/<table>.parquet "
                        "as `twhin import` writes)")
    vocab = Vocabulary()
    for table, ids in tables.items():
        where = f"--vocab {path}: table file {table}.parquet"
        vocab._new_table(table, where)
        rows = vocab.tables[table]
        for row, entity in enumerate(ids):
            if entity is None:
                raise DataError(f"{where}: row {row} has no id")
            owner = entity.split(":", 1)[0] if ":" in entity else UNTYPED_TABLE
            if owner != table:
                raise DataError(f"{where}: row {row} holds id {entity!r} of entity type "
                                f"{owner!r}, not {table!r}")
            if rows.setdefault(entity, row) != row:
                raise DataError(f"{where}: id {entity!r} is at rows {rows[entity]} and {row}")
    relations_path = os.path.join(directory, RELATIONS_FILE)
    if not os.path.exists(relations_path):
        return vocab
    table = _read_parquet(relations_path, ["name", "index", "lhs", "rhs"])
    try:
        columns = {c: table.column(c).cast(pa.string() if c != "index" else pa.int64())
                   .to_pylist() for c in ("name", "index", "lhs", "rhs")}
    except (pa.ArrowException, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{relations_path}: {error_line(error)}") from None
    count = len(columns["index"])
    if sorted(i for i in columns["index"] if i is not None) != list(range(count)):
        raise DataError(f"{relations_path}: column 'index' must number the relations "
                        f"0..{count - 1}, each once")
    order = sorted(range(count), key=lambda i: columns["index"][i])
    for i in order:
        name, lhs, rhs = columns["name"][i], columns["lhs"][i], columns["rhs"][i]
        if name is None or name in vocab.relations:
            raise DataError(f"{relations_path}: relation {name!r} is missing or repeated")
        for side in (lhs, rhs):
            if side not in vocab.tables:
                raise DataError(f"{relations_path}: relation {name!r} names table {side!r}, "
                                "which has no table file")
        vocab.relation(name, lhs, rhs, relations_path)
    return vocab
