"""The lookup KJT for the original's documented example (tables f0..f2, five edges)."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from projects.twhin.data.edges import edges_to_kjt, lookup_stride, relation_tables
from projects.twhin.models.config import Relation
from projects.twhin.models.models import lookup_rows

TABLES = ["f0", "f1", "f2"]
PAIRS = [("f0", "f1"), ("f1", "f2"), ("f1", "f0"), ("f2", "f1"), ("f0", "f2")]
LHS, RHS, REL = [1, 6, 3, 1, 8], [6, 3, 4, 4, 9], [0, 2, 1, 3, 4]


def _example():
    relations = [Relation(name=f"r{i}", lhs=a, rhs=b) for i, (a, b) in enumerate(PAIRS)]
    return edges_to_kjt(torch.tensor(LHS), torch.tensor(RHS), torch.tensor(REL),
                        relation_tables(relations, TABLES), TABLES)


def test_documented_example():
    kjt, slots = _example()
    assert kjt.keys() == TABLES
    # Lookups (lhs, rhs per edge): f0:1 f1:6 | f1:6 f0:3 | f1:3 f2:4 | f2:1 f1:4 | f0:8 f2:9
    assert kjt.values().tolist() == [1, 3, 8, 6, 6, 3, 4, 4, 1, 9]
    # Each table only its own ids, padded to the stride: no relation has one table on both
    # sides, so a table gets at most one lookup per edge (5).
    assert kjt.lengths().tolist() == [
        1, 1, 1, 0, 0,
        1, 1, 1, 1, 0,
        1, 1, 1, 0, 0,
    ]
    per_key = kjt.to_dict()
    assert per_key["f0"].values().tolist() == [1, 3, 8]
    assert per_key["f1"].values().tolist() == [6, 6, 3, 4]
    assert per_key["f2"].values().tolist() == [4, 1, 9]
    # slot = rank in its table * 3 + table
    assert slots.tolist() == [0, 1, 4, 3, 7, 2, 5, 10, 6, 8]


def test_slots_find_each_lookups_row_in_the_pooled_output():
    """Through a real (unsharded) EmbeddingBagCollection, with its output's column blocks in
    the KJT's order and in another order."""
    kjt, slots = _example()
    torch.manual_seed(0)
    dim = 4
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=10,
                           feature_names=[name]) for name in TABLES])
    pooled = ebc(kjt)
    assert pooled.values().shape == (5, 3 * dim)
    got = lookup_rows(pooled.values(), slots, pooled.keys(), TABLES, dim)
    weights = {name: ebc.embedding_bags[name].weight for name in TABLES}
    lookups = [(TABLES.index(PAIRS[r][side]), ids[i])
               for i, r in enumerate(REL) for side, ids in ((0, LHS), (1, RHS))]
    expected = torch.stack([weights[TABLES[t]][row] for t, row in lookups])
    assert torch.equal(got, expected)
    # The output's blocks in another order (as sharding may give them).
    order = [2, 0, 1]
    values = pooled.values().view(5, 3, dim)[:, order].reshape(5, 3 * dim)
    reordered = lookup_rows(values, slots, [TABLES[i] for i in order], TABLES, dim)
    assert torch.equal(reordered, expected)
    # Gradient: each lookup's gradient lands in its own bag, the empty bags get zeros.
    grad = torch.randn_like(expected)
    values = pooled.values().detach().requires_grad_()
    lookup_rows(values, slots, pooled.keys(), TABLES, dim).backward(grad)
    flat = values.grad.view(-1, dim)
    assert torch.equal(flat[slots], grad)
    empty = torch.ones(flat.shape[0], dtype=torch.bool)
    empty[slots] = False
    assert empty.sum() == 5 and not flat[empty].any()


def test_the_stride_is_the_most_a_table_can_get_in_a_batch():
    user_tweet = torch.tensor([[0, 1], [0, 1]])
    assert lookup_stride(user_tweet, 2, 100) == 100              # every bag used
    assert lookup_stride(user_tweet, 2, 100, 3, 7) == 100 * 4 + 7
    with_follows = torch.tensor([[0, 1], [0, 0]])                # user -> user: 2 per edge
    assert lookup_stride(with_follows, 2, 100, 3, 7) == 200 * 4 + 7
