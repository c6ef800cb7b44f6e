"""The `twhin` command line: import, train overrides, evaluate, export, neighbors.

Fast tests run the commands in-process (`dispatch`) on a checkpoint written with DCP in
this process; one slow test runs the documented walkthrough with 2 real workers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from projects.twhin.cli import apply_overrides, dispatch
from projects.twhin.config import TwhinConfig
from projects.twhin.data.data import create_dataset
from projects.twhin.export import RELATIONS_KEY, TABLE_KEY
from projects.twhin.models.models import operator_code, score
from tests.twhin_setup import REPO
from tml.core.config import load_config_from_yaml
from tml.errors import CheckpointError, ConfigError, DataError, TmlError


def _triples(n_users=12, n_items=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = set()
    while len(rows) < 150:
        u, i = int(rng.integers(n_users)), int(rng.integers(n_items))
        kind = int(rng.integers(3))
        if kind == 0:
            rows.add((f"user:u{u}", "buys", f"item:i{i}"))
        elif kind == 1:
            rows.add((f"user:u{u}", "follows", f"user:u{(u + 1 + i) % n_users}"))
        else:
            rows.add((f"tag{i}", "related", f"tag{(i + 1) % n_items}"))   # untyped: 'entity'
    return sorted(rows)


def _write_tsv(path, rows, sep="\t", header=False):
    lines = ([sep.join(("head", "relation", "tail"))] if header else []) + \
        [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def imported(tmp_path):
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples(), header=True)
    out = tmp_path / "data"
    result = dispatch(["import", "--triples", tsv, "--out", str(out), "--dim", "4",
                       "--seed", "1"])
    return out, result


def test_import_writes_vocab_splits_and_a_config_that_loads(imported, tmp_path):
    out, result = imported
    assert result["tables"] == {"user": 12, "item": 6, "entity": 6}
    assert sum(result["edges"].values()) == 150
    assert all(result["edges"][s] > 0 for s in ("train", "validation", "test"))
    assert sorted(os.listdir(out)) == ["config.yaml", "test", "train", "validation", "vocab"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    config = load_config_from_yaml(TwhinConfig, str(out / "config.yaml"))
    assert "${CONFIG_DIR}" in (out / "config.yaml").read_text()   # the directory can move
    assert sorted((r.name, r.lhs, r.rhs) for r in config.model.relations) == [
        ("buys", "user", "item"), ("follows", "user", "user"), ("related", "entity", "entity")]
    assert config.test_data is not None and config.validation_data is not None
    # The id-mapped splits read back through the training reader, and decode to the input.
    dataset = create_dataset(config.train_data, config.model)
    assert len(dataset) >= 1
    vocab = pq.read_table(out / "vocab" / "tables" / "user.parquet").to_pydict()
    ids = dict(zip(vocab["row"], vocab["id"]))
    relations = pq.read_table(out / "vocab" / "relations.parquet").to_pydict()["name"]
    items = dict(zip(*[pq.read_table(out / "vocab" / "tables" / "item.parquet").to_pydict()[k]
                       for k in ("row", "id")]))
    train = pq.read_table(out / "train").to_pydict()
    decoded = set()
    for lhs, rel, rhs in zip(train["lhs"], train["rel"], train["rhs"]):
        if relations[rel] == "buys":
            decoded.add((ids[lhs], "buys", items[rhs]))
    assert decoded and decoded <= set(_triples())


def test_import_with_given_splits_csv_and_parquet(tmp_path):
    rows = _triples()
    train = _write_tsv(tmp_path / "train.csv", rows[:100], sep=",")
    valid = _write_tsv(tmp_path / "valid.txt", rows[100:120], sep=",")   # sniffed
    table = pa.table({"head": [r[0] for r in rows[120:]], "relation": [r[1] for r in rows[120:]],
                      "tail": [r[2] for r in rows[120:]]})
    pq.write_table(table, tmp_path / "test.parquet")
    result = dispatch(["import", "--triples", train, "--valid", valid, "--test",
                       str(tmp_path / "test.parquet"), "--out", str(tmp_path / "d")])
    assert result["edges"] == {"train": 100, "validation": 20, "test": 30}


@pytest.mark.parametrize("content, message", [
    ("user:a\tlikes\titem:b\nuser:a\tlikes\n", "edges.tsv: line 2: expected 3 fields "
     "(head, relation, tail), got 2"),
    ("", "edges.tsv: holds no triples (empty file?)"),
    ("user:a\tlikes\titem:b\n\nuser:a\tlikes\tuser:c\n", "edges.tsv: line 3: relation "
     "'likes' links tables user -> user, but earlier rows link user -> item; a relation must "
     "connect the same tables every time"),
])
def test_import_rejects_bad_input_with_file_and_line_and_writes_nothing(tmp_path, content,
                                                                        message):
    path = tmp_path / "edges.tsv"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        dispatch(["import", "--triples", str(path), "--out", str(tmp_path / "out")])
    assert str(error.value) == f"{path}: {message.split(': ', 1)[1]}"
    assert sorted(os.listdir(tmp_path)) == ["edges.tsv"]


def test_import_refuses_a_non_empty_out_without_force(imported):
    out, _ = imported
    tsv = out.parent / "edges.tsv"
    with pytest.raises(TmlError, match="exists and is not empty; pass --force"):
        dispatch(["import", "--triples", str(tsv), "--out", str(out)])
    dispatch(["import", "--triples", str(tsv), "--out", str(out), "--force"])


def test_overrides_are_yaml_scalars_and_unknown_keys_are_named(tmp_path, imported):
    data = {"training": {"num_epochs": 1}, "model": {"relations": [{"name": "a"}]}}
    apply_overrides(data, ["training.num_epochs=3", "training.save_dir=/x",
                           "model.relations.0.operator=diagonal", "runtime.enable_amp=false"],
                    "c.yaml")
    assert data["training"] == {"num_epochs": 3, "save_dir": "/x"}
    assert data["model"]["relations"][0]["operator"] == "diagonal"
    assert data["runtime"] == {"enable_amp": False}
    with pytest.raises(ConfigError, match="'training.num_epochs' is not a section"):
        apply_overrides(data, ["training.num_epochs.x=1"], "c.yaml")
    out, _ = imported
    config = str(out / "config.yaml")
    with pytest.raises(ConfigError) as error:
        dispatch(["train", "--config", config, "--save_dir", str(tmp_path / "s"),
                  "--set", "training.num_epoch=2"])
    assert str(error.value) == (f"{config} (with --set): training.num_epoch: unknown field "
                                "(not allowed here; check the spelling)")


def _fake_checkpoint(out, path):
    """A DCP checkpoint of the imported config, written by this one process."""
    import torch.distributed.checkpoint as dcp

    config = load_config_from_yaml(TwhinConfig, str(out / "config.yaml"))
    g = torch.Generator().manual_seed(0)
    state = {TABLE_KEY.format(t.name): torch.randn(t.num_embeddings, 4, generator=g)
             for t in config.model.embeddings.tables}
    state[RELATIONS_KEY] = torch.randn(len(config.model.relations), 4, generator=g)
    dcp.save(state, checkpoint_id=str(path / "7"), no_dist=True)
    return config, state


def _random_checkpoint(config: dict, path) -> None:
    """Random tables and relation vectors shaped as `config` says, saved with DCP."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    tables = config["model"]["embeddings"]["tables"]
    dim = tables[0]["embedding_dim"]
    state = {TABLE_KEY.format(t["name"]): torch.randn(t["num_embeddings"], dim, generator=g)
             for t in tables}
    state[RELATIONS_KEY] = torch.randn(len(config["model"]["relations"]), dim, generator=g)
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_export_evaluate_and_neighbors_on_a_checkpoint(imported, tmp_path, capsys):
    out, _ = imported
    config, state = _fake_checkpoint(out, tmp_path / "save")
    emb = tmp_path / "emb"
    dispatch(["export", "--config", str(out / "config.yaml"), "--checkpoint",
              str(tmp_path / "save"), "--out", str(emb)])
    users = pq.read_table(emb / "user.parquet")
    assert users.column_names == ["id", "vector"]
    vectors = np.array(users.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(vectors, state[TABLE_KEY.format("user")].numpy())
    vocab = pq.read_table(out / "vocab" / "tables" / "user.parquet").to_pydict()
    assert users.column("id").to_pylist() == vocab["id"]
    relations = pq.read_table(emb / "relations.parquet").to_pydict()
    assert relations["name"] == [r.name for r in config.model.relations]
    # The importer's operator for this small many-relation graph (tests/test_importer_defaults.py).
    operators = [r.operator.value for r in config.model.relations]
    assert relations["operator"] == operators
    with pytest.raises(TmlError, match="exists and is not empty; pass --force"):
        dispatch(["export", "--config", str(out / "config.yaml"), "--checkpoint",
                  str(tmp_path / "save"), "--out", str(emb)])

    # neighbors with a relation: the best tails by the model's score, brute force.
    capsys.readouterr()
    rows = dispatch(["neighbors", "--embeddings", str(emb), "--entity", vocab["id"][3],
                     "--relation", "buys", "--k", "3"])
    items = state[TABLE_KEY.format("item")]
    r = state[RELATIONS_KEY][[x.name for x in config.model.relations].index("buys")]
    scores = score(torch.from_numpy(vectors[3]).expand(len(items), -1), r.expand(len(items), -1),
                   items, torch.full((len(items),), operator_code(operators[
                       [x.name for x in config.model.relations].index("buys")])))
    best = torch.argsort(scores, descending=True)[:3].tolist()
    item_ids = pq.read_table(emb / "item.parquet").column("id").to_pylist()
    assert [i for i, _ in rows] == [item_ids[b] for b in best]
    np.testing.assert_allclose([s for _, s in rows], scores[best].numpy(), rtol=1e-5)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["rank", "id", "score"] and len(printed) == 4
    # without a relation: dot product within the table, itself excluded
    rows = dispatch(["neighbors", "--embeddings", str(emb), "--entity", vocab["id"][3]])
    assert vocab["id"][3] not in [i for i, _ in rows] and len(rows) == 10
    for bad, message in ((["--entity", "user:nobody"], "entity 'user:nobody' is in none"),
                         (["--entity", vocab["id"][3], "--relation", "nope"],
                          "unknown relation 'nope'")):
        with pytest.raises(TmlError, match=message):
            dispatch(["neighbors", "--embeddings", str(emb), *bad])

    capsys.readouterr()
    result = dispatch(["evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
                       str(tmp_path / "save"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert {"mrr", "hits_at_1", "hits_at_3", "hits_at_10", "mean_rank", "auc", "head", "tail",
            "per_relation", "popularity"} <= set(printed)
    assert printed["popularity"]["count"] == printed["count"]   # same ranks, same protocol
    assert 0 < printed["popularity"]["mrr"] <= 1
    assert printed["num_edges"] == result["num_edges"] > 0
    assert 0 < printed["mrr"] <= 1 and printed["mean_rank"] >= 1

    # --max_edges: a fixed sample (the same each time), model and popularity ranked on it;
    # at least the split's size means the whole split.
    evaluate = ["evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
                str(tmp_path / "save")]
    whole = dispatch([*evaluate, "--max_edges", str(result["num_edges"])])
    assert whole["mrr"] == result["mrr"] and whole["count"] == result["count"]
    sampled = [dispatch([*evaluate, "--max_edges", "3"]) for _ in range(2)]
    assert sampled[0]["num_evaluated"] == 3 and sampled[0]["count"] == 6   # both sides
    assert sampled[0]["popularity"]["count"] == 6
    assert sampled[0]["mrr"] == sampled[1]["mrr"]
    assert "a random sample of 3 ranked" in capsys.readouterr().out
    for bad in ("0", "x"):
        done = subprocess.run([sys.executable, "-m", "projects.twhin", *evaluate,
                               "--max_edges", bad], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 2 and "--max_edges" in done.stderr, done.stderr


def test_export_in_small_chunks_equals_one_chunk_and_writes_row_groups(imported, tmp_path):
    """Streaming: a 5-row chunk gives the same files as one chunk, in several row groups."""
    from projects.twhin.export import export_embeddings

    out, _ = imported
    config, state = _fake_checkpoint(out, tmp_path / "save")
    config_path = str(out / "config.yaml")
    small = export_embeddings(config, config_path, str(tmp_path / "save"),
                              str(tmp_path / "small"), chunk_rows=5)
    big = export_embeddings(config, config_path, str(tmp_path / "save"), str(tmp_path / "big"))
    assert {k: v for k, v in small.items() if k != "out"} == \
        {k: v for k, v in big.items() if k != "out"}
    for name in ("user", "item", "entity", "relations"):
        assert pq.read_table(tmp_path / "small" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "big" / f"{name}.parquet")), name
    users = pq.ParquetFile(tmp_path / "small" / "user.parquet")
    assert users.metadata.num_row_groups == 3                      # 12 rows: 5 + 5 + 2
    assert pq.ParquetFile(tmp_path / "big" / "user.parquet").metadata.num_row_groups == 1
    vector_type = users.schema_arrow.field("vector").type
    assert pa.types.is_fixed_size_list(vector_type) and vector_type.list_size == 4
    assert vector_type.value_type == pa.float32()
    np.testing.assert_array_equal(
        np.array(users.read().column("vector").to_pylist(), dtype=np.float32),
        state[TABLE_KEY.format("user")].numpy())
    other = config.model_copy(deep=True)
    other.model.embeddings.tables[0].num_embeddings += 1
    key = TABLE_KEY.format(other.model.embeddings.tables[0].name)
    with pytest.raises(CheckpointError) as error:
        export_embeddings(other, config_path, str(tmp_path / "save"), str(tmp_path / "x"))
    assert str(error.value) == (f"checkpoint {tmp_path / 'save' / '7'}: '{key}' has shape "
                                f"[{other.model.embeddings.tables[0].num_embeddings - 1}, 4], "
                                f"the config says "
                                f"[{other.model.embeddings.tables[0].num_embeddings}, 4]")
    assert not (tmp_path / "x").exists()


def test_evaluate_skips_or_rejects_entities_unseen_in_training(tmp_path):
    rows = _triples()
    train = _write_tsv(tmp_path / "train.tsv", rows[:120])
    test = _write_tsv(tmp_path / "test.tsv", rows[120:] + [("user:new", "buys", "item:i0")])
    out = tmp_path / "d"
    dispatch(["import", "--triples", train, "--test", test, "--out", str(out), "--dim", "4"])
    _fake_checkpoint(out, tmp_path / "save")
    args = ["evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
            str(tmp_path / "save"), "--json"]
    result = dispatch(args)
    assert result["num_skipped_unseen"] >= 1
    assert result["count"] == 2 * (result["num_edges"] - result["num_skipped_unseen"])
    with pytest.raises(DataError, match="never occurs in training .* drop --strict"):
        dispatch(args + ["--strict"])
    with pytest.raises(DataError, match="the config has no validation_data section"):
        dispatch(args[:-1] + ["--split", "validation"])


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,r,b\na,r\n")
    result = subprocess.run([sys.executable, "-m", "projects.twhin", "import", "--triples",
                             str(path), "--out", str(tmp_path / "o")], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: line 2: expected 3 fields (head, " \
                                    "relation, tail), got 2"


@pytest.mark.slow
@pytest.mark.timeout(600)   # 49 s alone; 205 s measured on a loaded 2-core host
def test_walkthrough_import_train_two_workers_evaluate_export_neighbors(tmp_path, capsys):
    """docs/twhin_cli.md, for real: sharded training on 2 workers, evaluation on 2. The
    commands that start workers run as `python -m projects.twhin`; the others run the same
    entry point (`main`) in this process, sparing an interpreter and its torch import each."""
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples(n_users=40, n_items=20, seed=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO

    def twhin(*args):
        done = subprocess.run([sys.executable, "-m", "projects.twhin", *args], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def twhin_here(*args):
        from projects.twhin.cli import main

        capsys.readouterr()
        main(list(args))   # exits non-zero on an error (run_cli)
        return capsys.readouterr().out

    data, save, emb = tmp_path / "data", tmp_path / "save", tmp_path / "emb"
    twhin_here("import", "--triples", tsv, "--out", str(data), "--dim", "8")
    twhin("train", "--config", str(data / "config.yaml"), "--save_dir", str(save),
          "--nproc_per_node", "2", "--set", "training.num_epochs=2",
          "--set", "train_data.per_replica_batch_size=8", "--set", "train_data.global_negatives=2",
          "--set", "model.relations.1.operator=diagonal",
          # The importer's translation lr (50) makes the diagonal operator diverge on this
          # graph (loss inf by step 7), which training now refuses to save.
          "--set", "model.translation_optimizer.sgd.lr=0.5")
    assert (save / "twhin_config.yaml").is_file()
    # Two epochs; each of the 2 workers reads half the training rows in full batches of 8.
    final = 2 * (pq.read_table(data / "train").num_rows // 2 // 8)
    assert max(int(name) for name in os.listdir(save) if name.isdigit()) == final
    # The effective config (with the --set operator) is the one to evaluate with.
    two = json.loads(twhin("evaluate", "--config", str(save / "twhin_config.yaml"),
                           "--checkpoint", str(save), "--json", "--nproc_per_node", "2"))
    one = json.loads(twhin_here("evaluate", "--config", str(save / "twhin_config.yaml"),
                                "--checkpoint", str(save), "--json"))
    assert two["workers"] == 2 and one["workers"] == 1
    # Sharded evaluation (each worker holds half of every table) gives the same ranks.
    for key in ("hits_at_1", "hits_at_10", "mean_rank", "count", "auc"):
        assert two[key] == one[key], key
    assert two["mrr"] == pytest.approx(one["mrr"], rel=1e-9)
    # A sample of the training edges: the same sample and ranks on 2 workers as on 1.
    sample = ("--split", "train", "--max_edges", "50", "--json")
    two = json.loads(twhin("evaluate", "--config", str(save / "twhin_config.yaml"),
                           "--checkpoint", str(save), "--nproc_per_node", "2", *sample))
    one = json.loads(twhin_here("evaluate", "--config", str(save / "twhin_config.yaml"),
                                "--checkpoint", str(save), *sample))
    assert two["num_evaluated"] == one["num_evaluated"] == 50 and two["count"] == 100
    for key in ("hits_at_1", "hits_at_10", "mean_rank", "count"):
        assert two[key] == one[key], key
    # Training learned: on the edges it trained on, the trained tables rank better than
    # random ones of the same shapes (a checkpoint written here, evaluated the same way).
    # The held-out edges of this random graph are mostly unpredictable (16 of them), and
    # 16 steps learn little: measured train MRR 0.160 vs 0.118, AUC 0.547 vs 0.476.
    trained = yaml.safe_load((save / "twhin_config.yaml").read_text())
    random_save = tmp_path / "random"
    _random_checkpoint(trained, random_save / str(final))
    from projects.twhin.link_prediction import evaluate_checkpoint

    fitted, chance = (evaluate_checkpoint(str(save / "twhin_config.yaml"), str(checkpoint),
                                          split="train")
                      for checkpoint in (save, random_save))   # in this process: 1 worker
    assert fitted["count"] == chance["count"] > 200
    assert fitted["mrr"] > chance["mrr"] + 0.02, (fitted, chance)
    assert fitted["auc"] > chance["auc"] + 0.03, (fitted, chance)
    twhin_here("export", "--config", str(save / "twhin_config.yaml"), "--checkpoint",
               str(save), "--out", str(emb))
    out = twhin_here("neighbors", "--embeddings", str(emb), "--entity", "user:u1",
                     "--relation", "buys", "--k", "5")
    assert len(out.strip().splitlines()) == 6 and "item:" in out
    assert yaml.safe_load((save / "twhin_config.yaml").read_text())["model"]["relations"][1][
        "operator"] == "diagonal"


def test_export_and_evaluate_refuse_a_config_with_another_operator(imported, tmp_path):
    from projects.twhin.signature import checkpoint_extra
    from tml.common.checkpointing import EXTRA_FILE

    out, _ = imported
    config, _ = _fake_checkpoint(out, tmp_path / "save")
    with open(tmp_path / "save" / "7" / EXTRA_FILE, "w") as f:
        json.dump(checkpoint_extra(config), f)
    data = yaml.safe_load((out / "config.yaml").read_text())
    trained = data["model"]["relations"][0]["operator"]
    other = "translation" if trained != "translation" else "diagonal"
    data["model"]["relations"][0]["operator"] = other
    changed = tmp_path / "other.yaml"
    changed.write_text(yaml.safe_dump(data))
    name = data["model"]["relations"][0]["name"]
    message = (f"relation '{name}' was trained with operator '{trained}', the config says "
               f"'{other}'")
    for command in (["export", "--out", str(tmp_path / "emb")], ["evaluate"]):
        with pytest.raises(CheckpointError, match=message):
            dispatch([command[0], "--config", str(changed), "--checkpoint",
                      str(tmp_path / "save"), *command[1:]])
    assert not (tmp_path / "emb").exists()
