"""Reciprocal relations through `twhin export` and `twhin evaluate` (checkpoint of 2R rows)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from projects.twhin.cli import dispatch
from projects.twhin.export import RELATIONS_KEY, TABLE_KEY
from tests.projects.twhin.test_twhin_cli import _triples, _write_tsv
from tml.errors import CheckpointError


def _reciprocal_import(tmp_path):
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples())
    out = tmp_path / "data"
    dispatch(["import", "--triples", tsv, "--out", str(out), "--dim", "4", "--seed", "1"])
    path = out / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"].update({"loss": "softmax", "reciprocal": True})
    path.write_text(yaml.safe_dump(config))
    return out, config


def _checkpoint(config, path, relation_rows):
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    state = {TABLE_KEY.format(t["name"]): torch.randn(t["num_embeddings"], 4, generator=g)
             for t in config["model"]["embeddings"]["tables"]}
    state[RELATIONS_KEY] = torch.randn(relation_rows, 4, generator=g)
    dcp.save(state, checkpoint_id=str(path / "7"), no_dist=True)
    return state


def test_export_writes_forward_and_inverse_vectors_and_evaluate_runs(tmp_path):
    out, config = _reciprocal_import(tmp_path)
    num_relations = len(config["model"]["relations"])
    state = _checkpoint(config, tmp_path / "save", 2 * num_relations)
    emb = tmp_path / "emb"
    dispatch(["export", "--config", str(out / "config.yaml"), "--checkpoint",
              str(tmp_path / "save"), "--out", str(emb)])
    relations = pq.read_table(emb / "relations.parquet")
    vectors = np.array(relations.column("vector").to_pylist(), np.float32)
    inverse = np.array(relations.column("inverse_vector").to_pylist(), np.float32)
    assert np.array_equal(vectors, state[RELATIONS_KEY][:num_relations].numpy())
    assert np.array_equal(inverse, state[RELATIONS_KEY][num_relations:].numpy())
    result = dispatch(["evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
                       str(tmp_path / "save"), "--json"])
    assert 0 < result["mrr"] <= 1


def test_a_checkpoint_without_inverse_vectors_is_refused_by_shape(tmp_path):
    out, config = _reciprocal_import(tmp_path)
    num_relations = len(config["model"]["relations"])
    _checkpoint(config, tmp_path / "save", num_relations)
    with pytest.raises(CheckpointError, match=rf"has shape \[{num_relations}, 4\], the config "
                       rf"says \[{2 * num_relations}, 4\]"):
        dispatch(["export", "--config", str(out / "config.yaml"), "--checkpoint",
                  str(tmp_path / "save"), "--out", str(tmp_path / "emb")])
