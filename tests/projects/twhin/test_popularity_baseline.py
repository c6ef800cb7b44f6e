"""The popularity baseline of `twhin evaluate` against a brute-force computation.

Score of a candidate = how often it is that side of that relation in the training edges;
filtered ranks over all known edges, ties at the mean: the protocol of the model's ranks.
"""

import numpy as np
import pytest
import torch

from projects.twhin.cli import _print_metrics
from projects.twhin.link_prediction import (
    KnownEdges,
    filtered_ranks,
    operator_code,
    popularity_counts,
    popularity_rank_sums,
    summarize,
)
from projects.twhin.models.config import Relation

SIZES = {"user": 6, "item": 5}
RELATIONS = [Relation(name="buys", lhs="user", rhs="item", operator="translation"),
             Relation(name="follows", lhs="user", rhs="user", operator="diagonal")]


def _graph(seed):
    rng = np.random.default_rng(seed)
    edges = set()
    while len(edges) < 30:
        r = int(rng.integers(2))
        h = int(rng.integers(SIZES["user"]))
        t = int(rng.integers(SIZES["item"] if r == 0 else SIZES["user"]))
        edges.add((h, r, t))
    edges = sorted(edges)
    rng.shuffle(edges)
    arrays = [np.array(c, dtype=np.int64) for c in zip(*edges)]
    train = tuple(a[:20] for a in arrays)
    test = tuple(a[20:] for a in arrays)
    return train, test, arrays


def _brute_force(train, test, known):
    known_set = set(zip(*[c.tolist() for c in known]))
    train_list = list(zip(*[c.tolist() for c in train]))
    sums = np.zeros((len(RELATIONS), 2, 6))
    for h, r, t in zip(*[c.tolist() for c in test]):
        rel = RELATIONS[r]
        for side_index, side in enumerate(("head", "tail")):
            table = rel.lhs if side == "head" else rel.rhs

            def count(x, side=side, r=r):  # noqa: ANN001, ANN202
                return sum(1 for e in train_list
                           if e[1] == r and (e[0] if side == "head" else e[2]) == x)
            truth = h if side == "head" else t
            greater = equal = 0
            for c in range(SIZES[table]):
                edge = (c, r, t) if side == "head" else (h, r, c)
                if c == truth or edge in known_set:
                    continue
                greater += count(c) > count(truth)
                equal += count(c) == count(truth)
            rank = 1 + greater + equal / 2
            sums[r, side_index] += [1, 1 / rank, rank, rank <= 1, rank <= 3, rank <= 10]
    return sums


@pytest.mark.parametrize("seed", range(5))
def test_popularity_ranks_equal_brute_force(seed):
    train, test, everything = _graph(seed)
    known = KnownEdges(tuple(everything), max(SIZES.values()))
    got = popularity_rank_sums(train, RELATIONS, SIZES, test, known, query_chunk=3,
                               candidate_chunk=2)
    np.testing.assert_allclose(got, _brute_force(train, test, everything))
    assert got[..., 0].sum() == 2 * len(test[0])


def test_evaluate_prints_the_baseline_and_warns_when_the_model_is_worse(capsys):
    train, test, everything = _graph(0)
    known = KnownEdges(tuple(everything), max(SIZES.values()))
    popular = summarize(popularity_rank_sums(train, RELATIONS, SIZES, test, known),
                        RELATIONS)
    result = {**popular, "split": "test", "num_edges": 10, "num_skipped_unseen": 0,
              "popularity": {k: v for k, v in popular.items() if k != "per_relation"},
              "auc": None}
    result["mrr"] = popular["mrr"] / 2
    _print_metrics(result)
    out = capsys.readouterr().out
    assert "popularity baseline" in out
    assert (f"warning: MRR {result['mrr']:.4f} is not above the popularity baseline's "
            f"{popular['mrr']:.4f}: these embeddings rank worse than counting") in out
    result["mrr"] = 1.0
    _print_metrics(result)
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(3))
def test_sorted_count_ranks_equal_scoring_every_candidate(seed):
    """On a larger graph with many tied counts and repeated known edges: the same sums as
    scoring every candidate with `filtered_ranks` (the model's ranking path)."""
    rng = np.random.default_rng(seed)
    sizes = {"user": 300, "item": 200}
    n = 4000
    rel = rng.integers(2, size=n)
    lhs = rng.zipf(1.5, size=n) % sizes["user"]
    rhs = np.where(rel == 0, rng.zipf(1.3, size=n) % sizes["item"],
                   rng.integers(sizes["user"], size=n))
    arrays = [a.astype(np.int64) for a in (lhs, rel, rhs)]
    train = tuple(a[:3000] for a in arrays)
    test = tuple(a[3000:] for a in arrays)
    known = KnownEdges(tuple(arrays), max(sizes.values()))   # duplicates kept on purpose
    got = popularity_rank_sums(train, RELATIONS, sizes, test, known, query_chunk=97)
    counts = popularity_counts(train, RELATIONS, sizes)
    want = np.zeros_like(got)
    for r in range(2):
        chosen = np.nonzero(test[1] == r)[0]
        for side_index, side in enumerate(("head", "tail")):
            anchors, truths = (test[0], test[2]) if side == "tail" else (test[2], test[0])
            a, t = anchors[chosen], truths[chosen]
            ranks = filtered_ranks(torch.ones(len(a), 1, dtype=torch.float64),
                                   torch.ones(1, dtype=torch.float64),
                                   operator_code("identity"), side, counts[r][side], t,
                                   *known.lookup(side, r, a), candidate_chunk=64)
            want[r, side_index] = [len(ranks), (1 / ranks).sum(), ranks.sum(),
                                   (ranks <= 1).sum(), (ranks <= 3).sum(),
                                   (ranks <= 10).sum()]
    np.testing.assert_allclose(got, want)
    assert got[..., 0].sum() == 2 * len(test[0])
