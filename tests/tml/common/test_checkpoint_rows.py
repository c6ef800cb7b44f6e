"""`tml.common.checkpoint_rows`: row ranges of checkpoint tensors, whatever wrote them.

One multi-process run (2 gloo workers) writes the same TwHIN state sharded row_wise
(uneven), table_wise (on rank 1 only) and column_wise, and evaluates it sharded over the 2
workers; the test process then checks row reads, evaluation and export against the same
state written by one process.
"""

import json
import os
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.export import RELATIONS_KEY, TABLE_KEY
from tests.twhin_setup import REPO
from tml.common.checkpoint_rows import load_row_ranges, load_rows, tensor_shapes
from tml.errors import CheckpointError


def _save(state, path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return str(path)


def test_rows_dtype_and_errors_name_checkpoint_and_key(tmp_path):
    table = torch.randn(100, 6)
    base = torch.randn(40, 9)
    path = _save({"t": table, "view": base[3:30, 1:7], "half": table.to(torch.bfloat16),
                  "step": torch.tensor(3)}, tmp_path / "c")
    assert torch.equal(load_rows(path, "t", 17, 45), table[17:45])
    assert torch.equal(load_rows(path, "view", 5, 27), base[3:30, 1:7][5:27])
    half = load_rows(path, "half", 0, 100)
    assert half.dtype == torch.bfloat16 and torch.equal(half, table.to(torch.bfloat16))
    assert load_rows(path, "t", 0, 3, torch.float64).dtype == torch.float64
    assert load_rows(path, "t", 9, 9).shape == (0, 6)
    both = load_row_ranges(path, {"t": (0, 2), "view": (1, 2)})
    assert torch.equal(both["t"], table[:2]) and torch.equal(both["view"], base[4:5, 1:7])
    assert tensor_shapes(path)["t"] == (100, 6)
    for key, start, end, message in (
            ("nope", 0, 1, f"checkpoint {path} has no tensor 'nope'"),
            ("step", 0, 1, f"checkpoint {path}: 'step' has shape []; rows can be read from "
                           "2-D tensors only"),
            ("t", 90, 101, f"checkpoint {path}: rows [90, 101) are outside 't', which has 100 "
                           "rows")):
        with pytest.raises(CheckpointError) as error:
            load_rows(path, key, start, end)
        assert str(error.value) == message


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_a_few_rows_of_a_large_table_read_only_those_rows(tmp_path):
    """Memory bound: the bytes read (hence held) are the rows asked for, not the table."""
    table = torch.randn(200_000, 16)      # 12.8 MB, saved as one chunk (table_wise-like)
    path = _save({"t": table}, tmp_path / "c")

    def bytes_read():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    load_rows(path, "t", 0, 1)   # imports and first-call costs out of the measurement
    before = bytes_read()
    rows = load_rows(path, "t", 123_456, 123_556)
    read = bytes_read() - before
    assert torch.equal(rows, table[123_456:123_556])
    assert read < 200_000, read    # 100 rows = 6.4 kB (+ metadata, zip directory)


def _sharded(tensor, pieces, rank):
    """A ShardedTensor of `tensor` (as TorchRec writes them); pieces: (owner, row0, rows,
    col0, cols)."""
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    local = [Shard.from_tensor_and_offsets(tensor[r0:r0 + n, c0:c0 + m].clone(), [r0, c0],
                                           rank)
             for owner, r0, n, c0, m in pieces if owner == rank]
    return init_from_local_shards(local, *tensor.shape)


def write_sharded_and_evaluate(full: str, out: str, config: str) -> dict:
    """In each of 2 workers: re-save `full` sharded three ways at `out`, then evaluate it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from projects.twhin.link_prediction import evaluate_checkpoint
    from tml.common.checkpointing import read_tensors

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = read_tensors(full)
    user, item, entity = (state[TABLE_KEY.format(n)] for n in ("user", "item", "entity"))
    layouts = {
        "user": [(0, 0, 7, 0, 4), (1, 7, user.shape[0] - 7, 0, 4)],          # row_wise, uneven
        "item": [(1, 0, item.shape[0], 0, 4)],                                 # table_wise
        "entity": [(0, 0, entity.shape[0], 0, 1), (1, 0, entity.shape[0], 1, 3)],  # column_wise
    }
    sharded = {TABLE_KEY.format(n): _sharded(state[TABLE_KEY.format(n)], p, rank)
               for n, p in layouts.items()}
    sharded[RELATIONS_KEY] = state[RELATIONS_KEY]       # replicated
    dcp.save(sharded, checkpoint_id=out)
    dist.barrier()
    return evaluate_checkpoint(config, out, candidate_chunk=4, query_chunk=8)


@pytest.mark.slow
def test_two_worker_checkpoint_rows_sharded_evaluation_and_export(tmp_path, monkeypatch):
    from projects.twhin.cli import dispatch
    from projects.twhin.link_prediction import evaluate_checkpoint
    from tests.launch_checks import launch_checks
    from tests.projects.twhin.test_twhin_cli import _fake_checkpoint, _triples, _write_tsv

    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples(), header=True)
    data = tmp_path / "data"
    dispatch(["import", "--triples", tsv, "--out", str(data), "--dim", "4", "--seed", "1"])
    config = str(data / "config.yaml")
    _, state = _fake_checkpoint(data, tmp_path / "one")
    full, two = str(tmp_path / "one" / "7"), str(tmp_path / "two" / "7")

    results = launch_checks(write_sharded_and_evaluate, 2, full, two, config)

    # (a) any row range of the 2-worker checkpoint equals the tensor written by one process
    for key, tensor in state.items():
        rows = tensor.shape[0]
        for start, end in ((0, rows), (1, rows - 1), (rows - 1, rows), (2, 3)):
            assert torch.equal(load_rows(two, key, start, end), tensor[start:end]), key
    # (b) evaluation sharded over 2 workers == 1 worker, to the bit for the ranks
    one = evaluate_checkpoint(config, full, candidate_chunk=4, query_chunk=8)
    assert results[0] == results[1]
    sharded = results[0]
    assert sharded["workers"] == 2 and one["workers"] == 1 and one["count"] > 0
    for key in ("count", "mean_rank", "hits_at_1", "hits_at_3", "hits_at_10", "auc"):
        assert sharded[key] == one[key], key
    assert sharded["mrr"] == pytest.approx(one["mrr"], rel=1e-12, abs=1e-12)
    assert sharded["per_relation"].keys() == one["per_relation"].keys()
    assert sum(m["count"] for m in one["per_relation"].values()) == one["count"]
    for name, metrics in one["per_relation"].items():
        # every relation's metrics, each side's too (a relation without test edges: count 0)
        got = sharded["per_relation"][name]
        assert got.keys() == metrics.keys(), name
        for key, value in metrics.items():
            expected = value if isinstance(value, dict) else {key: value}
            actual = got[key] if isinstance(value, dict) else {key: got[key]}
            assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), (name, key)
    # export of the 2-worker checkpoint == export of the 1-process one
    dispatch(["export", "--config", config, "--checkpoint", two, "--out",
              str(tmp_path / "e2")])
    dispatch(["export", "--config", config, "--checkpoint", full, "--out",
              str(tmp_path / "e1")])
    for name in ("user", "item", "entity", "relations"):
        assert pq.read_table(tmp_path / "e2" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "e1" / f"{name}.parquet")), name
    meta = [json.loads((tmp_path / e / "metadata.json").read_text()) for e in ("e1", "e2")]
    assert meta[0]["tables"] == meta[1]["tables"]
    np.testing.assert_array_equal(
        np.array(pq.read_table(tmp_path / "e2" / "entity.parquet").column("vector")
                 .to_pylist(), dtype=np.float32),
        state[TABLE_KEY.format("entity")].numpy())
