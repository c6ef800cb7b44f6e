"""`twhin export`: a checkpoint's embeddings as plain parquet files anyone can read.

Output directory:

    <table>.parquet       id (string), vector (fixed_size_list<float32>[D]), one row per
                          table row, in row order
    relations.parquet     name, operator, lhs, rhs (table names), vector (as above)
    metadata.json         embedding_dim, tables (name -> rows), source checkpoint

Why a fixed-size list column: one column whatever D, read back as a (N, D) array with
`np.stack(df["vector"])` in pandas or without a copy through pyarrow
(`table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, D)`).
The ids are the importer's original strings when `vocab/` lies beside the config (as
`twhin import` writes it), else the row number as a string.

Loading: `torch.distributed.checkpoint.load(..., no_dist=True)` into full-size empty tensors
reads a checkpoint written by any number of workers and any sharding (DCP reassembles the
shards) in this one process; the tables must fit in its memory. The output is written to a
temporary sibling directory renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from projects.twhin.config import TwhinConfig
from tml.common.atomic_directory import atomic_directory, refuse_non_empty
from tml.common.checkpointing import latest_checkpoint
from tml.errors import CheckpointError, TmlError

TABLE_KEY = "model.model.large_embeddings.ebc.embedding_bags.{}.weight"
RELATIONS_KEY = "model.model.all_trans_embs"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory: `path` itself, or the newest checkpoint in a save_dir."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a save_dir holding one")
    return latest


def load_embeddings(config: TwhinConfig, checkpoint: str
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(table name -> (rows, D) tensor, (R, D) relation vectors) read from `checkpoint`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = resolve_checkpoint(checkpoint)
    try:
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 (DCP raises several kinds)
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    dim = config.model.embeddings.tables[0].embedding_dim
    wanted = {TABLE_KEY.format(t.name): (t.num_embeddings, dim)
              for t in config.model.embeddings.tables}
    wanted[RELATIONS_KEY] = (len(config.model.relations), dim)
    state = {}
    for key, shape in wanted.items():
        if key not in metadata:
            raise CheckpointError(f"checkpoint {path} has no '{key}': was it written with "
                                  "this config?")
        saved = tuple(metadata[key].size)
        if saved != shape:
            raise CheckpointError(f"checkpoint {path}: '{key}' has shape {list(saved)}, the "
                                  f"config says {list(shape)}")
        state[key] = torch.empty(shape, dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load")
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from None
    tables = {t.name: state[TABLE_KEY.format(t.name)] for t in config.model.embeddings.tables}
    return tables, state[RELATIONS_KEY]


def vocab_dir(config_path: str) -> str | None:
    """The importer's `vocab/` beside the config, if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), "vocab")
    return path if os.path.isdir(path) else None


def _vectors(array: np.ndarray) -> pa.FixedSizeListArray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def export_embeddings(config: TwhinConfig, config_path: str, checkpoint: str, out: str,
                      force: bool = False, vocab: str | None = None) -> dict:
    """Write the export (see module docstring) to `out`; returns what it wrote."""
    from projects.twhin.importer import read_vocabulary

    out = os.path.abspath(out)
    refuse_non_empty(out, force)
    path = resolve_checkpoint(checkpoint)
    tables, relation_vectors = load_embeddings(config, path)
    vocab_tables: dict[str, np.ndarray] = {}
    directory = vocab or vocab_dir(config_path)
    if vocab and not os.path.isdir(vocab):
        raise TmlError(f"--vocab {vocab}: no such directory")
    if directory:
        vocab_tables, _ = read_vocabulary(directory)
    with atomic_directory(out) as tmp:
        for name, weights in tables.items():
            rows = weights.shape[0]
            ids = vocab_tables.get(name)
            if ids is None or len(ids) != rows:
                ids = np.arange(rows).astype(str)
            pq.write_table(pa.table({"id": pa.array(list(ids), pa.string()),
                                     "vector": _vectors(weights.numpy())}),
                           os.path.join(tmp, f"{name}.parquet"))
        relations = config.model.relations
        pq.write_table(pa.table({
            "name": [r.name for r in relations],
            "operator": [r.operator.value for r in relations],
            "lhs": [r.lhs for r in relations], "rhs": [r.rhs for r in relations],
            "vector": _vectors(relation_vectors.numpy())}),
            os.path.join(tmp, "relations.parquet"))
        metadata = {"embedding_dim": int(relation_vectors.shape[1]),
                    "tables": {n: int(w.shape[0]) for n, w in tables.items()},
                    "checkpoint": os.path.abspath(path), "ids_from_vocabulary": bool(directory)}
        with open(os.path.join(tmp, "metadata.json"), "w") as handle:
            json.dump(metadata, handle, indent=2)
    return {"out": out, **metadata}
