"""Mistakes that used to lose data or run the wrong thing, each refused in one line with
nothing lost: `export --force` onto a save_dir or an import, a rejected `twhin train`
overwriting the previous run's config, misspelt flags, no save_dir, unwritable output
directories, global negatives too large for memory."""

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from projects.twhin import run
from projects.twhin.cli import dispatch
from projects.twhin.config import TwhinConfig
from projects.twhin.preflight import check_step_memory, step_bytes
from tests.projects.twhin.test_twhin_cli import _fake_checkpoint, _triples, _write_tsv
from tests.twhin_setup import LOCAL, REPO, launcher_env
from tml.core.config import load_config_from_yaml
from tml.errors import CheckpointError, ConfigError, DataError, TmlError


def _snapshot(root):
    """Every path below `root` with the sha256 of its bytes (None for directories)."""
    found = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(base, name), root)] = None
        for name in files:
            path = os.path.join(base, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


@pytest.fixture
def imported(tmp_path):
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples(), header=True)
    out = tmp_path / "data"
    dispatch(["import", "--triples", tsv, "--out", str(out), "--dim", "4", "--seed", "1"])
    return out


def _export(config, checkpoint, out, *extra):
    return dispatch(["export", "--config", str(config), "--checkpoint", str(checkpoint),
                     "--out", str(out), *extra])


def test_export_force_onto_a_save_dir_keeps_every_checkpoint(imported, tmp_path):
    save = tmp_path / "save"
    _fake_checkpoint(imported, save)
    (save / "twhin_config.yaml").write_text("kept")
    before = _snapshot(save)
    with pytest.raises(TmlError) as error:
        _export(imported / "config.yaml", save, save, "--force")
    assert str(error.value) == (
        f"--out {save} is not empty and holds no previous export (metadata.json of format "
        "'twhin-export' beside parquet files only); --force replaces only an export: choose "
        "another --out")
    assert _snapshot(save) == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_export_force_onto_an_import_keeps_the_training_data(imported, tmp_path):
    save = tmp_path / "save"
    _fake_checkpoint(imported, save)
    before = _snapshot(imported)
    with pytest.raises(TmlError, match="holds no previous export"):
        _export(imported / "config.yaml", save, imported, "--force")
    assert _snapshot(imported) == before


def test_export_force_replaces_only_a_previous_export(imported, tmp_path):
    save, emb = tmp_path / "save", tmp_path / "emb"
    _fake_checkpoint(imported, save)
    _export(imported / "config.yaml", save, emb)
    metadata = yaml.safe_load((emb / "metadata.json").read_text())
    assert metadata["format"] == "twhin-export" and metadata["format_version"] == 1
    with pytest.raises(TmlError, match="exists and is not empty; pass --force"):
        _export(imported / "config.yaml", save, emb)
    _export(imported / "config.yaml", save, emb, "--force")        # an export: replaced
    (emb / "notes.txt").write_text("mine")                          # not an export any more
    before = _snapshot(emb)
    with pytest.raises(TmlError, match="holds no previous export"):
        _export(imported / "config.yaml", save, emb, "--force")
    assert _snapshot(emb) == before


def test_export_into_an_unwritable_place_is_one_line(imported, tmp_path):
    save = tmp_path / "save"
    _fake_checkpoint(imported, save)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(TmlError) as error:
        _export(imported / "config.yaml", save, blocker / "emb")
    assert str(error.value) == f"--out {blocker}/emb: cannot write there ({blocker} is not a " \
                               "directory)"
    with pytest.raises(TmlError, match="exists and is not a directory"):
        _export(imported / "config.yaml", save, blocker)
    assert blocker.read_text() == "x"


def _previous_run(tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    (save / "twhin_config.yaml").write_text("# the previous run's config\n")
    return save, _snapshot(save)


@pytest.mark.parametrize("overrides, error_type, message", [
    (["training.num_epochs=0"], ConfigError,
     "{config} (with --set): training.num_epochs: Input should be greater than 0"),
    (["train_data.data_root=/nonexistent/edges"], DataError,
     "{config} (with --set): train_data.data_root: data_root '/nonexistent/edges' matches "
     "no parquet files"),
    (["train_data.global_negatives=1000000000"], ConfigError,
     "{config} (with --set): train_data.global_negatives: one step needs about "),
])
def test_rejected_train_leaves_the_previous_config_unchanged(imported, tmp_path, overrides,
                                                             error_type, message):
    save, before = _previous_run(tmp_path)
    config = imported / "config.yaml"
    args = ["train", "--config", str(config), "--save_dir", str(save)]
    for item in overrides:
        args += ["--set", item]
    with pytest.raises(error_type) as error:
        dispatch(args)
    assert str(error.value).startswith(message.format(config=config))
    assert "\n" not in str(error.value)
    assert _snapshot(save) == before


def test_train_into_an_unwritable_save_dir_is_one_line_exit_2(imported, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as error:
        dispatch(["train", "--config", str(imported / "config.yaml"), "--save_dir",
                  str(blocker / "save")])
    assert str(error.value) == f"save_dir {blocker}/save: cannot write there (Not a directory)"
    # The command line: one line, exit 2, no traceback; the file is untouched.
    done = subprocess.run([sys.executable, "-m", "projects.twhin", "train", "--config",
                           str(imported / "config.yaml"), "--save_dir", str(blocker)],
                          env=launcher_env(), capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: save_dir {blocker}: exists and is not a directory"
    assert blocker.read_text() == "x"


def test_global_negatives_estimate_names_field_and_bytes():
    config = load_config_from_yaml(TwhinConfig, LOCAL)
    config.train_data.global_negatives = 10_000_000
    need = step_bytes(500, 10_000_000, 2, 4)
    assert need > 2 * 500 * 10_000_000 * 40
    with pytest.raises(ConfigError) as error:
        check_step_memory(config, "c.yaml", workers_per_node=2, memory=64 << 30)
    assert str(error.value) == (
        f"c.yaml: train_data.global_negatives: one step needs about {need / 2**40:.1f} TiB per "
        "worker (per_replica_batch_size=500, global_negatives=10000000, 2 tables of dim 4), "
        "more than the 32.0 GiB of memory each of 2 worker(s) has here; lower it")
    config.train_data.global_negatives = 100
    check_step_memory(config, "c.yaml", workers_per_node=2, memory=64 << 30)


@pytest.mark.parametrize("argv, message", [
    (["--save-dir={tmp}/mine"], "unknown flag --save-dir (did you mean --save_dir?)"),
    (["--save_dir={tmp}/mine", "--nproc-per-node=2"],
     "unknown flag --nproc-per-node (did you mean --nproc_per_node?)"),
    (["--save_dir={tmp}/mine", "--save_dri=x"], "unknown flag --save_dri (did you mean "
     "--save_dir?)"),
    (["--save={tmp}/mine"], "unknown flag --save (did you mean --save_dir?)"),
])
def test_run_py_refuses_unknown_flags(tmp_path, monkeypatch, argv, message):
    argv = [f"--config_yaml_path={LOCAL}"] + [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(ConfigError) as error:
        run.main(argv)
    assert str(error.value) == message
    # A torchrun-started worker parses the same flags the same way, before any training.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?")):
        run.main(argv)
    assert os.listdir(tmp_path) == []


def test_run_py_without_any_save_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        run.main([f"--config_yaml_path={LOCAL}"])
    assert str(error.value) == (f"{LOCAL}: no save_dir: pass --save_dir or set "
                                "training.save_dir (there is no default, so that two runs "
                                "never share one)")
    done = subprocess.run([sys.executable, os.path.join(REPO, "projects", "twhin", "run.py"),
                           f"--config_yaml_path={LOCAL}", f"--save-dir={tmp_path}/x"],
                          env=launcher_env(), capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown flag --save-dir (did you mean --save_dir?)"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "c.yaml", "--save-dir", "s"],
     "unknown flag --save-dir (did you mean --save_dir?)"),
    (["evaluate", "--config", "c.yaml", "--checkpoint", "s", "--jsn"],
     "unknown flag --jsn (did you mean --json?)"),
    (["export", "--config", "c.yaml", "--checkpoint", "s", "--out", "o", "--froce"],
     "unknown flag --froce (did you mean --force?)"),
    (["neighbors", "--embeddings", "e", "--entity", "x", "--top-k", "3"],
     "unknown flag --top-k (did you mean --k?)"),
    (["import", "--triples", "t", "--out", "o", "--valid_data", "v"],
     "unknown flag --valid_data (did you mean --valid?)"),
    (["train", "--config", "c.yaml", "--save_dir", "s", "extra"], "unexpected argument 'extra'"),
])
def test_twhin_commands_refuse_unknown_flags(argv, message):
    with pytest.raises(ConfigError) as error:
        dispatch(argv)
    assert str(error.value) == message


@pytest.mark.slow
def test_train_from_a_directory_with_yaml_specials_uses_that_directory(tmp_path):
    """`${CONFIG_DIR}` of `my #g ...` used to become `my` (the YAML comment cut it)."""
    weird = tmp_path / "my #g: 'q' ${HOME} $$x"
    tsv = _write_tsv(tmp_path / "edges.tsv", _triples(), header=True)
    dispatch(["import", "--triples", tsv, "--out", str(weird), "--dim", "4", "--seed", "1"])
    (tmp_path / "my").mkdir()                      # the sibling the old substitution chose
    save = tmp_path / "save"
    done = subprocess.run([sys.executable, "-m", "projects.twhin", "train", "--config",
                           str(weird / "config.yaml"), "--save_dir", str(save),
                           "--nproc_per_node", "1", "--set", "training.num_train_steps=2",
                           "--set", "model.translation_optimizer.sgd.lr=0.5"],
                          env=launcher_env(), capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    effective = load_config_from_yaml(TwhinConfig, str(save / "twhin_config.yaml"))
    assert effective.train_data.data_root == f"{weird}/train"
    assert effective.validation_data.data_root == f"{weird}/validation"
    assert (save / "2").is_dir() and os.listdir(tmp_path / "my") == []
