"""The cheaper step's building blocks against independent references (issue 13).

`relation_rows` replaces an index of the relation vectors by a one-hot product: its forward
must be exactly the rows, its gradient the per-relation sum of the rows' gradients (a loop
over the batch). `cat_nonempty` must equal `torch.cat` and skip the copy when only one
piece has rows.
"""

import torch

from projects.twhin.models.models import cat_nonempty, relation_rows


def test_relation_rows_is_the_rows_and_its_gradient_sums_per_relation():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(8, 16, generator=g, requires_grad=True)
    rows = torch.randint(0, 8, (300,), generator=g)
    upstream = torch.randn(300, 16, generator=g)
    out = relation_rows(vectors, rows)
    assert torch.equal(out.detach(), vectors.detach()[rows])
    out.backward(upstream)
    expected = torch.zeros(8, 16)
    for i in range(rows.numel()):
        expected[int(rows[i])] += upstream[i]
    assert torch.allclose(vectors.grad, expected, atol=1e-5)


def test_relation_rows_keeps_the_vectors_dtype():
    vectors = torch.randn(4, 6, dtype=torch.float64)
    assert relation_rows(vectors, torch.tensor([3, 0])).dtype == torch.float64


def test_cat_nonempty_equals_cat_and_returns_a_lone_piece_itself():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    empty = torch.zeros(2, 3, 0)
    assert torch.equal(cat_nonempty([a, empty, b], dim=2), torch.cat([a, b], dim=2))
    assert cat_nonempty([a, empty, empty], dim=2) is a
    assert cat_nonempty([empty, empty], dim=2).shape == (2, 3, 0)


def test_cached_labels_and_weights_equal_the_built_ones_and_follow_the_batch():
    from projects.twhin.models.models import cached_labels_and_weights, labels_and_weights

    cache: dict = {}
    logits = torch.randn(4 + 24)
    ones = torch.ones(4)
    first = cached_labels_and_weights(logits, ones, ones, cache)
    for got, expected in zip(first, labels_and_weights(logits, ones, ones)):
        assert torch.equal(got, expected)
    again = cached_labels_and_weights(torch.randn(4 + 24), ones, ones, cache)
    assert again[0] is first[0] and again[1] is first[1]           # built once per shape
    # Weighted edges are not cached: their weights are the batch's.
    weights = torch.tensor([0.5, 1.0, 2.0, 1.0])
    weighted = cached_labels_and_weights(logits, ones, weights, cache)
    assert torch.equal(weighted[1][:4], weights)
    assert torch.equal(weighted[1], labels_and_weights(logits, ones, weights)[1])
    # Another batch shape rebuilds them.
    other = cached_labels_and_weights(torch.randn(6 + 30), torch.ones(6), torch.ones(6), cache)
    for got, expected in zip(other, labels_and_weights(torch.randn(36), torch.ones(6),
                                                       torch.ones(6))):
        assert torch.equal(got, expected)
