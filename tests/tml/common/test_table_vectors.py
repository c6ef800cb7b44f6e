"""Tables started from a parquet of vectors (`init_from_export`) and frozen tables, in
tml (any project): the vectors land in their rows, rows beyond the file keep their initial
values, a frozen table never moves and keeps no optimizer state, a trainable one moves,
and a bad file is one line naming it."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.fuzz_support import FUZZ_SETTINGS, mutated, outcome
from tml.common.modules.embedding.config import LargeEmbeddingsConfig
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.common.modules.embedding.vectors import load_table_vectors, read_vectors
from tml.errors import ConfigError, DataError
from tml.trainer.fused_tables import apply_table_optimizers, table_schedules

ROWS, DIM = 12, 4


def _export(path, rows, dim=DIM, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    pq.write_table(pa.table({"id": [f"user:{i}" for i in range(rows)],
                             "vector": pa.array(list(vectors), pa.list_(pa.float32(), dim))}),
                   path)
    return vectors


def _config(path, frozen):
    table = {"num_embeddings": ROWS, "embedding_dim": DIM,
             "optimizer": {"adagrad": {"lr": 0.5}}}
    return LargeEmbeddingsConfig.model_validate({"tables": [
        {**table, "name": "user", "frozen": frozen, "init_from_export": {"path": str(path)}},
        {**table, "name": "item"}]})


def _train(model, steps=3):
    for step in range(steps):
        ids = torch.arange(ROWS).roll(step)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.cat([ids, ids]),
            lengths=torch.ones(2 * ROWS, dtype=torch.int32))
        pooled = model(features).to_dict()
        ((pooled["user"] * pooled["item"]).sum(-1) - 1).pow(2).mean().backward()


@pytest.mark.parametrize("frozen", [True, False])
def test_vectors_land_in_their_rows_and_frozen_tables_never_move(tmp_path, frozen):
    vectors = _export(tmp_path / "user.parquet", ROWS - 2)   # the table grew by 2 rows
    config = _config(tmp_path / "user.parquet", frozen)
    torch.manual_seed(0)
    model = apply_table_optimizers(LargeEmbeddings(config, device="cpu"), config.tables)
    bags = model.ebc.embedding_bags
    fresh = bags["user"].weight.detach().clone()
    assert load_table_vectors(model, config.tables) == ["user"]
    start = bags["user"].weight.detach().clone()
    assert torch.equal(start[:ROWS - 2], torch.from_numpy(vectors))
    assert torch.equal(start[ROWS - 2:], fresh[ROWS - 2:])     # new rows: initialised
    item_before = bags["item"].weight.detach().clone()
    _train(model)
    assert torch.equal(bags["user"].weight.detach(), start) == frozen
    assert not torch.equal(bags["item"].weight.detach(), item_before)
    # Frozen: SGD at 0, which keeps no state; the schedule is constant 0.
    optimizers = bags["user"].weight._in_backward_optimizers
    assert all(not state for opt in optimizers for state in opt.state.values()) == frozen
    assert (table_schedules(config.tables)["user"].constant == 0.0) == frozen


def test_bad_vector_files_are_one_line_naming_the_file(tmp_path):
    what = "model.embeddings.tables 'user'"
    with pytest.raises(ConfigError, match=f"^{what}: {tmp_path}/none.parquet not found$"):
        read_vectors(str(tmp_path / "none.parquet"), ROWS, DIM, what)
    _export(tmp_path / "big.parquet", ROWS + 1)
    with pytest.raises(DataError, match=f"big.parquet: 13 vectors; {what} has 12 rows$"):
        read_vectors(str(tmp_path / "big.parquet"), ROWS, DIM, what, allow_fewer=True)
    _export(tmp_path / "small.parquet", ROWS - 1)
    with pytest.raises(DataError, match="small.parquet: 11 vectors"):
        read_vectors(str(tmp_path / "small.parquet"), ROWS, DIM, what)
    _export(tmp_path / "wide.parquet", ROWS, DIM + 1)
    with pytest.raises(DataError, match="wide.parquet: vectors are not all of 4 values"):
        read_vectors(str(tmp_path / "wide.parquet"), ROWS, DIM, what)
    pq.write_table(pa.table({"vector": pa.array([[1.0] * DIM, [float("nan")] * DIM])}),
                   tmp_path / "nan.parquet")
    with pytest.raises(DataError, match="nan.parquet: vectors hold non-finite values"):
        read_vectors(str(tmp_path / "nan.parquet"), ROWS, DIM, what, allow_fewer=True)
    pq.write_table(pa.table({"vector": pa.array([[1.0] * DIM, [1.0] * (DIM - 1) + [1.0] * 0,
                                                 [1.0] * (DIM + 1)])}),
                   tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="ragged.parquet: vectors are not all of 4 values"):
        read_vectors(str(tmp_path / "ragged.parquet"), ROWS, DIM, what, allow_fewer=True)
    pq.write_table(pa.table({"vector": ["a", "b"]}), tmp_path / "text.parquet")
    with pytest.raises(DataError, match="text.parquet: column 'vector' has type string"):
        read_vectors(str(tmp_path / "text.parquet"), ROWS, DIM, what, allow_fewer=True)


def test_fuzzed_vector_files_give_vectors_or_one_line(tmp_path):
    _export(tmp_path / "good.parquet", 5)
    good = (tmp_path / "good.parquet").read_bytes()
    target = tmp_path / "fuzzed.parquet"

    @FUZZ_SETTINGS
    @given(mutated(good))
    def check(data):
        target.write_bytes(data)
        outcome(lambda: read_vectors(str(target), ROWS, DIM, "t", allow_fewer=True))

    check()


def test_vectors_are_placed_by_id_with_a_vocab_and_unknown_ids_are_refused(tmp_path):
    from tml.common.modules.embedding.vectors import rows_by_id

    ids = [f"user:{i}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids[::-1], "row": list(range(ROWS))[::-1]}),
                   tmp_path / "vocab.parquet")                    # row i: user:i
    order = [7, 2, 9, 0]                                          # another order, a subset
    vectors = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32)
    pq.write_table(pa.table({"id": [ids[i] for i in order],
                             "vector": pa.array(list(vectors), pa.list_(pa.float32(), DIM))}),
                   tmp_path / "export.parquet")
    config = LargeEmbeddingsConfig.model_validate({"tables": [
        {"name": "user", "num_embeddings": ROWS, "embedding_dim": DIM,
         "optimizer": {"sgd": {"lr": 0.1}},
         "init_from_export": {"path": str(tmp_path / "export.parquet"),
                              "vocab": str(tmp_path / "vocab.parquet")}},
        {"name": "item", "num_embeddings": ROWS, "embedding_dim": DIM,
         "optimizer": {"sgd": {"lr": 0.1}}}]})
    model = LargeEmbeddings(config, device="cpu")
    before = model.ebc.embedding_bags["user"].weight.detach().clone()
    load_table_vectors(model, config.tables)
    after = model.ebc.embedding_bags["user"].weight.detach()
    for k, row in enumerate(order):
        assert torch.equal(after[row], torch.from_numpy(vectors[k]))
    untouched = [r for r in range(ROWS) if r not in order]
    assert torch.equal(after[untouched], before[untouched])

    export, vocab = str(tmp_path / "export.parquet"), str(tmp_path / "vocab.parquet")
    pq.write_table(pa.table({"id": ["user:0", "user:99"], "row": [0, 1]}), vocab)
    with pytest.raises(DataError, match=f"^{export}: id 'user:7' \\(row 0\\) is not in "
                       f"{vocab}$"):
        rows_by_id(export, vocab, ROWS, 4, "t")
    pq.write_table(pa.table({"id": ids, "row": [0] * ROWS}), vocab)
    with pytest.raises(DataError, match="a row is given to two ids"):
        rows_by_id(export, vocab, ROWS, 4, "t")
    pq.write_table(pa.table({"id": ids, "row": list(range(1, ROWS + 1))}), vocab)
    with pytest.raises(DataError, match=r"rows must lie in 0\.\.11"):
        rows_by_id(export, vocab, ROWS, 4, "t")
    pq.write_table(pa.table({"id": ids, "row": list(range(ROWS))}), vocab)
    pq.write_table(pa.table({"id": ["user:1", "user:1"], "vector": [[0.0] * DIM] * 2}),
                   export)
    with pytest.raises(DataError, match="an id is listed twice"):
        rows_by_id(export, vocab, ROWS, 2, "t")
