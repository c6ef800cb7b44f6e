"""`twhin neighbors` at scale: the export's approximate index, batch queries from a file,
leaving out known edges, the operator applied without torch, and index files refused
unless they are exactly this export's (shapes, dtypes, values, digest), read without
pickle and without any library's binary parser.

One imported graph of a few thousand users and a DCP checkpoint written in this process
(random vectors) serve every test; no workers are started.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.cli import dispatch
from projects.twhin.config import TwhinConfig
from projects.twhin.export import RELATIONS_KEY, TABLE_KEY, export_embeddings
from projects.twhin.importer import import_triples
from projects.twhin.models.models import operator_code
from projects.twhin.models.models import relation_query as torch_query
from projects.twhin.neighbor_index import (
    Index,
    IndexBuilder,
    build,
    index_files,
    ivf_search,
    list_count,
    read_array,
)
from projects.twhin.neighbors import Embeddings, KnownEdges, NeighborsError, exact_top_k
from projects.twhin.operators_np import OPERATORS, relation_query
from tests.twhin_setup import REPO
from tml.core.config import load_config_from_yaml
from tml.errors import TmlError

USERS, ITEMS, DIM = 3000, 400, 16
# Measured on this graph (clustered random vectors, the IVF index of 76 lists for the 3000
# users, nprobe 16, 300 users queried): recall@10 against exact search 1.0 without a
# relation, 0.9997 for "follows", 1.0 for "buys".
# The bound is far above what an index whose lists do not follow the vectors finds
# (about nprobe / lists = 0.21 of the exact top 10; test_a_random_index_misses_the_bound)
# and leaves room for k-means differing across BLAS builds.
MIN_RECALL = 0.95


def _triples(path):
    rng = np.random.default_rng(0)
    lines = ["head\trelation\ttail"]
    for u in range(USERS):
        lines.append(f"user:u{u}\tfollows\tuser:u{(u + 1 + int(rng.integers(50))) % USERS}")
        lines.append(f"user:u{u}\tbuys\titem:i{int(rng.integers(ITEMS))}")
        lines.append(f"user:u{u}\tbuys\titem:i{int(rng.integers(ITEMS))}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _checkpoint(config: TwhinConfig, path):
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    state = {}
    for t in config.model.embeddings.tables:   # clustered, like trained embeddings
        centers = torch.randn(max(1, t.num_embeddings // 50), DIM, generator=g)
        which = torch.randint(len(centers), (t.num_embeddings,), generator=g)
        state[TABLE_KEY.format(t.name)] = centers[which] + 0.3 * torch.randn(
            t.num_embeddings, DIM, generator=g)
    state[RELATIONS_KEY] = torch.randn(len(config.model.relations), DIM, generator=g)
    dcp.save(state, checkpoint_id=str(path / "5"), no_dist=True)
    return state


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("neighbors")
    data = root / "data"
    import_triples(_triples(root / "edges.tsv"), str(data), split="0.8,0.1,0.1", dim=DIM)
    config = load_config_from_yaml(TwhinConfig, str(data / "config.yaml"))
    state = _checkpoint(config, root / "save")
    export_embeddings(config, str(data / "config.yaml"), str(root / "save"),
                      str(root / "emb"), index=True)
    return {"root": root, "data": data, "emb": root / "emb", "config": config,
            "state": state}


def test_numpy_operators_equal_the_models_for_every_operator_and_side():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    for name in OPERATORS:
        for side in ("tail", "head"):
            q, b = torch_query(x, r, operator_code(name), side)
            q_np, b_np = relation_query(x.numpy(), r.numpy(), name, side)
            np.testing.assert_allclose(q_np, q.numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(b_np, b.numpy(), rtol=1e-6, atol=1e-6)


def test_export_writes_an_index_per_table_named_in_the_metadata(graph):
    metadata = json.loads((graph["emb"] / "metadata.json").read_text())
    assert sorted(metadata["indexes"]) == sorted(metadata["tables"])
    for table, entry in metadata["indexes"].items():
        assert entry["rows"] == metadata["tables"][table] and entry["dim"] == DIM
        assert entry["files"] == index_files(table)
        assert all((graph["emb"] / name).is_file() for name in entry["files"].values())
        assert entry["lists"] == list_count(entry["rows"]) > 1
    # --force replaces an export with indexes (it is an export), with or without one
    export_embeddings(graph["config"], str(graph["data"] / "config.yaml"),
                      str(graph["root"] / "save"), str(graph["root"] / "emb2"), index=True)
    export_embeddings(graph["config"], str(graph["data"] / "config.yaml"),
                      str(graph["root"] / "save"), str(graph["root"] / "emb2"), force=True)
    assert not [n for n in os.listdir(graph["root"] / "emb2") if n.endswith(".npy")]
    assert "indexes" not in json.loads((graph["root"] / "emb2" / "metadata.json").read_text())


@pytest.mark.parametrize("relation", [None, "follows", "buys"])
def test_index_recall_against_exact_search(graph, relation):
    embeddings = Embeddings.load(str(graph["emb"]))
    users = [f"user:u{u}" for u in range(0, USERS, 10)]
    approximate = embeddings.neighbors_batch(users, relation, k=10).to_pydict()
    exact = embeddings.neighbors_batch(users, relation, k=10, exact=True).to_pydict()
    assert len(approximate["id"]) == len(exact["id"]) == 10 * len(users)
    found = {(q, i) for q, i in zip(approximate["query"], approximate["id"])}
    truth = {(q, i): s for q, i, s in zip(exact["query"], exact["id"], exact["score"])}
    recall = len(found & set(truth)) / len(truth)
    assert recall >= MIN_RECALL, recall
    # Scores are exact whichever way a candidate was found.
    for q, i, s in zip(approximate["query"], approximate["id"], approximate["score"]):
        if (q, i) in truth:
            assert s == pytest.approx(truth[(q, i)], rel=1e-5, abs=1e-5)
    # The exact answer is the model's own score, ranked.
    state, config = graph["state"], graph["config"]
    if relation is not None:
        names = [r.name for r in config.model.relations]
        spec = config.model.relations[names.index(relation)]
        ids = pq.read_table(graph["emb"] / f"{spec.lhs}.parquet").column("id").to_pylist()
        row = ids.index(users[3])
        x = state[TABLE_KEY.format(spec.lhs)][row:row + 1]
        assert config.model.entity_bias   # a sparse graph: `twhin import` gave it one
        q, b = torch_query(x, state[RELATIONS_KEY][names.index(relation)][None],
                           operator_code(spec.operator.value), "tail",
                           config.model.entity_bias)
        scores = state[TABLE_KEY.format(spec.rhs)] @ q[0] + b[0]
        best = torch.argsort(scores, descending=True)[:10]
        targets = pq.read_table(graph["emb"] / f"{spec.rhs}.parquet").column("id").to_pylist()
        assert exact["id"][30:40] == [targets[i] for i in best.tolist()]
        np.testing.assert_allclose(exact["score"][30:40], scores[best].numpy(), rtol=1e-5)
    else:
        assert all(q != i for q, i in zip(exact["query"], exact["id"]))   # itself left out


def test_batch_queries_from_a_file_to_parquet_and_tsv(graph, tmp_path, capsys):
    entities = tmp_path / "users.txt"
    entities.write_text("user:u1\n\nuser:u2\nuser:u7\n")
    out = tmp_path / "answers.parquet"
    dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entities", str(entities),
              "--relation", "buys", "--k", "4", "--out", str(out)])
    answers = pq.read_table(out).to_pydict()
    assert answers["query"] == ["user:u1"] * 4 + ["user:u2"] * 4 + ["user:u7"] * 4
    assert answers["rank"] == [1, 2, 3, 4] * 3
    single = dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", "user:u2",
                       "--relation", "buys", "--k", "4"])
    assert answers["id"][4:8] == [i for i, _ in single]
    # --nprobe: fewer lists scanned, still k answers with exact scores; every list: exact
    narrow = dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", "user:u2",
                       "--relation", "buys", "--k", "4", "--nprobe", "1"])
    assert len(narrow) == 4 and all(s <= single[0][1] + 1e-6 for _, s in narrow)
    wide = dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", "user:u2",
                     "--relation", "buys", "--k", "4", "--nprobe", "1000"])
    exact = dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", "user:u2",
                      "--relation", "buys", "--k", "4", "--exact"])
    assert [i for i, _ in wide] == [i for i, _ in exact]
    with pytest.raises(TmlError, match="--nprobe must be >= 1"):
        dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", "user:u2",
                  "--nprobe", "0"])
    tsv = tmp_path / "answers.tsv"
    dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entities", str(entities),
              "--relation", "buys", "--k", "4", "--out", str(tsv)])
    lines = tsv.read_text().splitlines()
    assert lines[0] == "query\trank\tid\tscore" and len(lines) == 13
    assert lines[5].split("\t")[:3] == ["user:u2", "1", answers["id"][4]]
    capsys.readouterr()
    dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entities", str(entities),
              "--k", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3 * 2
    for text, message in (("user:u1\nuser:nobody\n", "entity 'user:nobody' is in none"),
                          ("\n\n", "holds no entities"),
                          ("user:u1\nitem:i3\n", "different tables")):
        entities.write_text(text)
        with pytest.raises(TmlError, match=message):
            dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entities",
                      str(entities)])
    entities.write_bytes(b"user:u1\n\xff\xfe\n")
    with pytest.raises(TmlError, match="not UTF-8"):
        dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entities", str(entities)])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_known_training_edges_are_left_out(graph, tmp_path):
    embeddings = Embeddings.load(str(graph["emb"]))
    known = KnownEdges(str(graph["data"]), embeddings)
    train = pq.read_table(graph["data"] / "train").to_pydict()
    relations = pq.read_table(graph["data"] / "vocab" / "relations.parquet").to_pydict()
    follows = relations["index"][relations["name"].index("follows")]
    users = pq.read_table(graph["emb"] / "user.parquet").column("id").to_pylist()
    by_head: dict[str, set] = {}
    for h, r, t in zip(train["lhs"], train["rel"], train["rhs"]):
        if r == follows:
            by_head.setdefault(users[h], set()).add(users[t])
    # users whose training edge is among their plain top 20: filtering must change the answer
    queried = list(by_head)[:300]
    plain = embeddings.neighbors_batch(queried, "follows", k=20, exact=True).to_pydict()
    filtered = embeddings.neighbors_batch(queried, "follows", k=10, known=known).to_pydict()
    exact_filtered = embeddings.neighbors_batch(queried, "follows", k=10, known=known,
                                                exact=True).to_pydict()
    overlap = set(zip(filtered["query"], filtered["id"])) & set(
        zip(exact_filtered["query"], exact_filtered["id"]))
    assert len(overlap) >= MIN_RECALL * len(exact_filtered["id"])
    assert len(filtered["id"]) == 10 * len(queried)
    assert not any(i in by_head[q] for q, i in zip(filtered["query"], filtered["id"]))
    removed = [(q, i) for q, i in zip(plain["query"], plain["id"]) if i in by_head[q]]
    assert removed, "the check needs a known edge among the plain answers"
    # what remains is the plain ranking without the known tails
    for q in queried[:50]:
        expect = [i for qq, i in zip(plain["query"], plain["id"])
                  if qq == q and i not in by_head[q]][:10]
        got = [i for qq, i in zip(exact_filtered["query"], exact_filtered["id"]) if qq == q]
        assert got[:len(expect)] == expect
    out = dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", queried[0],
                    "--relation", "follows", "--exclude-known", str(graph["data"])])
    assert not {i for i, _ in out} & by_head[queried[0]]
    with pytest.raises(TmlError, match="known edges are per relation"):
        dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", queried[0],
                  "--exclude-known", str(graph["data"])])
    with pytest.raises(TmlError, match="not a `twhin import` output"):
        dispatch(["neighbors", "--embeddings", str(graph["emb"]), "--entity", queried[0],
                  "--relation", "follows", "--exclude-known", str(tmp_path)])
    # an import of another graph (other table sizes) is refused, in one line
    other = tmp_path / "other"
    (tmp_path / "o.tsv").write_text("user:a\tfollows\tuser:b\nuser:b\tfollows\tuser:c\n")
    import_triples(str(tmp_path / "o.tsv"), str(other), split="1,0,0")
    with pytest.raises(NeighborsError, match="not the import this export was trained on"):
        embeddings.neighbors(queried[0], "follows", known=KnownEdges(str(other), embeddings))


def test_neighbors_imports_no_torch(graph, tmp_path):
    entities = tmp_path / "e.txt"
    entities.write_text("user:u1\nuser:u5\n")
    code = (
        "import sys\n"
        "sys.modules['faiss'] = None   # numpy alone, even where faiss is installed\n"
        "from projects.twhin.cli import dispatch\n"
        f"dispatch(['neighbors', '--embeddings', {str(graph['emb'])!r}, '--entity', 'user:u1',"
        " '--relation', 'buys'])\n"
        f"dispatch(['neighbors', '--embeddings', {str(graph['emb'])!r}, '--entities', "
        f"{str(entities)!r}, '--exclude-known', {str(graph['data'])!r}, '--relation', "
        "'follows'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchrec', "
        "'fbgemm_gpu'))\n"
        "assert not loaded, loaded[:5]\n"
        "assert 'hnswlib' not in sys.modules\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _clustered(rows, dim, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, rows // 50), dim)).astype(np.float32)
    return (centers[rng.integers(len(centers), size=rows)]
            + 0.3 * rng.standard_normal((rows, dim)).astype(np.float32))


def _recall(found, exact):
    return np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)])


def test_ivf_round_trip_and_recall_on_a_clustered_set(tmp_path):
    vectors = _clustered(5000, DIM)
    builder = IndexBuilder(len(vectors), DIM)
    for start in range(0, len(vectors), 1300):           # as the export streams the rows
        builder.add(vectors[start:start + 1300])
    entry = builder.save(str(tmp_path), "t")
    assert entry["lists"] == list_count(5000) and sorted(os.listdir(tmp_path)) == sorted(
        index_files("t").values())
    index = Index(str(tmp_path), "t", entry, vectors)
    again = build(vectors)                               # same seed, same arrays
    for saved, built in zip((index.centroids, index.rows, index.offsets), again):
        np.testing.assert_array_equal(saved, built)
    # every row once, in the list of its best centroid (by inner product)
    assert np.array_equal(np.sort(index.rows), np.arange(5000))
    lists = np.repeat(np.arange(len(index.centroids)), np.diff(index.offsets))
    best = np.argmax(vectors[index.rows] @ index.centroids.T, axis=1)
    assert np.mean(best == lists) > 0.999                # ties may fall either way
    queries = vectors[::25] + 0.05
    exact = exact_top_k(vectors, queries, 10)
    found = index.search(queries, 10)
    assert found.shape == (200, 10) and (found >= 0).all()
    assert _recall(found, exact) >= MIN_RECALL
    # every list probed: the exact answer, in the same order
    everything = ivf_search(vectors, index.centroids, index.rows, index.offsets, queries, 10,
                            len(index.centroids))
    np.testing.assert_array_equal(everything, exact)


def test_faiss_scans_the_same_lists_as_numpy(tmp_path):
    """Where faiss is installed it scans the checked arrays' lists: the same answers."""
    pytest.importorskip("faiss")
    vectors = _clustered(5000, DIM)
    builder = IndexBuilder(len(vectors), DIM)
    builder.add(vectors)
    entry = builder.save(str(tmp_path), "t")
    queries = vectors[::25] + 0.05
    for nprobe in (1, 4, 16):
        with_numpy = Index(str(tmp_path), "t", entry, vectors, nprobe, use_faiss=False)
        with_faiss = Index(str(tmp_path), "t", entry, vectors, nprobe, use_faiss=True)
        assert with_faiss.faiss is not None and with_numpy.faiss is None
        for k in (10, 400):       # 400: more than some probed lists hold (-1 padding)
            a, b = with_numpy.search(queries, k), with_faiss.search(queries, k)
            assert a.shape == b.shape == (len(queries), k)
            assert [set(x) for x in a] == [set(x) for x in b]


def test_a_random_index_misses_the_bound():
    """The recall bound tells a working index from one whose lists ignore the vectors."""
    vectors = _clustered(5000, DIM)
    centroids, rows, offsets = build(vectors, use_faiss=False)
    shuffled = np.random.default_rng(1).permutation(len(vectors))
    queries = vectors[::25] + 0.05
    exact = exact_top_k(vectors, queries, 10)
    found = ivf_search(vectors, centroids, shuffled, offsets, queries, 10, 16)
    assert _recall(found, exact) < 0.5 * MIN_RECALL


def _copy_export(graph, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(graph["emb"], emb)
    return emb


def _one_line_refusal(emb, match):
    with pytest.raises(TmlError, match=match) as error:
        dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1"])
    assert "\n" not in str(error.value)
    return str(error.value)


def test_index_of_another_export_or_damaged_is_refused(graph, tmp_path):
    emb = _copy_export(graph, tmp_path)
    files = index_files("user")
    # an index of other vectors, same shape (a re-export after more training)
    vectors = Embeddings.load(str(emb)).vectors("user")
    other = tmp_path / "other"
    other.mkdir()
    builder = IndexBuilder(len(vectors), DIM)
    builder.add(vectors[::-1] * 2)
    builder.save(str(other), "user")
    for name in files.values():
        shutil.copy(other / name, emb / name)
    _one_line_refusal(emb, r"user\.ivf-rows\.npy: .*digest in metadata.json")
    # another table's index under this table's names
    for part, name in index_files("item").items():
        shutil.copy(graph["emb"] / name, emb / files[part])
    _one_line_refusal(emb, r"user\.ivf-centroids\.npy: .*shape 10x16, expected 76x16")
    # metadata that disagrees with the table
    for name in files.values():
        shutil.copy(graph["emb"] / name, emb / name)
    metadata = json.loads((emb / "metadata.json").read_text())
    metadata["tables"]["user"] = USERS + 1
    (emb / "metadata.json").write_text(json.dumps(metadata))
    _one_line_refusal(emb, "3000 rows of dim 16, metadata.json says 3001")
    # an earlier tml's hnswlib index: one line saying what to do
    metadata["tables"]["user"] = USERS
    metadata["indexes"]["user"] = {"file": "user.hnsw", "library": "hnswlib", "rows": USERS}
    (emb / "metadata.json").write_text(json.dumps(metadata))
    _one_line_refusal(emb, "is hnswlib .*rebuild the export with `twhin export --index`, or "
                           "pass --exact")
    assert dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1", "--exact"])
    with pytest.raises(TmlError, match="use --nprobe"):
        dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1", "--ef", "64"])


def _npy_bytes(array, allow_pickle=False):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_hostile_index_files_are_refused_as_data(graph, tmp_path):
    emb = _copy_export(graph, tmp_path)
    files = {part: emb / name for part, name in index_files("user").items()}
    arrays = {part: np.load(path, allow_pickle=False) for part, path in files.items()}
    originals = {part: path.read_bytes() for part, path in files.items()}
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def attempt(part, data, match):
        files[part].write_bytes(data)
        message = _one_line_refusal(emb, match)
        assert message.startswith(str(files[part]) + ": "), message   # names the file
        files[part].write_bytes(originals[part])

    centroids, rows, offsets = arrays["centroids"], arrays["rows"], arrays["offsets"]
    attempt("centroids", _npy_bytes(centroids.astype(np.float64)), "dtype <f8, expected <f4")
    attempt("centroids", _npy_bytes(np.asfortranarray(centroids)), "Fortran order")
    bad = centroids.copy()
    bad[3, 2] = np.nan
    attempt("centroids", _npy_bytes(bad), "a centroid is not finite")
    attempt("centroids", originals["centroids"][:-7], "truncated or padded")
    attempt("centroids", originals["centroids"] + b"\0" * 64, "truncated or padded")
    attempt("centroids", b"", "not a .npy file")
    attempt("offsets", _npy_bytes(np.concatenate([offsets[:-1], [USERS + 5]])),
            "offsets must rise from 0 to the 3000 rows")
    falling = offsets.copy()
    falling[5] = falling[6] + 1
    attempt("offsets", _npy_bytes(falling), "offsets must rise")
    attempt("offsets", _npy_bytes(offsets.astype(np.int32)), "dtype <i4, expected <i8")
    twice = rows.copy()
    twice[1] = twice[0]
    attempt("rows", _npy_bytes(twice), "not every row exactly once")
    beyond = rows.copy()
    beyond[4] = 1 << 40
    attempt("rows", _npy_bytes(beyond), "a row outside 0..2999")
    attempt("rows", _npy_bytes(rows[:-1]), "shape 2999, expected 3000")
    attempt("rows", _npy_bytes(rows.byteswap().view(rows.dtype.newbyteorder())),
            "dtype >i8, expected <i8")
    # pickles, which would run code if unpickled: refused as data, nothing executed
    objects = np.empty(USERS, dtype=object)
    objects[0] = Payload()
    attempt("rows", _npy_bytes(objects, allow_pickle=True), "dtype |O, expected <i8")
    attempt("rows", pickle.dumps(Payload()), "not a .npy file")
    attempt("rows", b"\x93NUMPY\x01\x00\xff\xff" + b" " * 100, "not a .npy file")
    assert not marker.exists()
    for path in files.values():           # every part intact again: the index answers
        assert read_array(str(path), *{"centroids": ("<f4", (None, DIM)),
                                       "rows": ("<i8", (USERS,)),
                                       "offsets": ("<i8", (None,))}[path.name.split("-")[-1][:-4]]).size
    assert dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1"])
    # a missing file: one line naming it
    files["offsets"].unlink()
    _one_line_refusal(emb, r"user\.ivf-offsets\.npy: cannot read")
