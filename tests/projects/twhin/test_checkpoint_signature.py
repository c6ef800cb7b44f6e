"""Checkpoints record how the model scores; a config that disagrees is refused on load.

Fast tests save with `save_checkpoint` in this process (no process group); the slow one
trains for real (`projects/twhin/run.py`, 1 worker) and then resumes and evaluates that
save_dir with a config whose operator differs.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from projects.twhin.config import TwhinConfig
from projects.twhin.signature import (
    SIGNATURE_KEY,
    check_checkpoint_matches,
    checkpoint_extra,
    model_signature,
)
from tests.twhin_setup import LOCAL, REPO, launcher_env
from tml.common.checkpointing import EXTRA_FILE, TMP_PREFIX, read_extra, save_checkpoint
from tml.core.config import load_config_from_yaml
from tml.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(process group|no_dist|assuming the intent).*:UserWarning")


def _config(**changes) -> TwhinConfig:
    """local.yaml's config with `model` changes applied (`relation0_operator`, `dim`, ...)."""
    data = yaml.safe_load(open(LOCAL).read())
    model = data["model"]
    if "relation0_operator" in changes:
        model["relations"][0]["operator"] = changes["relation0_operator"]
    if "dim" in changes:
        for table in model["embeddings"]["tables"]:
            table["embedding_dim"] = changes["dim"]
    if "users" in changes:
        model["embeddings"]["tables"][0]["num_embeddings"] = changes["users"]
    if "swap_relations" in changes:
        model["relations"][0], model["relations"][1] = model["relations"][1], \
            model["relations"][0]
    return TwhinConfig.model_validate(data)


def _save(tmp_path, extra, step=1) -> str:
    return save_checkpoint(str(tmp_path / "save"), step, {"model": torch.nn.Linear(2, 2)},
                           extra=extra)


def test_extra_is_saved_inside_the_checkpoint_and_read_back(tmp_path):
    path = _save(tmp_path, {"a": [1, 2], "b": "x"})
    assert read_extra(path) == {"a": [1, 2], "b": "x"}
    assert os.path.isfile(os.path.join(path, EXTRA_FILE))
    assert read_extra(_save(tmp_path, None, step=2)) is None   # optional
    with pytest.raises(CheckpointError, match="extra is not JSON-serialisable"):
        _save(tmp_path, {"bad": object()}, step=3)
    assert sorted(os.listdir(tmp_path / "save")) == ["1", "2"]   # nothing half-written
    assert not [n for n in os.listdir(tmp_path / "save") if n.startswith(TMP_PREFIX)]
    (tmp_path / "save" / "2" / EXTRA_FILE).write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_extra(str(tmp_path / "save" / "2"))


def test_signature_names_relations_operators_dim_and_tables():
    signature = model_signature(_config(relation0_operator="diagonal"))
    assert signature["embedding_dim"] == 4
    assert set(signature["tables"]) == {"user", "tweet"}
    assert signature["relations"][0] == {"name": "fav", "lhs": "user", "rhs": "tweet",
                                         "operator": "diagonal"}
    assert json.loads(json.dumps(signature)) == signature


@pytest.mark.parametrize("changes, message", [
    ({"relation0_operator": "diagonal"}, "relation 'fav' was trained with operator "
     "'translation', the config says 'diagonal'"),
    ({"swap_relations": True}, "the relations are in another order"),
    ({"dim": 6}, "it was trained with embedding_dim"),
    ({"users": 7}, "table 'user' was trained with"),
])
def test_a_config_that_scores_differently_is_refused_with_one_line(tmp_path, changes,
                                                                   message):
    path = _save(tmp_path, checkpoint_extra(_config()))
    check_checkpoint_matches(_config(), path)                 # the same config: fine
    check_checkpoint_matches(_config(), str(tmp_path / "save"))   # a save_dir: its newest
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_matches(_config(**changes), path)
    assert str(error.value).startswith(f"checkpoint {path}: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_without_a_signature_passes_with_a_warning(tmp_path, caplog):
    path = _save(tmp_path, None)
    with caplog.at_level(logging.WARNING, logger="projects.twhin.signature"):
        check_checkpoint_matches(_config(relation0_operator="diagonal"), path)
    assert "records no model signature" in caplog.text
    other = _save(tmp_path, {"something": "else"}, step=2)   # extra without a signature
    check_checkpoint_matches(_config(), other)


@pytest.mark.slow
def test_training_records_the_signature_and_resume_or_evaluate_with_another_operator_fails(
        tmp_path, small_trained_twhin):
    import shutil

    config = small_trained_twhin["config"]          # trained once per run: steps 5 and 10
    save = tmp_path / "save"
    shutil.copytree(small_trained_twhin["save"], save)

    def run(config_path, *extra):
        return subprocess.run([sys.executable, os.path.join(REPO, "projects", "twhin", "run.py"),
                               f"--config_yaml_path={config_path}", f"--save_dir={save}",
                               "--nproc_per_node=1", *extra], env=launcher_env(),
                              capture_output=True, text=True, timeout=240, cwd=REPO)

    trained = load_config_from_yaml(TwhinConfig, config)
    for step in ("5", "10"):
        saved = read_extra(str(save / step))
        assert saved is not None
        assert saved[SIGNATURE_KEY] == model_signature(trained)
    shutil.rmtree(save / "10")                      # the run to resume: step 5 of 10

    data = yaml.safe_load(open(config).read())
    data["model"]["relations"][0]["operator"] = "diagonal"
    data["training"]["num_train_steps"] = 10      # so that it resumes from step 5
    other = tmp_path / "diagonal.yaml"
    other.write_text(yaml.safe_dump(data))
    expected = (f"checkpoint {save / '5'}: relation 'fav' was trained with operator "
                "'translation', the config says 'diagonal'")
    for extra in ((), ("--only_evaluate",)):
        failed = run(str(other), *extra)
        assert failed.returncode != 0, extra
        assert expected in failed.stderr, (extra, failed.stderr[-3000:])
    assert [name for name in os.listdir(save) if name.isdigit()] == ["5"]   # nothing trained
