"""Filtered link-prediction metrics against a brute-force computation on a tiny graph."""

import itertools

import numpy as np
import pytest
import torch

from projects.twhin.link_prediction import (
    KnownEdges,
    auc,
    rank_sums,
    summarize,
)
from projects.twhin.models.config import Relation

D = 4
SIZES = {"user": 7, "item": 5}
RELATIONS = [Relation(name="buys", lhs="user", rhs="item", operator="translation"),
             Relation(name="follows", lhs="user", rhs="user", operator="diagonal"),
             Relation(name="made_by", lhs="item", rhs="user", operator="complex_diagonal")]


def _naive_score(operator, h, r, t):
    """Plain Python, from the textbook formulas (exact on small integers)."""
    if operator == "translation":
        return sum(a * (c + b) for a, b, c in zip(h, r, t))
    if operator == "diagonal":
        return sum(a * b * c for a, b, c in zip(h, r, t))
    half = len(h) // 2
    total = 0.0
    for k in range(half):
        hc, rc, tc = complex(h[k], h[half + k]), complex(r[k], r[half + k]), \
            complex(t[k], t[half + k])
        total += (hc * rc * tc.conjugate()).real
    return total


def _brute_force(tables, relation_vectors, test, known):
    known_set = set(zip(*[c.tolist() for c in known]))
    sums = np.zeros((len(RELATIONS), 2, 6))
    for h, r, t in zip(*[c.tolist() for c in test]):
        rel = RELATIONS[r]
        rv = relation_vectors[r].tolist()
        for side_index, side in enumerate(("head", "tail")):
            table = rel.lhs if side == "head" else rel.rhs
            def s(x, h=h, t=t, side=side, rel=rel, rv=rv):  # noqa: ANN001, ANN202
                hh, tt = (x, t) if side == "head" else (h, x)
                return _naive_score(rel.operator.value, tables[rel.lhs][hh].tolist(), rv,
                                    tables[rel.rhs][tt].tolist())
            truth = h if side == "head" else t
            true_score = s(truth)
            greater = equal = 0
            for c in range(SIZES[table]):
                edge = (c, r, t) if side == "head" else (h, r, c)
                if c == truth or edge in known_set:
                    continue
                value = s(c)
                greater += value > true_score
                equal += value == true_score
            rank = 1 + greater + equal / 2
            sums[r, side_index] += [1, 1 / rank, rank, rank <= 1, rank <= 3, rank <= 10]
    return sums


def _graph(seed):
    rng = np.random.default_rng(seed)
    # Small integers: every score is exact in float32, and ties are frequent.
    tables = {name: torch.from_numpy(rng.integers(-1, 2, (rows, D)).astype(np.float32))
              for name, rows in SIZES.items()}
    relation_vectors = torch.from_numpy(rng.integers(-1, 2, (3, D)).astype(np.float32))
    edges = set()
    while len(edges) < 40:
        r = int(rng.integers(0, 3))
        rel = RELATIONS[r]
        edges.add((int(rng.integers(0, SIZES[rel.lhs])), r,
                   int(rng.integers(0, SIZES[rel.rhs]))))
    edges = np.array(sorted(edges), dtype=np.int64)
    rng.shuffle(edges)
    known = tuple(edges[:, i].copy() for i in range(3))
    test = tuple(edges[:15, i].copy() for i in range(3))
    return tables, relation_vectors, test, known


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_equal_brute_force_with_ties_and_filtering(seed):
    tables, relation_vectors, test, known = _graph(seed)
    expected = _brute_force(tables, relation_vectors, test, known)
    index = KnownEdges(known, max(SIZES.values()))
    # Chunks smaller than the tables and the query set: the chunk boundaries are exercised.
    got = rank_sums(tables, relation_vectors, RELATIONS, test, index, query_chunk=2,
                    candidate_chunk=3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert (expected[..., 2] != expected[..., 0]).any()   # some ranks above 1
    one_chunk = rank_sums(tables, relation_vectors, RELATIONS, test, index)
    np.testing.assert_allclose(one_chunk, expected, rtol=1e-12, atol=1e-12)


def test_ties_count_at_the_mean_and_other_true_edges_are_filtered():
    # Every user vector equal: the true head ties with all candidates.
    tables = {"user": torch.ones(7, D), "item": torch.ones(5, D)}
    relation_vectors = torch.zeros(3, D)
    test = (np.array([0]), np.array([0]), np.array([0]))
    known = (np.array([0, 1, 2]), np.array([0, 0, 0]), np.array([0, 0, 4]))
    sums = rank_sums(tables, relation_vectors, RELATIONS, test, KnownEdges(known, 7))
    # head side: 7 users, the true one and user 1 (also -> item 0) removed: 5 ties -> 3.5
    assert sums[0, 0, 2] == pytest.approx(1 + 5 / 2)
    # tail side: 5 items, truth removed, none other known for user 0: 4 ties -> 3.0
    assert sums[0, 1, 2] == pytest.approx(1 + 4 / 2)


def test_summary_keys_and_averages():
    sums = np.zeros((3, 2, 6))
    sums[0, 0] = [2, 1.5, 3, 1, 2, 2]      # ranks 1 and 2
    sums[1, 1] = [1, 0.25, 4, 0, 0, 1]     # rank 4
    result = summarize(sums, RELATIONS)
    assert result["mrr"] == pytest.approx(1.75 / 3)
    assert result["mean_rank"] == pytest.approx(7 / 3)
    assert result["hits_at_1"] == pytest.approx(1 / 3)
    assert result["hits_at_10"] == pytest.approx(1.0)
    assert result["head"]["mrr"] == pytest.approx(0.75)
    assert result["per_relation"]["follows"]["tail"]["mean_rank"] == pytest.approx(4)
    assert result["per_relation"]["made_by"] == {"count": 0, "head": {"count": 0},
                                                 "tail": {"count": 0}}


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, 30).astype(float)
    neg = rng.integers(0, 5, 50).astype(float)
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert auc(pos, np.array([])) is None


def _thread_reduce(workers):
    """An all-reduce (sum, in place) among `workers` threads: the collective the sharded
    algorithm needs, without processes."""
    import threading

    barrier = threading.Barrier(workers)
    slots = [None] * workers

    def make(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = slots[0].clone()
            for other in slots[1:]:
                total += other
            barrier.wait()
            tensor.copy_(total)
        return reduce
    return [make(rank) for rank in range(workers)]


@pytest.mark.parametrize("workers", [2, 3, 6])
def test_sharded_tables_give_the_same_ranks_and_auc_as_whole_tables(workers):
    """Each worker holds a contiguous share of every table (with 6 workers one share of the
    5-row table is empty) and walks all edges; the sums and AUC scores are identical on
    every worker and equal to one worker's with whole tables (threads stand for workers)."""
    import threading

    from projects.twhin.link_prediction import TableShard, auc_scores, share

    tables, relation_vectors, test, known = _graph(3)
    index = KnownEdges(known, max(SIZES.values()))
    whole = rank_sums(tables, relation_vectors, RELATIONS, test, index, query_chunk=2,
                      candidate_chunk=2)
    whole_auc = auc_scores(tables, relation_vectors, RELATIONS, test, chunk=4)
    reduces = _thread_reduce(workers)
    results: list = [None] * workers

    def worker(rank):
        shards = {name: TableShard(table[slice(*share(SIZES[name], rank, workers))],
                                   share(SIZES[name], rank, workers)[0], SIZES[name])
                  for name, table in tables.items()}
        results[rank] = (rank_sums(shards, relation_vectors, RELATIONS, test, index,
                                   query_chunk=2, candidate_chunk=2, reduce=reduces[rank]),
                         auc_scores(shards, relation_vectors, RELATIONS, test, chunk=4,
                                    reduce=reduces[rank]))
    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert whole[..., 0].sum() == 2 * len(test[0])
    for sums, (positives, _) in results:
        np.testing.assert_array_equal(sums, whole)
        # The negatives' sampling uses torch's process-wide RNG, which threads share: they
        # are compared across real processes in tests/tml/common/test_checkpoint_rows.py.
        np.testing.assert_array_equal(positives, whole_auc[0])
