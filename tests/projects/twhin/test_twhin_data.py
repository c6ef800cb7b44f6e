"""EdgesDataset (shares, batches, resume, validation) and the built-in graph generator.

Real parquet files written to tmp_path; no mocks.
"""

import os
import threading

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.generate import DEFAULTS, ensure_default_graph, generate_graph, main
from projects.twhin.models.config import Relation
from tml.errors import ConfigError, DataError

# Two relations on different tables, so that an id's table depends on its relation.
RELATIONS = [Relation(name="fav", lhs="user", rhs="tweet"),
             Relation(name="follow", lhs="user", rhs="user")]
TABLES = {"user": 50, "tweet": 30}
FILE_SIZES = (7, 10, 8)   # 25 rows; boundaries at global rows 7 and 17
NUM_ROWS = sum(FILE_SIZES)


def _edges(num_rows=NUM_ROWS):
    """Distinct, valid edges: row i has lhs = i, so a row is recognisable by its lhs."""
    index = np.arange(num_rows, dtype=np.int64)
    rel = index % 2
    rhs = np.where(rel == 0, (index * 7) % 30, (index * 3 + 1) % 50)
    return {"lhs": index, "rel": rel, "rhs": rhs}


def _write(path, columns, row_group_size=3):
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def _write_files(directory, columns=None, sizes=FILE_SIZES):
    """Split `columns` into files part-0.parquet ... of `sizes` rows (row groups of 3)."""
    columns = columns or _edges(sum(sizes))
    directory.mkdir(exist_ok=True)
    bounds = np.cumsum((0,) + tuple(sizes))
    paths = []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        paths.append(_write(directory / f"part-{index}.parquet",
                            {name: values[start:end] for name, values in columns.items()}))
    return paths


def _dataset(root, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return EdgesDataset(str(root), TABLES, RELATIONS, **kwargs)


def _decode(batch):
    """(lhs, rhs, rel) of a batch, decoded from the KJT and the slots (lookups: lhs, rhs per
    edge; each table's ids in its first bags, in lookup order)."""
    kjt = batch.nodes
    num_lookups = 2 * len(batch.rels)
    num_tables = len(kjt.keys())
    lengths = kjt.lengths().reshape(num_tables, -1)
    counts = lengths.sum(1)
    for table in range(num_tables):    # n_t ones, then empty bags
        n = int(counts[table])
        assert lengths[table].tolist() == [1] * n + [0] * (lengths.shape[1] - n)
    assert lengths.shape[1] >= int(counts.max()) and int(counts.sum()) == num_lookups
    assert batch.slots.unique().numel() == num_lookups
    per_key = kjt.to_dict()
    lookup_table = batch.slots % num_tables
    lookup_values = torch.stack([per_key[kjt.keys()[int(slot) % num_tables]].values()[
        int(slot) // num_tables] for slot in batch.slots])
    # The lookups' tables are those of the relations' sides.
    expected = torch.tensor([[0, 1], [0, 0]])[batch.rels].flatten()   # user=0, tweet=1
    assert lookup_table.tolist() == expected.tolist()
    return lookup_values[0::2], lookup_values[1::2], batch.rels


def _rows(batches):
    """lhs of every edge yielded (= the global row number, see `_edges`), in row order
    within each batch (the reader groups a batch's edges by relation)."""
    return [int(x) for batch in batches for x in sorted(_decode(batch)[0].tolist())]


# -- shares and batches -------------------------------------------------------------------


def test_two_ranks_get_disjoint_equal_contiguous_shares_across_files(tmp_path):
    _write_files(tmp_path / "data")
    edges = _edges()
    ranks = [_dataset(tmp_path / "data", rank=rank, world_size=2) for rank in (0, 1)]
    n = NUM_ROWS // 2                                   # 12 rows per rank, 3 batches of 4
    assert [len(d) for d in ranks] == [3, 3]
    assert ranks[0].num_batches_per_epoch == 3
    shares = []
    for dataset in ranks:
        batches = list(dataset)
        assert len(batches) == 3
        for batch in batches:
            lhs, rhs, rel = _decode(batch)
            assert len(lhs) == 4
            assert batch.labels.tolist() == [1.0] * 4
            assert batch.weights.dtype == torch.float32 and batch.weights.tolist() == [1.0] * 4
            assert batch.rels.dtype == torch.int64
            # The KJT holds exactly the edges of those rows.
            assert rhs.tolist() == edges["rhs"][lhs.numpy()].tolist()
            assert rel.tolist() == edges["rel"][lhs.numpy()].tolist()
        shares.append(_rows(batches))
    assert shares[0] == list(range(0, n))              # crosses the boundary at row 7
    assert shares[1] == list(range(n, 2 * n))          # crosses the boundary at row 17
    assert set(shares[0]).isdisjoint(shares[1])


def test_each_share_drops_its_remainder_so_ranks_have_equal_batches(tmp_path):
    _write_files(tmp_path / "data")
    # 25 rows, 3 ranks: 8 rows each; batches of 3: 2 batches each, 2 rows of each share and
    # the last row dropped.
    shares = [_rows(_dataset(tmp_path / "data", rank=r, world_size=3, batch_size=3))
              for r in range(3)]
    assert shares == [list(range(0, 6)), list(range(8, 14)), list(range(16, 22))]
    assert len(_dataset(tmp_path / "data", world_size=2, batch_size=13)) == 0
    assert list(_dataset(tmp_path / "data", world_size=2, batch_size=13)) == []


def test_data_root_as_directory_glob_or_file(tmp_path):
    paths = _write_files(tmp_path / "data")
    (tmp_path / "data" / "notes.txt").write_text("not parquet")
    assert _dataset(tmp_path / "data").total_rows == NUM_ROWS
    assert _dataset(f"{tmp_path}/data/part-[12].parquet").total_rows == 18
    assert _dataset(paths[1]).total_rows == 10
    assert _rows(_dataset(paths[1], batch_size=5)) == list(range(7, 17))


def test_fsspec_url():
    fs = fsspec.filesystem("memory")
    edges = _edges(12)
    for index in range(2):
        with fs.open(f"/twhin-test/part-{index}.parquet", "wb") as handle:
            part = {k: v[index * 6:(index + 1) * 6] for k, v in edges.items()}
            pq.write_table(pa.table(part), handle, row_group_size=4)
    try:
        assert _rows(_dataset("memory://twhin-test/*.parquet", batch_size=5)) == list(range(10))
        bad = {**edges, "lhs": np.full(6, 99)}
        with fs.open("/twhin-bad/part-0.parquet", "wb") as handle:
            pq.write_table(pa.table({k: v[:6] for k, v in bad.items()}), handle)
        with pytest.raises(DataError, match=r"^memory://+twhin-bad/part-0.parquet row 0: lhs=99"):
            list(_dataset("memory://twhin-bad", batch_size=2))
    finally:
        fs.rm("/twhin-test", recursive=True)
        fs.rm("/twhin-bad", recursive=True)


# -- limit, offset, epochs, resume -------------------------------------------------------


def test_limit_and_offset(tmp_path):
    _write_files(tmp_path / "data")
    root = tmp_path / "data"
    assert _rows(_dataset(root, rank=1, world_size=2, offset=1, limit=1)) == list(range(16, 20))
    assert _rows(_dataset(root, rank=1, world_size=2, offset=1)) == list(range(16, 24))
    assert _rows(_dataset(root, rank=0, world_size=2, limit=2)) == list(range(0, 8))
    assert len(_dataset(root, world_size=2, limit=10)) == 3
    assert len(_dataset(root, world_size=2, offset=3)) == 0
    assert list(_dataset(root, world_size=2, offset=5)) == []


def test_num_epochs_repeats_the_share(tmp_path):
    _write_files(tmp_path / "data")
    dataset = _dataset(tmp_path / "data", rank=1, world_size=2, num_epochs=2)
    assert len(dataset) == 3                            # per epoch
    rows = _rows(dataset)
    assert rows == list(range(12, 24)) * 2
    assert dataset.state_dict() == {"epoch": 2, "batch": 0}
    assert _rows(dataset) == rows                       # a new iter() starts again


def test_state_dict_resumes_exactly_at_the_next_batch(tmp_path):
    _write_files(tmp_path / "data")

    def make():
        return _dataset(tmp_path / "data", rank=1, world_size=2, num_epochs=2, offset=0,
                        batch_size=3)

    full = [_decode(b) for b in make()]
    assert len(full) == 8                               # 4 batches per epoch, 2 epochs
    for consumed in range(len(full) + 1):
        dataset = make()
        iterator = iter(dataset)
        for _ in range(consumed):
            next(iterator)
        state = dataset.state_dict()
        assert state == {"epoch": consumed // 4, "batch": consumed % 4}
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        rest = [_decode(b) for b in resumed]
        assert len(rest) == len(full) - consumed
        for got, want in zip(rest, full[consumed:]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_resume_does_not_read_the_skipped_rows(tmp_path):
    paths = _write_files(tmp_path / "data")
    dataset = _dataset(tmp_path / "data", world_size=2)      # rank 0: rows 0..11
    dataset.load_state_dict({"epoch": 0, "batch": 2})        # rows 8..11, all in file 1
    with open(paths[0], "wb") as handle:                     # file 0 is now unreadable
        handle.write(b"garbage")
    assert _rows(dataset) == [8, 9, 10, 11]


def test_load_state_dict_rejects_positions_outside_the_epoch(tmp_path):
    _write_files(tmp_path / "data")
    dataset = _dataset(tmp_path / "data", world_size=2)
    with pytest.raises(ValueError, match="batch"):
        dataset.load_state_dict({"epoch": 0, "batch": 3})


# -- weights --------------------------------------------------------------------------------


def test_weight_column_is_used_when_present(tmp_path):
    columns = {**_edges(8), "weight": np.linspace(0.5, 4.0, 8)}
    _write(tmp_path / "w.parquet", columns)
    batches = list(_dataset(tmp_path / "w.parquet"))
    weights = torch.cat([b.weights for b in batches])
    rows = torch.cat([_decode(b)[0] for b in batches])     # each edge's weight follows it
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(columns["weight"], dtype=torch.float32)[rows])


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("column,value,rel,message", [
    ("rel", 2, None, "rel=2 is outside the 2 configured relations"),
    ("rel", -1, None, "rel=-1 is outside the 2 configured relations"),
    ("lhs", 50, None, "lhs=50 is outside table 'user' (num_embeddings=50)"),
    ("lhs", -3, None, "lhs=-3 is outside table 'user' (num_embeddings=50)"),
    ("rhs", 35, 0, "rhs=35 is outside table 'tweet' (num_embeddings=30)"),
    ("rhs", 50, 1, "rhs=50 is outside table 'user' (num_embeddings=50)"),
])
def test_out_of_range_ids_name_file_row_and_table(tmp_path, column, value, rel, message):
    row = 4
    edges = _edges()
    edges[column] = edges[column].copy()
    edges[column][FILE_SIZES[0] + row] = value
    if rel is not None:
        edges["rel"][FILE_SIZES[0] + row] = rel
    paths = _write_files(tmp_path / "data", edges)
    dataset = _dataset(tmp_path / "data")                  # construction reads footers only
    with pytest.raises(DataError) as error:
        list(dataset)
    assert str(error.value) == f"{paths[1]} row {row}: {message}"


def test_bad_row_in_another_ranks_share_is_reported_by_that_rank(tmp_path):
    edges = _edges()
    edges["lhs"][20] = 77                                 # global row 20 = row 3 of file 2
    paths = _write_files(tmp_path / "data", edges)
    assert len(list(_dataset(tmp_path / "data", rank=0, world_size=2))) == 3
    with pytest.raises(DataError, match=rf"^{paths[2]} row 3: lhs=77 is outside table 'user'"):
        list(_dataset(tmp_path / "data", rank=1, world_size=2))


def test_relation_naming_an_unknown_table_is_a_config_error(tmp_path):
    _write_files(tmp_path / "data")
    with pytest.raises(ConfigError, match="unknown table 'video'"):
        EdgesDataset(str(tmp_path / "data"), TABLES,
                     [Relation(name="watch", lhs="user", rhs="video")], batch_size=4)


def test_rhs_in_range_for_its_own_relation_table_is_accepted(tmp_path):
    edges = _edges(8)
    edges["rel"][:] = 1
    edges["rhs"][:] = 45                                  # fine for 'user' (50), not 'tweet'
    _write(tmp_path / "f.parquet", edges)
    assert len(list(_dataset(tmp_path / "f.parquet"))) == 2


def test_the_first_bad_row_is_reported(tmp_path):
    edges = _edges()
    edges["lhs"][FILE_SIZES[0] + 6] = 99
    edges["rhs"][FILE_SIZES[0] + 2] = -1
    paths = _write_files(tmp_path / "data", edges)
    with pytest.raises(DataError, match=rf"^{paths[1]} row 2: rhs=-1 is outside"):
        list(_dataset(tmp_path / "data"))


def test_missing_column_is_reported_at_construction(tmp_path):
    _write_files(tmp_path / "data")
    edges = _edges(5)
    del edges["rhs"]
    path = _write(tmp_path / "data" / "part-9.parquet", edges)
    with pytest.raises(DataError) as error:
        _dataset(tmp_path / "data")
    assert str(error.value) == f"{path}: missing column 'rhs' (columns: lhs, rel)"


def test_non_integer_columns_are_reported(tmp_path):
    edges = _edges(5)
    path = _write(tmp_path / "f.parquet", {**edges, "lhs": edges["lhs"].astype(np.float64)})
    with pytest.raises(DataError, match=rf"^{path}: column 'lhs' has type double; expected "
                                        "integers"):
        _dataset(path)
    path = _write(tmp_path / "g.parquet", {**edges, "weight": ["a"] * 5})
    with pytest.raises(DataError, match=rf"^{path}: column 'weight' has type string"):
        _dataset(path)


def test_null_ids_are_reported(tmp_path):
    edges = _edges(6)
    rel = pa.array([0, 1, None, 1, 0, 1], type=pa.int64())
    path = _write(tmp_path / "f.parquet", {**edges, "rel": rel})
    with pytest.raises(DataError, match=rf"^{path} row 2: rel is null"):
        list(_dataset(path, batch_size=2))


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read as parquet"):
        _dataset(tmp_path / "broken.parquet")


@pytest.mark.parametrize("root", ["nothing/*.parquet", "empty", "missing.parquet"])
def test_data_root_matching_nothing_names_it(tmp_path, root):
    (tmp_path / "empty").mkdir()
    data_root = f"{tmp_path}/{root}"
    with pytest.raises(DataError) as error:
        _dataset(data_root)
    assert str(error.value) == f"data_root '{data_root}' matches no parquet files"


# -- generator ------------------------------------------------------------------------------

TINY = {"num_users": 1000, "num_tweets": 200, "num_edges": 5000, "num_communities": 5,
        "seed": 7, "validation_fraction": 0.1, "files": 3}


def _read_graph(out):
    tables = {}
    for split in ("train", "validation"):
        files = sorted(os.listdir(out / split))
        tables[split] = pa.concat_tables([pq.read_table(out / split / f) for f in files])
    return tables


def test_generator_writes_a_valid_deterministic_graph(tmp_path):
    out = tmp_path / "graph"
    result = generate_graph(str(out), **TINY)
    assert result["generated"] is True
    assert result["num_train_edges"] == 4500 and result["num_validation_edges"] == 500
    assert sorted(os.listdir(out / "train")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert os.listdir(out / "validation") == ["part-00000.parquet"]
    assert (out / "_SUCCESS").exists()
    graph = _read_graph(out)
    assert graph["train"].num_rows == 4500 and graph["validation"].num_rows == 500
    for table in graph.values():
        assert table.column_names == ["lhs", "rel", "rhs"]
        assert all(t == pa.int64() for t in table.schema.types)
        lhs, rel, rhs = (table[name].to_numpy() for name in ("lhs", "rel", "rhs"))
        assert 0 <= lhs.min() and lhs.max() < 1000
        assert 0 <= rhs.min() and rhs.max() < 200
        assert set(np.unique(rel)) <= {0, 1, 2, 3}
    train = graph["train"]
    assert set(np.unique(train["rel"].to_numpy())) == {0, 1, 2, 3}
    all_lhs = np.concatenate([graph[s]["lhs"].to_numpy() for s in graph])
    assert len(np.unique(all_lhs)) == 1000               # every user has an edge

    # Same seed, other directory: identical data; other seed: different data.
    again = tmp_path / "again"
    generate_graph(str(again), **TINY)
    assert all(_read_graph(again)[s].equals(graph[s]) for s in graph)
    other = tmp_path / "other"
    generate_graph(str(other), **{**TINY, "seed": 8})
    assert not _read_graph(other)["train"].equals(graph["train"])

    # The dataset reads it.
    dataset = EdgesDataset(str(out / "train"), {"user": 1000, "tweet": 200},
                           [Relation(name=n, lhs="user", rhs="tweet")
                            for n in ("fav", "reply", "retweet", "magic_recs")], batch_size=100)
    assert len(dataset) == 45 and len(list(dataset)) == 45


def test_generator_second_call_is_a_no_op_and_new_parameters_regenerate(tmp_path):
    out = tmp_path / "graph"
    out.mkdir()                                          # an existing empty directory is fine
    assert generate_graph(str(out), **TINY)["generated"] is True
    stamp = (out / "train" / "part-00000.parquet").stat().st_mtime_ns
    second = generate_graph(str(out), **TINY)
    assert second["generated"] is False and second["num_train_edges"] == 4500
    assert (out / "train" / "part-00000.parquet").stat().st_mtime_ns == stamp
    # Other parameters: a new directory beside it, keyed by them; the first stays as it was.
    changed = generate_graph(str(out), **{**TINY, "files": 2, "num_edges": 3000})
    assert changed["generated"] is True and changed["out"] != str(out)
    keyed = tmp_path / os.path.basename(changed["out"])
    assert keyed.name.startswith("graph-") and keyed.is_dir()
    assert sorted(os.listdir(keyed / "train")) == ["part-00000.parquet", "part-00001.parquet"]
    assert _read_graph(keyed)["train"].num_rows == 2700
    assert (out / "train" / "part-00000.parquet").stat().st_mtime_ns == stamp
    assert _read_graph(out)["train"].num_rows == 4500
    again = generate_graph(str(out), **{**TINY, "files": 2, "num_edges": 3000})
    assert again["generated"] is False and again["out"] == changed["out"]
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


def test_generator_runs_once_for_concurrent_callers(tmp_path):
    out = str(tmp_path / "graph")
    results, errors = [], []

    def call():
        try:
            results.append(generate_graph(out, **TINY)["generated"])
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [False, False, False, True]


def test_ensure_default_graph_generates_the_default_graph_once(tmp_path):
    out = tmp_path / "twhin"
    assert ensure_default_graph(str(out)) is True
    assert ensure_default_graph(str(out)) is False
    validation = pq.read_table(out / "validation" / "part-00000.parquet")
    assert validation.num_rows == 40_000
    assert sum(pq.ParquetFile(out / "train" / f).metadata.num_rows
               for f in os.listdir(out / "train")) == 1_960_000
    # The shipped config's tables hold every id of the built-in graph.
    from projects.twhin.config import TwhinConfig
    from tests.twhin_setup import REPO as repo
    from tml.core.config import load_config_from_yaml
    config = load_config_from_yaml(TwhinConfig,
                                   os.path.join(repo, "projects", "twhin", "config", "local.yaml"))
    sizes = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    assert validation["lhs"].to_numpy().max() < sizes["user"]
    assert validation["rhs"].to_numpy().max() < sizes["tweet"]
    assert sizes == {"user": DEFAULTS["num_users"], "tweet": DEFAULTS["num_tweets"]}


def test_generator_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "graph"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match="precious.txt"):
        generate_graph(str(out), **TINY)
    assert (out / "precious.txt").read_text() == "mine"


def test_generator_refuses_a_graph_it_did_not_write(tmp_path):
    # The same layout (train/, validation/) without the generator's _SUCCESS marker: a
    # user's graph, never replaced (it was, as an "unfinished" one, before).
    out = tmp_path / "graph"
    generate_graph(str(out), **TINY)
    os.remove(out / "_SUCCESS")
    before = _read_graph(out)
    with pytest.raises(DataError) as error:
        generate_graph(str(out), **TINY)
    assert str(error.value).startswith(f"{out} holds files that the graph generator did not "
                                       "write (train, validation; no _SUCCESS")
    assert "\n" not in str(error.value)
    assert all(_read_graph(out)[s].equals(before[s]) for s in before)
    assert sorted(os.listdir(tmp_path)) == ["graph", "graph.lock"]


def test_built_in_graph_goes_to_the_cache_directory_outside_a_checkout(tmp_path,
                                                                      monkeypatch):
    from projects.twhin.data import generate

    # In this checkout: data/twhin at the repository root, as `make data` writes it.
    from tests.twhin_setup import REPO

    assert generate.in_checkout()
    assert generate.builtin_graph_base() == os.path.join(REPO, "data", "twhin")
    # Installed (no pyproject.toml above the package): the cache directory.
    monkeypatch.setattr(generate, "in_checkout", lambda: False)
    monkeypatch.setenv("TML_CACHE_DIR", str(tmp_path / "cache"))
    assert generate.builtin_graph_base() == str(tmp_path / "cache" / "twhin" / "graph")
    monkeypatch.delenv("TML_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert generate.cache_dir() == str(tmp_path / "xdg" / "tml")
    monkeypatch.setenv("TML_CACHE_DIR", str(tmp_path / "cache"))
    # local.yaml's data_root (the checkout's place) is read as the cache's.
    train = os.path.join(generate.CONFIG_GRAPH_DIR, "train")
    assert generate.resolve_builtin_path(train) == str(tmp_path / "cache" / "twhin" /
                                                       "graph" / "train")
    assert generate.resolve_builtin_path(str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert generate.resolve_builtin_path("s3://bucket/twhin") == "s3://bucket/twhin"
    # A graph with other parameters in the cache's place: the built-in one goes beside it.
    base = tmp_path / "cache" / "twhin" / "graph"
    generate_graph(str(base), **TINY)
    beside = generate.builtin_graph_dir()
    assert beside == f"{base}-{generate.params_key(generate.default_params())}"
    assert generate.resolve_builtin_path(train) == os.path.join(beside, "train")


def test_generator_command_line(tmp_path):
    out = tmp_path / "cli"
    result = main(["--out", str(out), "--num_users", "300", "--num_tweets", "50",
                   "--num_edges", "1000", "--num_communities", "4", "--files", "2",
                   "--validation_fraction", "0.2", "--seed", "1"])
    assert result["generated"] is True and result["num_validation_edges"] == 200
    assert main(["--out", str(out), "--num_users", "300", "--num_tweets", "50",
                 "--num_edges", "1000", "--num_communities", "4", "--files", "2",
                 "--validation_fraction", "0.2", "--seed", "1"])["generated"] is False
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--num_communities", "0"])


# -- values that would reach the loss -------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"),
                                          (-0.5, "-0.5"), (1e300, "1e+300")])
def test_weights_that_are_not_finite_and_non_negative_name_file_and_row(tmp_path, value, shown):
    # A NaN or infinite weight made the loss NaN a few steps later; a negative one rewards
    # the wrong score. 1e300 is finite as float64, infinite as the float32 the loss uses.
    weight = np.ones(NUM_ROWS)
    weight[FILE_SIZES[0] + 5] = value
    paths = _write_files(tmp_path / "data", {**_edges(), "weight": weight})
    dataset = _dataset(tmp_path / "data")
    with pytest.raises(DataError) as error:
        list(dataset)
    assert str(error.value) == (f"{paths[1]} row 5: weight={shown} is not a finite number >= 0 "
                                "(as float32)")


def test_zero_and_integer_weights_are_accepted(tmp_path):
    edges = _edges(8)
    _write(tmp_path / "w.parquet", {**edges, "weight": np.array([0, 1, 2, 0, 5, 1, 1, 3])})
    batches = list(_dataset(tmp_path / "w.parquet"))
    rows = torch.cat([_decode(b)[0] for b in batches])
    weights = torch.cat([b.weights for b in batches])
    assert weights.tolist() == torch.tensor([0, 1, 2, 0, 5, 1, 1, 3])[rows].tolist()
    negative = {**edges, "weight": np.array([1, 1, 1, 1, 1, 1, -2, 1], dtype=np.int8)}
    path = _write(tmp_path / "n.parquet", negative)
    with pytest.raises(DataError, match=rf"^{path} row 6: weight=-2 is not a finite number"):
        list(_dataset(path))


def test_unsigned_ids_beyond_int64_are_out_of_range_not_wrapped(tmp_path):
    edges = {k: v.astype(np.uint64) for k, v in _edges(8).items()}
    edges["lhs"][3] = np.uint64(2**64 - 1)      # -1 once cast to int64
    path = _write(tmp_path / "u.parquet", edges)
    with pytest.raises(DataError) as error:
        list(_dataset(path))
    assert str(error.value) == (f"{path} row 3: lhs=18446744073709551615 is outside table "
                                "'user' (num_embeddings=50)")


def test_duplicate_columns_are_reported_at_construction(tmp_path):
    edges = _edges(4)
    table = pa.table([edges["lhs"], edges["rel"], edges["rhs"], edges["rhs"]],
                     names=["lhs", "rel", "rhs", "rhs"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError) as error:
        _dataset(tmp_path / "d.parquet")
    assert str(error.value) == f"{tmp_path / 'd.parquet'}: column 'rhs' occurs 2 times"


def test_a_corrupt_data_page_is_one_line_naming_file_and_row(tmp_path):
    # Footer intact, data damaged: construction succeeds, reading names where it failed.
    path = _write(tmp_path / "c.parquet", _edges(12), row_group_size=6)
    data = bytearray(open(path, "rb").read())
    footer = int.from_bytes(data[-8:-4], "little")
    for i in range(4, len(data) - 8 - footer):
        data[i] = 0xFF
    open(path, "wb").write(bytes(data))
    dataset = _dataset(path)
    with pytest.raises(DataError) as error:
        list(dataset)
    message = str(error.value)
    assert message.startswith(f"{path} row 0: cannot read the rows from here on: ")
    assert "\n" not in message
