"""TwHIN's relation operators in numpy, for the tools that read an export without torch.

`twhin neighbors` and `projects.twhin.neighbors.Embeddings` need the query of
(entity, relation, ?) exactly as the model scores it, but must run where only numpy and
pyarrow are installed. This is `projects.twhin.models.models.relation_query` for one
operator, written with numpy; tests/test_neighbors_scale.py checks the two agree for every
operator and side, so they cannot drift apart.
"""

from __future__ import annotations

import numpy as np

OPERATORS = ("translation", "identity", "diagonal", "complex_diagonal")


def relation_query(x: np.ndarray, r: np.ndarray, operator: str, side: str = "tail",
                   entity_bias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(q, b) with score(x, r, other) = dot(q, other) + b, for (N, D) `x` and (D,) or (N, D) `r`.

    `side="tail"`: x holds heads (lhs) and the candidates are tails; `"head"` the reverse.
    `entity_bias`: each vector's last coordinate is its entity's bias, the operator acts on
    the first D - 2 (the model's `entity_bias`); q ends in (0, 1), so dot(q, other) adds
    the other's bias, and b adds x's own.
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r} (known: {', '.join(OPERATORS)})")
    if side not in ("tail", "head"):
        raise ValueError(f"side must be 'tail' or 'head', got {side!r}")
    x = np.asarray(x, np.float32)
    r = np.broadcast_to(np.asarray(r, np.float32), x.shape)
    if entity_bias:
        core = x.shape[-1] - 2
        q, b = relation_query(x[..., :core], r[..., :core], operator, side)
        ends = np.zeros(x.shape[:-1] + (2,), np.float32)
        ends[..., 1] = 1.0
        return np.concatenate([q, ends], axis=-1), (b + x[..., -1]).astype(np.float32)
    zero = np.zeros(x.shape[:-1], np.float32)
    if operator == "identity":
        return x, zero
    if operator == "translation":
        # tail: dot(lhs, rhs + r) = dot(lhs, rhs) + dot(lhs, r); head: dot(rhs + r, lhs)
        return (x, (x * r).sum(-1)) if side == "tail" else (x + r, zero)
    if operator == "diagonal":
        return x * r, zero
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    re, im = r[..., :half], r[..., half:]
    if side == "tail":
        return np.concatenate([a * re - b * im, a * im + b * re], axis=-1), zero
    return np.concatenate([re * a + im * b, re * b - im * a], axis=-1), zero
