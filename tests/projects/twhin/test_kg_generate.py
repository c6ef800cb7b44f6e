"""Generated graphs have the structure their docstring promises, and are reproducible."""

import json

from projects.twhin.data.kg_generate import generate, longtail_graph, patterns_graph, split


def _by_relation(triples):
    out = {}
    for h, r, t in triples:
        out.setdefault(r, set()).add((h, t))
    return out


def test_patterns_hold():
    rel = _by_relation(patterns_graph(300, 4000, seed=3))
    assert len(rel) == 17
    for k in range(2):
        assert all((t, h) in rel[f"sym{k}"] for h, t in rel[f"sym{k}"])          # symmetric
        assert rel[f"inv{k}_b"] == {(t, h) for h, t in rel[f"inv{k}_a"]}         # inverse
        one, two = rel[f"comp{k}_1"], rel[f"comp{k}_2"]
        tails = {}
        for b, c in two:
            tails.setdefault(b, set()).add(c)
        assert all(any(c in tails.get(b, ()) for a2, b in one if a2 == a)         # composition
                   for a, c in rel[f"comp{k}_12"])
    for k in range(3):
        edges = rel[f"anti{k}"]
        assert sum((t, h) in edges for h, t in edges) < 0.2 * len(edges)          # mostly anti
    parents = {t: h for h, t in rel["parent_of"]}
    assert all(len({h for h, t in rel["parent_of"] if t == c}) == 1 for c in parents)   # tree


def test_longtail_is_long_tailed_and_typed():
    triples = longtail_graph(2000, 20000, seed=0)
    assert {r for _, r, _ in triples} == {"click", "like", "share", "buy"}
    assert all(h.startswith("user:") and t.startswith("item:") for h, _, t in triples)
    degree = {}
    for _, _, t in triples:
        degree[t] = degree.get(t, 0) + 1
    counts = sorted(degree.values(), reverse=True)
    assert sum(counts[:len(counts) // 10]) > 0.4 * sum(counts)   # top 10 % hold > 40 %


def test_split_keeps_held_out_entities_seen_in_training():
    parts = split(patterns_graph(200, 2000, seed=1), seed=1)
    seen = {x for h, r, t in parts["train"] for x in (h, r, t)}
    for name in ("validation", "test"):
        assert parts[name] and all({h, r, t} <= seen for h, r, t in parts[name])
    everything = [x for rows in parts.values() for x in rows]
    assert len(everything) == len(set(everything))


def test_same_seed_same_files(tmp_path):
    a = generate(str(tmp_path / "a"), "longtail", 500, 3000, seed=7)
    b = generate(str(tmp_path / "b"), "longtail", 500, 3000, seed=7)
    assert a == b == json.loads((tmp_path / "a" / "meta.json").read_text())
    for name in ("train.tsv", "valid.tsv", "test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = generate(str(tmp_path / "c"), "longtail", 500, 3000, seed=8)
    assert (tmp_path / "c" / "train.tsv").read_bytes() != (tmp_path / "a" / "train.tsv").read_bytes()
    assert c["triples"]["train"] > 0
