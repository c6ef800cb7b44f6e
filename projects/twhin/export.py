"""`twhin export`: a checkpoint's embeddings as plain parquet files anyone can read.

Output directory:

    <table>.parquet       id (string), vector (fixed_size_list<float32>[D]), one row per
                          table row, in row order
    relations.parquet     name, operator, lhs, rhs (table names), vector (as above); with
                          reciprocal relations also inverse_vector (head queries)
    metadata.json         format ("twhin-export"), format_version, embedding_dim, tables
                          (name -> rows), source checkpoint, entity_bias (the vectors'
                          last coordinate is a bias: `models.relation_query`), indexes
                          (with --index)
    <table>.ivf-*.npy     with --index: the table's approximate nearest-neighbour index,
                          three plain arrays (`projects.twhin.neighbor_index`), built from
                          the rows as they stream by

Why the index is optional (`--index`), measured on 2 cores: building it (k-means, then
every row assigned to a list) took minutes for a million rows (docs/twhin_cli.md), and
exact search, one matrix product per chunk of rows, answers a single query on a million
rows in about a second. The index pays off for batches of queries (`twhin neighbors
--entities`).

`--force` replaces a previous export only: a directory whose metadata.json names the
format and that holds nothing an export does not write. Anything else at `--out` (a
save_dir of checkpoints, an import's training data, a home directory) is refused whole,
with or without `--force`, so a mistyped `--out` cannot delete it.

Why a fixed-size list column: one column whatever D, read back as a (N, D) array with
`np.stack(df["vector"])` in pandas or without a copy through pyarrow
(`table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, D)`).
The ids are the importer's original strings when `vocab/` lies beside the config (as
`twhin import` writes it), else the row number as a string.

Loading: each table is streamed in row chunks (`tml.common.checkpoint_rows.load_rows`,
`chunk_rows` rows at a time, by default about `CHUNK_BYTES` of vectors), each written as
one parquet row group, so peak memory is one chunk (plus the importer's id strings), not
one table. `load_rows` reads a checkpoint written by any number of workers and any
sharding, in this one process. The output is written to a temporary sibling directory
renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tml.common.atomic_directory import atomic_directory
from tml.common.checkpoint_rows import load_rows, tensor_shapes
from tml.common.checkpointing import latest_checkpoint
from tml.errors import CheckpointError, TmlError

from .config import TwhinConfig
from .signature import check_checkpoint_matches

TABLE_KEY = "model.model.large_embeddings.ebc.embedding_bags.{}.weight"
RELATIONS_KEY = "model.model.all_trans_embs"
CHUNK_BYTES = 256 << 20   # vectors per export chunk (float32 rows of D values)
METADATA_FILE = "metadata.json"
EXPORT_FORMAT = "twhin-export"
EXPORT_FORMAT_VERSION = 1
# Index files (projects.twhin.neighbor_index.index_files); ".hnsw": an earlier tml's, so
# that --force still replaces such an export.
INDEX_SUFFIXES = (".npy", ".hnsw")


def is_previous_export(out: str) -> bool:
    """`out` holds an export (metadata.json naming the format) and nothing else."""
    try:
        with open(os.path.join(out, METADATA_FILE)) as handle:
            metadata = json.load(handle)
        names = os.listdir(out)
    except (OSError, ValueError):
        return False
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        return False
    return all(name == METADATA_FILE or (name.endswith((".parquet", *INDEX_SUFFIXES))
                                         and os.path.isfile(os.path.join(out, name)))
               for name in names)


def check_out(out: str, force: bool) -> None:
    """Refuse an `--out` the export must not replace (see the module docstring)."""
    if os.path.islink(out):
        raise TmlError(f"--out {out} is a symbolic link; name the directory itself")
    if not os.path.exists(out):
        pass
    elif not os.path.isdir(out):
        raise TmlError(f"--out {out} exists and is not a directory")
    elif os.listdir(out):
        if not is_previous_export(out):
            raise TmlError(f"--out {out} is not empty and holds no previous export "
                           f"({METADATA_FILE} of format '{EXPORT_FORMAT}' beside parquet "
                           "files only); --force replaces only an export: choose another "
                           "--out")
        if not force:
            raise TmlError(f"{out} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(out)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TmlError(f"--out {out}: cannot write there ({probe} is not a directory)")


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory: `path` itself, or the newest checkpoint in a save_dir."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a save_dir holding one")
    return latest


def check_checkpoint(config: TwhinConfig, checkpoint: str) -> dict[str, tuple[int, int]]:
    """Checkpoint key -> (rows, D) of every table and the relation vectors, checked against
    the config (present, same shape) from the metadata alone; CheckpointError otherwise.
    Also refuses a config that scores differently from the trained run (another operator,
    relation order, tables: `signature.check_checkpoint_matches`), which shapes miss."""
    check_checkpoint_matches(config, checkpoint)
    saved = tensor_shapes(checkpoint)   # CheckpointError if missing or damaged
    dim = config.model.embeddings.tables[0].embedding_dim
    wanted = {TABLE_KEY.format(t.name): (t.num_embeddings, dim)
              for t in config.model.embeddings.tables}
    # Reciprocal relations: the inverse relations' vectors follow, rows R..2R-1.
    wanted[RELATIONS_KEY] = ((2 if config.model.reciprocal else 1)
                             * len(config.model.relations), dim)
    for key, shape in wanted.items():
        if key not in saved:
            raise CheckpointError(f"checkpoint {checkpoint} has no '{key}': was it written with "
                                  "this config?")
        if saved[key] != shape:
            raise CheckpointError(f"checkpoint {checkpoint}: '{key}' has shape "
                                  f"{list(saved[key])}, the config says {list(shape)}")
    return wanted


def vocab_dir(config_path: str) -> str | None:
    """The importer's `vocab/` beside the config, if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), "vocab")
    return path if os.path.isdir(path) else None


def _vectors(array: np.ndarray) -> pa.FixedSizeListArray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def export_embeddings(config: TwhinConfig | str, config_path: str | None, checkpoint: str,
                      out: str, force: bool = False, vocab: str | None = None,
                      chunk_rows: int | None = None, index: bool = False) -> dict:
    """Write the export (see module docstring) to `out`; returns what it wrote.

    `config`: a TwhinConfig, or the path of its YAML. `config_path`: where the config was
    read from (its `vocab/` sibling gives the ids), or None (then `vocab` names the
    vocabulary, or the ids are row numbers). `chunk_rows`: rows read and written at a time
    (one parquet row group each); default: `CHUNK_BYTES` worth of vectors. `index`: also
    build each table's approximate nearest-neighbour index.
    """
    from .importer import read_vocabulary

    if isinstance(config, str):
        from tml.core.config import load_config_from_yaml

        config_path = config_path or config
        config = load_config_from_yaml(TwhinConfig, config)
    out = os.path.abspath(out)
    check_out(out, force)
    path = resolve_checkpoint(checkpoint)
    shapes = check_checkpoint(config, path)
    dim = shapes[RELATIONS_KEY][1]
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * dim))
    if chunk_rows < 1:
        raise TmlError(f"chunk_rows must be at least 1, got {chunk_rows}")
    vocab_tables: dict[str, np.ndarray] = {}
    directory = vocab or (vocab_dir(config_path) if config_path else None)
    if vocab and not os.path.isdir(vocab):
        raise TmlError(f"--vocab {vocab}: no such directory")
    if directory:
        vocab_tables, _ = read_vocabulary(directory)
    schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
    sizes = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    indexes: dict[str, dict] = {}
    try:
        with atomic_directory(out) as tmp:
            for name, rows in sizes.items():
                ids = vocab_tables.get(name)
                if ids is not None and len(ids) != rows:
                    ids = None
                key = TABLE_KEY.format(name)
                builder = None
                if index:
                    from .neighbor_index import IndexBuilder

                    builder = IndexBuilder(rows, int(dim))
                with pq.ParquetWriter(os.path.join(tmp, f"{name}.parquet"), schema) as writer:
                    for start in range(0, rows, chunk_rows):
                        end = min(rows, start + chunk_rows)
                        part = (ids[start:end] if ids is not None
                                else np.arange(start, end).astype(str))
                        vectors = load_rows(path, key, start, end, torch.float32)
                        writer.write_table(pa.table({"id": pa.array(list(part), pa.string()),
                                                     "vector": _vectors(vectors.numpy())},
                                                    schema=schema), row_group_size=end - start)
                        if builder is not None:
                            builder.add(vectors.numpy())
                        del vectors
                if builder is not None:
                    indexes[name] = builder.save(tmp, name)
                    del builder
            relations = config.model.relations
            relation_vectors = load_rows(path, RELATIONS_KEY, 0, len(relations), torch.float32)
            columns = {"name": [r.name for r in relations],
                       "operator": [r.operator.value for r in relations],
                       "lhs": [r.lhs for r in relations], "rhs": [r.rhs for r in relations],
                       "vector": _vectors(relation_vectors.numpy())}
            if config.model.reciprocal:   # the inverse relations' vectors (head queries)
                columns["inverse_vector"] = _vectors(load_rows(
                    path, RELATIONS_KEY, len(relations), 2 * len(relations),
                    torch.float32).numpy())
            pq.write_table(pa.table(columns), os.path.join(tmp, "relations.parquet"))
            metadata = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
                        "embedding_dim": int(dim), "tables": {n: int(r) for n, r in sizes.items()},
                        "checkpoint": os.path.abspath(path), "ids_from_vocabulary": bool(directory),
                        "entity_bias": bool(config.model.entity_bias)}
            if indexes:
                metadata["indexes"] = indexes
            with open(os.path.join(tmp, METADATA_FILE), "w") as handle:
                json.dump(metadata, handle, indent=2)
    except OSError as error:
        # e.g. a read-only or full disk: one line, and atomic_directory left nothing behind
        raise TmlError(f"--out {out}: cannot write the export ({error.strerror or error})") from None
    return {"out": out, **metadata}
