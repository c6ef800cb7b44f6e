"""Each table sees only its own ids: the same loss, gradients and SGD step as the original
layout of one bag per lookup in every table (docs/performance.md, issue 13).

The reference is the layout and model code this replaced, kept here: the lookup KJT with
one bag per lookup in every table (length 1 under the lookup's table, 0 under the others)
and each lookup's vector as the sum of the pooled output's table blocks. Both run through
a real (unsharded) EmbeddingBagCollection from the same weights, on a 2-table graph.
"""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.data.edges import EdgeBatch, edges_to_kjt, relation_tables
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config

TABLES = {"user": 30, "item": 20}
NAMES = list(TABLES)
D = 8
NUM_EDGES = 24


def one_bag_per_lookup_kjt(lookup_tables: torch.Tensor, lookup_rows: torch.Tensor
                           ) -> KeyedJaggedTensor:
    """The original layout: 2B(1 + G) + T*K bags per table, a lookup's id in its own table."""
    order = torch.argsort(lookup_tables, stable=True)
    lengths = torch.arange(len(NAMES)).unsqueeze(1).eq(lookup_tables.unsqueeze(0))
    return KeyedJaggedTensor(keys=NAMES, values=lookup_rows[order],
                             lengths=lengths.reshape(-1).to(torch.int32))


class SumOfBlocksModel(TwhinModel):
    """The model's lookup as it was: sum the pooled output's table blocks (one is the
    lookup's row, the others zeros)."""

    def _looked_up(self, batch):  # noqa: ANN001, ANN201
        values = self.large_embeddings(batch.nodes).values()
        return sum(values.split(self.embedding_dim, dim=1))


def _config(pairs, loss="bce", regularization=0.0):
    return parse_config(TwhinModelConfig, {
        "embeddings": {"tables": [{"name": n, "num_embeddings": rows, "embedding_dim": D,
                                   "optimizer": {"sgd": {"lr": 0.1}}}
                                  for n, rows in TABLES.items()]},
        "relations": [{"name": f"r{i}", "lhs": a, "rhs": b} for i, (a, b) in enumerate(pairs)],
        "translation_optimizer": {"sgd": {"lr": 0.1}},
        "loss": loss, "regularization": regularization})


def _batches(config, data, seed):
    """The same edges in both layouts: (new batch, original-layout batch)."""
    g = torch.Generator().manual_seed(seed)
    rt = relation_tables(config.relations, NAMES)
    rel = torch.randint(0, len(config.relations), (NUM_EDGES,), generator=g)
    sizes = torch.tensor(list(TABLES.values()))

    def draw(side, *shape):  # noqa: ANN001, ANN202
        scale = sizes[rt[rel, side]].view(-1, *[1] * (len(shape) - 1))
        return (torch.rand(*shape, generator=g) * scale).long()

    lhs, rhs = draw(0, NUM_EDGES), draw(1, NUM_EDGES)
    g_ = data.global_negatives
    neg_lhs, neg_rhs = draw(0, NUM_EDGES, g_), draw(1, NUM_EDGES, g_)
    shared = (torch.rand(len(NAMES), data.shared_negatives, generator=g)
              * sizes.unsqueeze(1)).long()
    nodes, slots = edges_to_kjt(lhs, rhs, rel, rt, NAMES, neg_lhs, neg_rhs, shared)
    # The original's lookups, in the documented order: lhs, rhs per edge; then per edge G
    # lhs-table and G rhs-table negatives; then each table's K shared ids.
    tables = rt[rel]
    lookup_tables = torch.cat([tables.reshape(-1),
                               torch.cat([tables[:, :1].expand(-1, g_),
                                          tables[:, 1:].expand(-1, g_)], 1).reshape(-1),
                               torch.arange(len(NAMES)).repeat_interleave(shared.shape[1])])
    lookup_rows = torch.cat([torch.stack([lhs, rhs], 1).reshape(-1),
                             torch.cat([neg_lhs, neg_rhs], 1).reshape(-1), shared.reshape(-1)])
    fields = {"labels": torch.ones(NUM_EDGES), "rels": rel,
              "weights": torch.rand(NUM_EDGES, generator=g) + 0.5, "shared": shared}
    return (EdgeBatch(nodes=nodes, slots=slots, **fields),
            EdgeBatch(nodes=one_bag_per_lookup_kjt(lookup_tables, lookup_rows), slots=slots,
                      **fields))


CASES = {
    # Mixed sides: the tables' counts differ, so the new layout has empty bags.
    "mixed-relations-bce": ([("user", "item"), ("user", "user"), ("item", "user")],
                            {"in_batch_negatives": 3}, {}),
    "user-item-and-item-user-bce": ([("user", "item"), ("item", "user")],
                                    {"in_batch_negatives": 3}, {}),
    # Every relation user -> item: no empty bag at all (the gradient's unfilled buffer).
    "user-item-bce": ([("user", "item"), ("user", "item")], {"in_batch_negatives": 4}, {}),
    # Softmax (reads the positives' ids back from the KJT), global and shared negatives, N3.
    "mixed-softmax-global-shared": (
        [("user", "item"), ("item", "user"), ("user", "user")],
        {"in_batch_negatives": 2, "global_negatives": 3, "shared_negatives": 5},
        {"loss": "softmax", "regularization": 0.01}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_own_ids_per_table_give_the_same_steps_as_one_bag_per_lookup(case):
    pairs, data_args, model_args = CASES[case]
    config = _config(pairs, **model_args)
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=NUM_EDGES, **data_args)
    models = []
    for cls in (TwhinModel, SumOfBlocksModel):
        torch.manual_seed(0)
        model = cls(config, data)
        model.large_embeddings = LargeEmbeddings(config.embeddings, device="cpu")
        models.append(model)
    new, old = models
    old.load_state_dict(new.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    losses = ([], [])
    for step in range(3):
        new_batch, old_batch = _batches(config, data, seed=step)
        # The original layout has one bag per lookup per table; the new one fewer when no
        # relation has a table on both sides, half with one user and one item per edge.
        assert new_batch.nodes.stride() <= old_batch.nodes.stride()
        if case == "user-item-bce":
            assert 2 * new_batch.nodes.stride() == old_batch.nodes.stride()
        grads = []
        for side, (model, batch, optimizer) in enumerate(zip(models, (new_batch, old_batch),
                                                               optimizers)):
            torch.manual_seed(100 + step)              # the same in-batch samples
            optimizer.zero_grad()
            loss, _ = TwhinModelAndLoss(model)(batch)
            loss.backward()
            losses[side].append(loss.item())
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
            optimizer.step()
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert grads[0][name].abs().sum() > 0, name          # the step trains it
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7,
                                       msg=f"{case} step {step} gradient of {name}")
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    old_state = old.state_dict()
    for name, value in new.state_dict().items():      # the updated rows and relation vectors
        torch.testing.assert_close(value, old_state[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(new.state_dict()["all_trans_embs"],
                           TwhinModel(config, data).state_dict()["all_trans_embs"])
