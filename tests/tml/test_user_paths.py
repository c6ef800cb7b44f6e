"""User paths outside the Python API: the installed console scripts and the logging and
debugging switches (TML_DEBUG, TML_LOG_ALL_RANKS, TML_LOG_LEVEL), as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require
from tests.twhin_setup import REPO, launcher_env

BIN = os.path.dirname(sys.executable)


def _script(name: str) -> str:
    path = os.path.join(BIN, name)
    require(os.access(path, os.X_OK),
            f"no console script {path}: `make venv` installs the project (pip install -e .)")
    return path


@pytest.mark.parametrize("name,words", [
    ("twhin", ("import", "train", "evaluate", "export", "neighbors")),
    ("tml", ("launch",)),
])
def test_installed_console_scripts_print_their_usage(name: str, words: tuple[str, ...]) -> None:
    done = subprocess.run([_script(name), "--help"], capture_output=True, text=True,
                          env=launcher_env(), cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {name}"), done.stdout[:300]
    for word in words:
        assert word in done.stdout, (word, done.stdout)


def test_installed_twhin_reports_a_bad_input_in_one_line_and_tml_debug_shows_why(
        tmp_path) -> None:
    twhin = _script("twhin")
    missing = tmp_path / "missing.tsv"
    args = [twhin, "import", "--triples", str(missing), "--out", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, env=launcher_env(), cwd=REPO,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], \
        done.stderr
    debug = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120,
                           env=launcher_env(TML_DEBUG="1"))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert lines[0][len("error: "):] in debug.stderr   # the same message, with its cause
    assert not (tmp_path / "out").exists()


_LOG_CASES = r"""
import json, logging, os, sys
import tml.ml_logging as ml

results = {}
for case, env in json.loads(sys.argv[1]).items():
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if getattr(h, "name", None) != "tml"]
    for key in ("RANK", "TML_LOG_ALL_RANKS", "TML_LOG_LEVEL"):
        os.environ.pop(key, None)
    os.environ.update(env)
    ml.setup_logging()
    handler = next(h for h in root.handlers if h.name == "tml")
    lines = []
    handler.emit = lambda record, lines=lines: lines.append(handler.format(record))
    log = logging.getLogger("tml.check")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    results[case] = lines
print(json.dumps(results))
"""


def test_logging_switches_choose_ranks_and_level() -> None:
    cases = {
        "rank0": {"RANK": "0"},
        "rank1": {"RANK": "1"},
        "rank1_all": {"RANK": "1", "TML_LOG_ALL_RANKS": "1"},
        "rank0_warning": {"RANK": "0", "TML_LOG_LEVEL": "WARNING"},
        "launcher_debug": {"TML_LOG_LEVEL": "DEBUG"},
    }
    done = subprocess.run([sys.executable, "-c", _LOG_CASES, json.dumps(cases)],
                          capture_output=True, text=True, env=launcher_env(), cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {case: [line.split(" ", 1)[1] for line in lines]   # without the time
           for case, lines in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    assert got == {
        "rank0": ["[rank 0] INFO tml.check: an info line",
                  "[rank 0] WARNING tml.check: a warning line"],
        "rank1": ["[rank 1] WARNING tml.check: a warning line"],
        "rank1_all": ["[rank 1] INFO tml.check: an info line",
                      "[rank 1] WARNING tml.check: a warning line"],
        "rank0_warning": ["[rank 0] WARNING tml.check: a warning line"],
        "launcher_debug": ["[launcher] DEBUG tml.check: a debug line",
                           "[launcher] INFO tml.check: an info line",
                           "[launcher] WARNING tml.check: a warning line"],
    }


@pytest.mark.gpu
def test_more_workers_than_gpus_is_refused_naming_the_count_and_the_cpu_way_out() -> None:
    from tests.conftest import gpu_env

    code = ("import torch, sys; from tml.common.run_training import check_nproc_per_node;"
            "from tml.errors import TmlError\n"
            "n = torch.cuda.device_count(); assert n > 0, 'torch without CUDA'\n"
            "try:\n    check_nproc_per_node(n + 1)\nexcept TmlError as e:\n"
            "    print(n, e); sys.exit(0)\nsys.exit('not refused')")
    done = subprocess.run([sys.executable, "-c", code], env=gpu_env(), capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    count, message = done.stdout.strip().split(" ", 1)
    assert message == (f"nproc_per_node={int(count) + 1} but this node has {count} CUDA "
                       "device(s): each worker needs its own GPU; lower nproc_per_node or set "
                       "CUDA_VISIBLE_DEVICES=\"\" to run on CPU")


@pytest.mark.slow
def test_warm_start_from_the_yaml_through_run_py(tmp_path, small_trained_twhin) -> None:
    """`training.initial_checkpoint_dir` in the YAML: run.py starts at step 0 from those
    weights (not resuming its step), saves into its own save_dir and leaves the source."""
    import yaml

    source = os.path.join(small_trained_twhin["save"], "10")
    before = sorted(os.listdir(small_trained_twhin["save"]))
    data = yaml.safe_load(open(small_trained_twhin["config"]).read())
    data["training"].update(initial_checkpoint_dir=source, num_train_steps=5)
    config = tmp_path / "warm.yaml"
    config.write_text(yaml.safe_dump(data))
    save = tmp_path / "save"
    done = subprocess.run([sys.executable, small_trained_twhin["run_py"],
                           f"--config_yaml_path={config}", f"--save_dir={save}",
                           "--nproc_per_node=1"], env=launcher_env(), capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warm start: weights from {source}, starting at step 0" in done.stderr, \
        done.stderr[-3000:]
    assert sorted(n for n in os.listdir(save) if n.isdigit()) == ["5"]
    assert sorted(os.listdir(small_trained_twhin["save"])) == before
