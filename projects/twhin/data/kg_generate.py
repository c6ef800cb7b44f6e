"""Knowledge graphs with known structure, to choose and check `twhin import`'s defaults.

Why: defaults chosen on three small public graphs failed on graphs of other shapes (issue
20). These generators make graphs of a chosen shape and size, deterministically from a seed,
written as the train / valid / test triples files `twhin import` reads, so a rule can be
chosen on some seeds and checked on others and on the other shape.

Shapes (`SHAPES`):

- `patterns`: one table of entities (`e<i>`, no type: the case where a translation with a
  shared table scores the query entity itself highest), each in one of `clusters` latent
  clusters, entity popularity Zipf within its cluster. Relations, each with a known
  pattern (its name says which): `sym*` symmetric (a cluster involution; both directions
  are edges), `anti*` antisymmetric (cluster c to c + s), `inv*_a` / `inv*_b` inverse pairs
  (b holds the reversed edges of a), `comp*_1`, `comp*_2`, `comp*_12` composition (12
  holds (a, c) for 1-edge (a, b) and 2-edge (b, c)), `parent_of` / `grandparent_of` a
  hierarchy (a random tree, parents drawn by popularity, so degrees are long-tailed).
  Relation sizes are skewed (a few relations hold most edges), as in real graphs.
- `longtail`: users and items (`user:u<i>`, `item:i<j>`: two tables), relations
  click / like / share / buy (60 / 20 / 12 / 8 %), Zipf activity on both sides; users and
  items in communities; an edge stays in the user's community (buy: the next community)
  with probability 0.8, otherwise goes to an item drawn by global popularity.

Splits: duplicates removed, shuffled, `split` fractions; a validation or test edge whose
entity or relation does not occur in the train split is moved to train (evaluation would
only skip it).

    python -m projects.twhin.data.kg_generate --shape patterns --entities 3000 \
        --edges 40000 --seed 1 --out /tmp/kg/patterns1

writes OUT/train.tsv, valid.tsv, test.tsv (head, relation, tail per line) and meta.json.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

SHAPES = ("patterns", "longtail")
FILES = {"train": "train.tsv", "validation": "valid.tsv", "test": "test.tsv"}
ZIPF = 1.0
Triple = tuple[str, str, str]


def _zipf_weights(n: int, rng: np.random.Generator, exponent: float = ZIPF) -> np.ndarray:
    """Probabilities proportional to rank^-exponent, ranks shuffled over the n items."""
    w = 1.0 / np.arange(1, n + 1) ** exponent
    rng.shuffle(w)
    return w / w.sum()


class _Clustered:
    """Entities in clusters; draws an entity of a cluster by its popularity."""

    def __init__(self, n: int, clusters: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.cluster = rng.integers(0, clusters, n)
        self.weight = _zipf_weights(n, rng)
        self.members = [np.nonzero(self.cluster == c)[0] for c in range(clusters)]
        self.member_p = [self.weight[m] / self.weight[m].sum() if len(m) else m
                         for m in self.members]

    def draw(self, clusters: np.ndarray) -> np.ndarray:
        out = np.empty(len(clusters), np.int64)
        for c in np.unique(clusters):
            where = np.nonzero(clusters == c)[0]
            m = self.members[c]
            out[where] = (self.rng.choice(m, len(where), p=self.member_p[c]) if len(m)
                          else self.rng.choice(len(self.weight), len(where), p=self.weight))
        return out

    def heads(self, count: int) -> np.ndarray:
        return self.rng.choice(len(self.weight), count, p=self.weight)


def _relation_sizes(names: list[str], edges: int, rng: np.random.Generator) -> dict[str, int]:
    """Skewed sizes: a few relations hold most edges (weights 1/rank, shuffled)."""
    w = _zipf_weights(len(names), rng)
    return {name: max(10, int(edges * p)) for name, p in zip(names, w)}


def patterns_graph(entities: int, edges: int, seed: int, clusters: int = 0) -> list[Triple]:
    """The `patterns` shape (module docstring); about `edges` triples before dedup."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(4, int(round(np.sqrt(entities) / 3)))
    world = _Clustered(entities, clusters, rng)
    names = ["sym0", "sym1", "anti0", "anti1", "anti2", "inv0_a", "inv0_b", "inv1_a", "inv1_b",
             "comp0_1", "comp0_2", "comp0_12", "comp1_1", "comp1_2", "comp1_12",
             "parent_of", "grandparent_of"]
    sizes = _relation_sizes(names, edges, rng)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def mapped(mapping: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        h = world.heads(count)
        return h, world.draw(mapping[world.cluster[h]])

    def involution() -> np.ndarray:
        order = rng.permutation(clusters)
        m = np.arange(clusters)
        for a, b in zip(order[0::2], order[1::2]):
            m[a], m[b] = b, a
        return m

    for k in range(2):
        h, t = mapped(involution(), sizes[f"sym{k}"] // 2 + 1)
        out[f"sym{k}"] = (np.concatenate([h, t]), np.concatenate([t, h]))
    # shifts s with 2s != 0 (mod clusters): c -> c + s is then never its own inverse
    shifts = [s for s in range(1, clusters) if (2 * s) % clusters]
    for k in range(3):
        shift = shifts[k % len(shifts)]
        h, t = mapped((np.arange(clusters) + shift) % clusters, sizes[f"anti{k}"])
        keep = h != t
        out[f"anti{k}"] = (h[keep], t[keep])
    for k in range(2):
        h, t = mapped(rng.permutation(clusters), sizes[f"inv{k}_a"])
        out[f"inv{k}_a"], out[f"inv{k}_b"] = (h, t), (t, h)
    for k in range(2):
        f1, f2 = rng.permutation(clusters), rng.permutation(clusters)
        a, b = mapped(f1, sizes[f"comp{k}_1"])
        b2 = world.draw(rng.integers(0, clusters, sizes[f"comp{k}_2"]))
        c2 = world.draw(f2[world.cluster[b2]])
        # 2-edges from the tails of 1-edges too, so that compositions exist
        extra = world.draw(f2[world.cluster[b]])
        out[f"comp{k}_1"] = (a, b)
        out[f"comp{k}_2"] = (np.concatenate([b2, b]), np.concatenate([c2, extra]))
        take = min(len(a), sizes[f"comp{k}_12"])
        out[f"comp{k}_12"] = (a[:take], extra[:take])
    # hierarchy: a random tree in order of a permutation; parents drawn by popularity
    order = rng.permutation(entities)
    parent = np.full(entities, -1)
    for i in range(1, entities):
        window = order[max(0, i - 1 - entities // 4):i]   # a parent among earlier entities
        p = world.weight[window] / world.weight[window].sum()
        parent[order[i]] = rng.choice(window, p=p)
    child = np.nonzero(parent >= 0)[0]
    take = rng.permutation(child)[:sizes["parent_of"]]
    out["parent_of"] = (parent[take], take)
    grand = child[parent[parent[child]] >= 0] if len(child) else child
    grand = grand[parent[grand] >= 0]
    grand = grand[parent[parent[grand]] >= 0]
    take = rng.permutation(grand)[:sizes["grandparent_of"]]
    out["grandparent_of"] = (parent[parent[take]], take)
    return [(f"e{h}", name, f"e{t}") for name, (hs, ts) in out.items()
            for h, t in zip(hs.tolist(), ts.tolist())]


LONGTAIL_RELATIONS = {"click": 0.6, "like": 0.2, "share": 0.12, "buy": 0.08}


def longtail_graph(entities: int, edges: int, seed: int, clusters: int = 0) -> list[Triple]:
    """The `longtail` shape (module docstring): entities / 2 users and items each."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(4, int(round(np.sqrt(entities) / 4)))
    users, items = max(2, entities // 2), max(2, entities - entities // 2)
    user_world = _Clustered(users, clusters, rng)
    item_world = _Clustered(items, clusters, rng)
    triples: list[Triple] = []
    for name, share in LONGTAIL_RELATIONS.items():
        count = max(10, int(edges * share))
        u = user_world.heads(count)
        target = (user_world.cluster[u] + (1 if name == "buy" else 0)) % clusters
        i = item_world.draw(target)
        stray = rng.random(count) > 0.8
        i[stray] = rng.choice(items, int(stray.sum()), p=item_world.weight)
        triples += [(f"user:u{a}", name, f"item:i{b}") for a, b in zip(u.tolist(), i.tolist())]
    return triples


def split(triples: list[Triple], seed: int, fractions: tuple[float, float] = (0.1, 0.1)
          ) -> dict[str, list[Triple]]:
    """Dedup, shuffle, split; held-out edges with an entity or relation unseen in train
    move to train."""
    unique = sorted(set(triples))
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(unique))
    n_valid, n_test = (int(len(unique) * f) for f in fractions)
    parts = {"validation": [unique[i] for i in order[:n_valid]],
             "test": [unique[i] for i in order[n_valid:n_valid + n_test]],
             "train": [unique[i] for i in order[n_valid + n_test:]]}
    seen = {x for h, r, t in parts["train"] for x in (h, "\0" + r, t)}
    for name in ("validation", "test"):
        kept = []
        for h, r, t in parts[name]:
            (kept if {h, "\0" + r, t} <= seen else parts["train"]).append((h, r, t))
        parts[name] = kept
    return parts


def generate(out: str, shape: str = "patterns", entities: int = 2000, edges: int = 20000,
             seed: int = 0) -> dict[str, Any]:
    """Writes OUT/{train,valid,test}.tsv and meta.json; returns the meta data."""
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
    make = patterns_graph if shape == "patterns" else longtail_graph
    parts = split(make(entities, edges, seed), seed)
    os.makedirs(out, exist_ok=True)
    for name, rows in parts.items():
        with open(os.path.join(out, FILES[name]), "w") as handle:
            handle.writelines(f"{h}\t{r}\t{t}\n" for h, r, t in rows)
    meta = {"shape": shape, "entities": entities, "edges": edges, "seed": seed,
            "triples": {k: len(v) for k, v in parts.items()},
            "entities_used": len({x for rows in parts.values() for h, _, t in rows
                                  for x in (h, t)}),
            "relations": len({r for rows in parts.values() for _, r, _ in rows})}
    with open(os.path.join(out, "meta.json"), "w") as handle:
        json.dump(meta, handle, indent=1)
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="patterns")
    p.add_argument("--entities", type=int, default=2000)
    p.add_argument("--edges", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    meta = generate(args.out, args.shape, args.entities, args.edges, args.seed)
    print(json.dumps(meta))
    return meta


if __name__ == "__main__":
    main()
