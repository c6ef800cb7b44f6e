"""Build the TwHIN datasets from config, generating the built-in graph when it is used."""

from __future__ import annotations

import os

from ..models.config import TwhinModelConfig
from .config import TwhinDataConfig
from .dataset import EdgesDataset


def maybe_generate_default_graph(data_root: str) -> bool:
    """Generate the built-in graph if `data_root` points into it and it is missing.

    The built-in graph's place is `generate.builtin_graph_dir()` (data/twhin in a
    checkout, the cache directory in an installation); TwhinDataConfig has already
    replaced local.yaml's path by it. Safe on many ranks at once (a file lock inside makes
    one of them write it).
    """
    if "://" in data_root:
        return False
    from .generate import builtin_graph_base, builtin_graph_dir, ensure_default_graph

    root = os.path.abspath(data_root.split("*")[0])
    if not (root + os.sep).startswith(builtin_graph_dir() + os.sep):
        return False
    return ensure_default_graph(builtin_graph_base())


def create_dataset(data_config: TwhinDataConfig, model_config: TwhinModelConfig,
                   rank: int = 0, world_size: int = 1, num_epochs: int = 1) -> EdgesDataset:
    """This rank's share of the edges of `data_config` (see EdgesDataset)."""
    maybe_generate_default_graph(data_config.data_root)
    return EdgesDataset(
        data_root=data_config.data_root,
        table_sizes={t.name: t.num_embeddings for t in model_config.embeddings.tables},
        relations=model_config.relations,
        batch_size=data_config.per_replica_batch_size,
        rank=rank,
        world_size=world_size,
        limit=data_config.limit,
        offset=data_config.offset,
        num_epochs=num_epochs,
        global_negatives=data_config.global_negatives,
        shared_negatives=data_config.shared_negatives,
    )
