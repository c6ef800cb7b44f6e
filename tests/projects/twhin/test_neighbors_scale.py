"""`twhin neighbors` at scale: the export's approximate index, batch queries from a file,
leaving out known edges, the operator applied without torch, and index files refused
unless they are exactly this export's.

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
from projects.twhin.neighbor_index import IndexBuilder, check_index_file
from projects.twhin.neighbors import Embeddings, KnownEdges, NeighborsError
from projects.twhin.operators_np import OPERATORS, relation_query
from tests.twhin_setup import REPO
from tml.core.config import load_config_from_yaml
from tml.errors import TmlError

USERS, ITEMS, DIM = 3000, 400, 16
# Measured on this graph (clustered random vectors, hnswlib M=16, efC=100, ef=128, 300 users):
# recall@10 of the index against exact search 0.999 without a relation, 0.981 for
# "follows", 0.997 for "buys". The bound leaves room for hnswlib's randomness across
# platforms, not for a broken index (another space or a query without the operator ranks
# other rows).
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
        assert (graph["emb"] / entry["file"]).is_file()
    # --force replaces an export with indexes (it is an export), with or without one
    export_embeddings(graph["config"], str(graph["data"] / "config.yaml"),
                      str(graph["root"] / "save"), str(graph["root"] / "emb2"), index=True)
    export_embeddings(graph["config"], str(graph["data"] / "config.yaml"),
                      str(graph["root"] / "save"), str(graph["root"] / "emb2"), force=True)
    assert not [n for n in os.listdir(graph["root"] / "emb2") if n.endswith(".hnsw")]


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
        q, b = torch_query(x, state[RELATIONS_KEY][names.index(relation)][None],
                           operator_code(spec.operator.value), "tail")
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
        "from projects.twhin.cli import dispatch\n"
        f"dispatch(['neighbors', '--embeddings', {str(graph['emb'])!r}, '--entity', 'user:u1',"
        " '--relation', 'buys'])\n"
        f"dispatch(['neighbors', '--embeddings', {str(graph['emb'])!r}, '--entities', "
        f"{str(entities)!r}, '--exclude-known', {str(graph['data'])!r}, '--relation', "
        "'follows'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchrec', "
        "'fbgemm_gpu'))\n"
        "assert not loaded, loaded[:5]\n"
        "assert 'hnswlib' in sys.modules\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _copy_export(graph, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(graph["emb"], emb)
    return emb


def _one_line_refusal(emb, match):
    with pytest.raises(TmlError, match=match) as error:
        dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1"])
    assert "\n" not in str(error.value)


def test_index_of_another_export_or_damaged_is_refused(graph, tmp_path):
    emb = _copy_export(graph, tmp_path)
    index = emb / "user.hnsw"
    original = index.read_bytes()
    # an index of other vectors, same shape (a re-export after more training)
    vectors = Embeddings.load(str(emb)).vectors("user")
    builder = IndexBuilder(len(vectors), DIM)
    builder.add(vectors[::-1].copy())
    builder.save(str(index))
    _one_line_refusal(emb, "its vectors differ from the exported ones")
    # another table's index
    shutil.copy(emb / "item.hnsw", index)
    _one_line_refusal(emb, "header count is 400, expected 3000")
    # metadata that disagrees with the table
    index.write_bytes(original)
    metadata = json.loads((emb / "metadata.json").read_text())
    metadata["tables"]["user"] = USERS + 1
    (emb / "metadata.json").write_text(json.dumps(metadata))
    _one_line_refusal(emb, "3000 rows of dim 16, metadata.json says 3001")


def test_hostile_index_files_are_refused_before_hnswlib_reads_them(graph, tmp_path):
    emb = _copy_export(graph, tmp_path)
    index = emb / "user.hnsw"
    original = bytearray(index.read_bytes())
    rows, per_element = USERS, 4 + 4 * 32 + 4 * DIM + 8

    def attempt(data: bytes, match: str) -> None:
        index.write_bytes(bytes(data))
        with pytest.raises(TmlError, match=match) as error:
            check_index_file(str(index), rows, DIM)
        assert "\n" not in str(error.value)
        _one_line_refusal(emb, "not the index of this export")

    attempt(b"", "shorter than the header")
    attempt(original[:5000], "shorter than the 3000 rows")
    attempt(original + b"\0" * 8, "after the last link list")
    huge = bytearray(original)
    huge[8:16] = (1 << 60).to_bytes(8, "little")          # max_elements: unbounded malloc
    attempt(huge, "header max_elements")
    bad_link = bytearray(original)
    bad_link[96 + 3 * per_element + 4:96 + 3 * per_element + 8] = (0xFFFFFFF0).to_bytes(
        4, "little")                                       # a neighbour far beyond the rows
    bad_link[96 + 3 * per_element:96 + 3 * per_element + 2] = (1).to_bytes(2, "little")
    attempt(bad_link, "level-0 neighbour id beyond the rows")
    bad_label = bytearray(original)
    start = 96 + per_element - 8
    bad_label[start:start + 8] = (7).to_bytes(8, "little")
    attempt(bad_label, "labels are not the rows")
    # A pickle that would run code if unpickled: refused as data, nothing executed.
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    attempt(pickle.dumps(Payload()) + b"\0" * 200, "not the index of this export")
    assert not marker.exists()
    index.write_bytes(bytes(original))
    assert dispatch(["neighbors", "--embeddings", str(emb), "--entity", "user:u1"])
