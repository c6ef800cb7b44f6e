"""Hostile and damaged checkpoints through the real entry points.

`python -m projects.twhin evaluate|export` on a checkpoint whose `.metadata` was replaced by
a command-running pickle (checksum forged to match): exit 2, one `error:` line naming the
file, nothing run. Damaged bytes through the same commands (in-process) name the file; a
save_dir whose newest checkpoint is damaged is read from the newest intact one. Resume
through projects/twhin/run.py skips torn and damaged checkpoints (slow: trains).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from projects.twhin.cli import dispatch
from projects.twhin.config import TwhinConfig
from projects.twhin.export import RELATIONS_KEY, TABLE_KEY
from projects.twhin.signature import checkpoint_extra
from tests.tml.common.test_checkpoint_trust import GADGET_NAMES, _flip, _gadgets, _replace_metadata
from tests.twhin_setup import REPO, launcher_env
from tml.common.checkpointing import save_checkpoint, verify_checkpoint
from tml.core.config import load_config_from_yaml
from tml.errors import CheckpointError


class _Part:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        pass


def _triples():
    rows = [(f"user:u{u}", "buys", f"item:i{(u * 7 + k) % 6}") for u in range(12) for k in (0, 1)]
    rows += [(f"user:u{u}", "follows", f"user:u{(u + 1) % 12}") for u in range(12)]
    return rows


@pytest.fixture
def project(tmp_path):
    """Imported data and a save_dir with checkpoints 3 and 7 (written with checksums)."""
    tsv = tmp_path / "edges.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in _triples()) + "\n")
    out = tmp_path / "data"
    dispatch(["import", "--triples", str(tsv), "--out", str(out), "--dim", "4", "--seed", "1"])
    config = load_config_from_yaml(TwhinConfig, str(out / "config.yaml"))
    save = tmp_path / "save"
    for step in (3, 7):
        g = torch.Generator().manual_seed(step)
        state = {TABLE_KEY.format(t.name)[len("model."):]: torch.randn(t.num_embeddings, 4,
                                                                       generator=g)
                 for t in config.model.embeddings.tables}
        state[RELATIONS_KEY[len("model."):]] = torch.randn(len(config.model.relations), 4,
                                                           generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            save_checkpoint(str(save), step, {"model": _Part(state)},
                            extra=checkpoint_extra(config))
    return out / "config.yaml", save


def _twhin(*args):
    return subprocess.run([sys.executable, "-m", "projects.twhin", *map(str, args)],
                          env=launcher_env(), capture_output=True, text=True, cwd=REPO,
                          timeout=180)


@pytest.mark.slow
def test_evaluate_and_export_refuse_a_hostile_metadata_and_run_nothing(project, tmp_path):
    config, save = project
    marker = tmp_path / "pwned"
    for step in (3, 7):
        _replace_metadata(str(save / str(step)), _gadgets(str(marker))[GADGET_NAMES[0]])
    metadata = save / "7" / ".metadata"
    runs = {"evaluate": _twhin("evaluate", "--config", config, "--checkpoint", save / "7"),
            "export": _twhin("export", "--config", config, "--checkpoint", save,
                             "--out", tmp_path / "emb")}
    for command, result in runs.items():
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert last.startswith("error: ") and str(metadata) in last, (command, last)
        assert "refers to torch.distributed.checkpoint.metadata.os.system" in last, last
        assert "Traceback" not in result.stderr
        assert not marker.exists(), command
    assert "no intact checkpoint in" in runs["export"].stderr
    assert not (tmp_path / "emb").exists()


def test_evaluate_and_export_name_a_damaged_file_and_use_the_newest_intact(project, tmp_path,
                                                                          caplog):
    config, save = project
    damaged = _flip(str(save / "7"), "__0_0.distcp")
    message = (f"checkpoint {save / '7'} is damaged: {damaged} does not match the sha256 "
               "recorded when it was saved")
    for command in (["evaluate"], ["export", "--out", str(tmp_path / "emb7")]):
        with pytest.raises(CheckpointError) as error:
            dispatch([command[0], "--config", str(config), "--checkpoint", str(save / "7"),
                      *command[1:]])
        assert str(error.value) == message
    assert not (tmp_path / "emb7").exists()
    with caplog.at_level(logging.WARNING):
        dispatch(["export", "--config", str(config), "--checkpoint", str(save),
                  "--out", str(tmp_path / "emb")])
    assert f"skipping the damaged checkpoint {save / '7'}" in caplog.text
    assert f"using {save / '3'}, the newest intact checkpoint" in caplog.text
    assert (tmp_path / "emb").is_dir()


@pytest.mark.slow
def test_resume_skips_torn_hostile_and_damaged_checkpoints(tmp_path, small_trained_twhin):
    config = small_trained_twhin["config"]          # trained once per run: steps 5 and 10
    save = tmp_path / "save"
    shutil.copytree(small_trained_twhin["save"], save)
    marker = tmp_path / "pwned"

    def run(steps):
        data = yaml.safe_load(open(config).read())
        data["training"]["num_train_steps"] = steps
        path = tmp_path / f"steps{steps}.yaml"
        path.write_text(yaml.safe_dump(data))
        return subprocess.run([sys.executable, os.path.join(REPO, "projects", "twhin", "run.py"),
                               f"--config_yaml_path={path}", f"--save_dir={save}",
                               "--nproc_per_node=1"], env=launcher_env(),
                              capture_output=True, text=True, timeout=240, cwd=REPO)

    _replace_metadata(str(save / "10"), _gadgets(str(marker))[GADGET_NAMES[0]])  # hostile
    shutil.copytree(save / "5", save / "12")
    os.remove(save / "12" / ".metadata")                                          # torn copy
    resumed = run(15)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    log = resumed.stderr
    assert f"skipping {save / '12'}: not a complete checkpoint" in log, log[-3000:]
    assert f"skipping the damaged checkpoint {save / '10'}" in log, log[-3000:]
    assert f"resumed from {save / '5'} at step 5" in log, log[-3000:]
    assert (save / "15" / "checksums.json").is_file()

    verify_checkpoint(str(save / "10"))      # the hostile one was replaced by a new save
    assert not marker.exists()

    # Every complete checkpoint damaged: the run stops with one line, trains nothing.
    complete = [n for n in os.listdir(save) if n.isdigit() and (save / n / ".metadata").exists()]
    assert "15" in complete
    for step in complete:
        _flip(str(save / step), "__0_0.distcp")
    failed = run(20)
    assert failed.returncode != 0
    assert f"no intact checkpoint in {save}: checkpoint {save / '15'} is damaged" in \
        failed.stderr, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert not (save / "20").exists() and not marker.exists()
