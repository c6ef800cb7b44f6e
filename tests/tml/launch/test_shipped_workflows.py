"""The workflow files the repository ships, launched as a user launches them: the local
ones for real (`tml launch FILE`, two node agents on this machine), the SLURM and
Kubernetes ones as the script and manifest they become (`--dry-run`; the SLURM cluster
runs in test_launch_slurm.py use a tiny workflow, and there is no Kubernetes cluster).

A launch writes where the workflow says, relative to the repository (data/, runs/): each
test launches the shipped file, byte for byte, from a copy of the checkout's code, so it
leaves nothing in the checkout and never resumes a run a user left there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tml.launch.test_launch_workflow import REPO, launch
from tml.launch.cli import main

TWHIN_WORKFLOWS = REPO / "projects" / "twhin" / "workflows"
RECAP_WORKFLOWS = REPO / "projects" / "home" / "recap" / "workflows"
# TwHIN steps of the launched local workflow: a launch, a checkpoint, not learning.
STEPS = 20


def checkout_copy(root: Path) -> Path:
    """tml/ and projects/ of this checkout copied to `root` (no data, no runs)."""
    for name in ("tml", "projects"):
        shutil.copytree(REPO / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


def shipped(root: Path, relative: str) -> Path:
    """The copy of a shipped workflow file, checked to be the shipped bytes."""
    path = root / relative
    assert path.read_bytes() == (REPO / relative).read_bytes()
    return path


def node_logs(run_dir: Path) -> str:
    return "".join((run_dir / "logs" / f"node-{i}.log").read_text() for i in (0, 1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_twhin_local_workflow_trains_on_two_nodes_and_brings_the_checkpoint_back(tmp_path):
    """twhin-local.yaml: before_run generates the built-in graph (once, under its lock),
    2 agents x 1 worker meet by c10d, the checkpoint comes back as an artifact, each node's
    log is kept. The config it names is the shipped local.yaml with training cut to 20
    steps (what is checked is that the shipped file launches as written, not learning:
    test_make_train.py checks that; two epochs of 2M edges would take minutes); every other
    field as shipped."""
    root = checkout_copy(tmp_path / "checkout")
    workflow = shipped(root, "projects/twhin/workflows/twhin-local.yaml")
    config_path = root / "projects" / "twhin" / "config" / "local.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["training"]["num_train_steps"] = STEPS
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    result = launch([str(workflow), "--runs-dir", str(tmp_path / "runs")], timeout=840)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "twhin-local"
    logs = node_logs(run_dir)
    assert f"done: step {STEPS}, final loss" in logs and "held-out AUC" in logs, logs[-3000:]
    # An artifact comes back at its path relative to the working_dir.
    checkpoint = run_dir / "artifacts" / "runs" / "twhin-local" / "checkpoints" / str(STEPS)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in checkpoint.iterdir()}
    # The graph was generated inside the working_dir, where the config's data_root points.
    assert (root / "data" / "twhin" / "train").is_dir()
    assert (root / "runs" / "twhin-local" / "checkpoints" / str(STEPS)).is_dir()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_recap_local_workflow_trains_the_original_config_on_two_nodes(tmp_path):
    """recap-local.yaml as shipped: generated data, the original local_prod.yaml (10 steps,
    checkpoints at 5 and 10), per-task metrics written at the end and brought back. The
    config evaluates once, at the end, where the original evaluates its 12 validation sets
    after every step (most of the test's time, and not what it checks: the evaluation
    itself is checked by the final metrics); every other field as shipped."""
    root = checkout_copy(tmp_path / "checkout")
    workflow = shipped(root, "projects/home/recap/workflows/recap-local.yaml")
    config_path = root / "projects" / "home" / "recap" / "config" / "local_prod.yaml"
    config = config_path.read_text()
    assert config.count("\n  eval_log_every_n: 1\n") == 1
    config_path.write_text(config.replace("\n  eval_log_every_n: 1\n",
                                          "\n  eval_log_every_n: 1000\n"))

    result = launch([str(workflow), "--runs-dir", str(tmp_path / "runs")], timeout=840)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "recap-local"
    artifacts = run_dir / "artifacts" / "runs" / "recap-local" / "checkpoints"
    for step in ("5", "10"):
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= \
            {p.name for p in (artifacts / step).iterdir()}, step
    final = json.loads((artifacts / "final_metrics.json").read_text())
    assert final["step"] == 10
    assert any(key.startswith("auc") for key in final["metrics"]), final
    assert (root / "data" / "recap").is_dir()


def test_twhin_slurm_workflow_becomes_a_valid_requeueable_batch_script(tmp_path, capsys):
    """twhin-slurm.yaml as shipped (--dry-run: the sbatch script and the per-node script)."""
    main(["launch", str(TWHIN_WORKFLOWS / "twhin-slurm.yaml"), "--backend", "slurm",
          "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    for directive in ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem=8192M",
                      "--time=01:00:00", "--requeue"]:
        assert f"#SBATCH {directive}\n" in out, directive
    assert "python -m projects.twhin.data.generate --out data/twhin" in out
    assert "--config_yaml_path=projects/twhin/config/local.yaml" in out
    assert "--save_dir=runs/twhin-slurm/checkpoints" in out
    batch, node = out.split("# ", 1)[1].split("\n# " + str(tmp_path))
    for script in (batch, node):
        text = script.split("\n", 1)[1]
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, text
    assert not (tmp_path / "runs").exists()


def test_every_shipped_workflow_is_launched_by_a_test():
    """A new workflow file needs its own launch test here."""
    names = sorted(p.name for p in [*TWHIN_WORKFLOWS.glob("*.yaml"),
                                    *RECAP_WORKFLOWS.glob("*.yaml")])
    assert names == ["recap-local.yaml", "twhin-kubernetes.yaml", "twhin-local.yaml",
                     "twhin-slurm.yaml"]   # kubernetes: test_launch_workflow.py's dry run
