"""Retraining day 2 on day 1 plus new edges (issue 19): `twhin import --vocab` keeps day-1
ids at their rows, the warm start keeps day-1 rows bit for bit where the table is frozen
and lets them continue (change, from their day-1 values) where it is trainable; new rows
are initialised and trained."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from projects.twhin.export import RELATIONS_KEY, TABLE_KEY
from projects.twhin.importer import read_vocabulary
from tests.lifecycle_checks import GROWN_DIM, GROWN_ROWS, SHARDING_TYPES
from tests.twhin_setup import REPO, launcher_env
from tml.common.checkpointing import read_tensors, save_checkpoint


def _edges(seed, users, items, n):
    rng = np.random.default_rng(seed)
    rows = set()
    while len(rows) < n:
        u, i = int(rng.integers(users)), int(rng.integers(items))
        rows.add((f"user:u{u}", "buys", f"item:i{i}") if rng.random() < 0.7 else
                 (f"user:u{u}", "follows", f"user:u{(u + 1 + i) % users}"))
    return sorted(rows)


def _tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_day2_keeps_day1_rows_frozen_or_continuing(tmp_path):
    day1 = _edges(1, 20, 10, 120)
    new = _edges(2, 26, 14, 60) + [("user:u0", "likes", "item:i13")]   # new ids, relation
    done = subprocess.run(
        # As a module: run by path, tests/ would come first on sys.path and its
        # tests/projects/ would stand in for the projects package.
        [sys.executable, "-m", "tests.lifecycle_checks", str(tmp_path),
         _tsv(tmp_path / "d1.tsv", day1), _tsv(tmp_path / "d2.tsv", day1 + new)],
        env=launcher_env(), capture_output=True, text=True, timeout=280, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = json.loads(done.stdout.strip().splitlines()[-1])
    vocab1, relations1 = read_vocabulary(str(tmp_path / "day1" / "vocab"))
    vocab2, relations2 = read_vocabulary(str(tmp_path / "day2" / "vocab"))
    for table, ids in vocab1.items():                       # day-1 ids keep their rows
        assert list(vocab2[table][:len(ids)]) == list(ids)
        assert len(vocab2[table]) > len(ids)
    assert relations2 == relations1 + ["likes"]
    one, two = read_tensors(checkpoints["day1"]), read_tensors(checkpoints["day2"])
    item1, item2 = one[TABLE_KEY.format("item")], two[TABLE_KEY.format("item")]
    user1, user2 = one[TABLE_KEY.format("user")], two[TABLE_KEY.format("user")]
    n_item, n_user = len(vocab1["item"]), len(vocab1["user"])
    # Frozen: day-1 rows bit for bit, new rows initialised (and not trained either).
    assert item2.shape[0] == len(vocab2["item"])
    assert torch.equal(item2[:n_item], item1)
    assert torch.isfinite(item2).all() and item2[n_item:].abs().sum() > 0
    # Trainable: day-1 rows continued (changed, yet still near their day-1 values).
    assert user2.shape[0] == len(vocab2["user"])
    assert not torch.equal(user2[:n_user], user1)
    moved = (user2[:n_user] - user1).norm(dim=1)
    assert (moved > 0).float().mean() > 0.5
    cos = torch.nn.functional.cosine_similarity(user2[:n_user], user1, dim=1)
    assert cos.mean() > 0.8
    # Relation vectors: day 1's kept at their index (then trained), the new one appended.
    assert two[RELATIONS_KEY].shape[0] == len(relations2) == one[RELATIONS_KEY].shape[0] + 1


def _assemble(per_rank, part):
    full = torch.full((GROWN_ROWS, GROWN_DIM), float("nan"))
    for shards in per_rank:
        for row, column, values in shards[part]:
            block = torch.tensor(values)
            full[row:row + block.shape[0], column:column + block.shape[1]] = block
    return full


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grown_tables_load_bit_for_bit_on_two_workers_for_every_sharding_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.launch_checks import launch_checks
    from tests.lifecycle_checks import grown_sharded

    saved_rows, vector_rows = 9, 11
    torch.manual_seed(3)
    day1 = torch.nn.Module()
    day1.ebc = torch.nn.Module()
    day1.ebc.embedding_bags = torch.nn.ModuleDict({"user": torch.nn.Module()})
    day1.ebc.embedding_bags["user"].weight = torch.nn.Parameter(
        torch.randn(saved_rows, GROWN_DIM))
    checkpoint = save_checkpoint(str(tmp_path / "save"), 1, {"model": day1})
    vectors = np.random.default_rng(4).standard_normal((vector_rows, GROWN_DIM))
    vectors = vectors.astype(np.float32)
    pq.write_table(pa.table({"vector": pa.array(list(vectors),
                                                pa.list_(pa.float32(), GROWN_DIM))}),
                   tmp_path / "user.parquet")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + os.pathsep + (previous or "")
    try:
        results = launch_checks(grown_sharded, 2, checkpoint, str(tmp_path / "user.parquet"))
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    saved = day1.ebc.embedding_bags["user"].weight.detach()
    for sharding_type in SHARDING_TYPES:
        per_rank = [results[rank][sharding_type] for rank in (0, 1)]
        assert per_rank[0]["grown"] == {"model.ebc.embedding_bags.user.weight":
                                        (saved_rows, GROWN_ROWS)}, sharding_type
        before, warm = _assemble(per_rank, "before"), _assemble(per_rank, "warm")
        assert not torch.isnan(before).any(), sharding_type       # every block is held
        assert torch.equal(warm[:saved_rows], saved), sharding_type
        assert torch.equal(warm[saved_rows:], before[saved_rows:]), sharding_type
        written = _assemble(per_rank, "vectors")
        assert torch.equal(written[:vector_rows], torch.from_numpy(vectors)), sharding_type
        assert torch.equal(written[vector_rows:], warm[vector_rows:]), sharding_type
