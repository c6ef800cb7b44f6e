"""`tml launch` with `readers: {per_node: N}`: each node starts its reader processes before
its torchrun agent and its trainers pull from them. Real agents, real reader processes,
real training on the local backend; the losses at every logged step are those of the same
workflow reading in-process (one node with 2 readers, two nodes with a reader each). The
SLURM script and the local plan are checked with --dry-run; bad values are one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from projects.twhin.data.generate import generate_graph
from tests.twhin_setup import REPO, launcher_env, small_twhin_config
from tml.launch.cli import main

RUN = Path(REPO) / "projects" / "twhin" / "run.py"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph")
    generate_graph(str(out), num_users=500, num_tweets=200, num_edges=8000,
                   num_communities=4, seed=3, validation_fraction=0.05)
    return out


def _workflow(directory: Path, graph: Path, nodes: int, readers: int | None) -> Path:
    directory.mkdir()
    small_twhin_config(directory / "twhin.yaml", graph, 500, 200, 50, train_log_every_n=5,
                       eval_log_every_n=10**6, num_eval_steps=2, num_epochs=1,
                       num_train_steps=30, checkpoint_every_n=1000)
    workflow = {"name": "twhin-readers", "file": str(RUN),
                "args": ["--config_yaml_path=twhin.yaml", "--save_dir=checkpoints"],
                "nodes": nodes, "working_dir": str(directory),
                "environment": {"PYTHONPATH": REPO},
                "resources": {"cpu": 1, "gpu": {"count": 0}}}
    if readers is not None:
        workflow["readers"] = {"per_node": readers, "start_timeout_s": 240}
    path = directory / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


def _launch(workflow: Path, runs: Path) -> str:
    """Run the workflow on the local backend; every node's log, concatenated."""
    result = subprocess.run([sys.executable, "-m", "tml.launch", str(workflow),
                             "--runs-dir", str(runs)], env=launcher_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    return "".join(log.read_text() for log in sorted((run_dir / "logs").glob("node-*.log")))


def _losses(log: str) -> list[tuple[str, str]]:
    return sorted(re.findall(r"step (\d+): loss ([0-9.]+)", log))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 1)])
def test_workflow_readers_train_as_in_process_reading(tmp_path, graph, nodes, per_node):
    plain = _launch(_workflow(tmp_path / "plain", graph, nodes, None), tmp_path / "runs")
    fed = _launch(_workflow(tmp_path / "fed", graph, nodes, per_node), tmp_path / "runs")
    assert fed.count(f"started {per_node} reader(s) beside the trainers: 127.0.0.1:") == nodes
    # Each node's trainer is served by its own node's readers (node scope).
    for rank in range(nodes):
        for part in range(per_node):
            assert re.search(rf"serving rank {rank} \(part {part} of {per_node}\) from batch 0",
                             fed), fed[-3000:]
    assert "started" not in plain
    want, got = _losses(plain), _losses(fed)
    assert len(want) == 6 and got == want, (got, want)
    # The readers were stopped with their node (SIGTERM): no reader outlives the run.
    assert fed.count("stopped after") == nodes * per_node, fed[-3000:]


def _write(directory: Path, **fields: object) -> Path:
    (directory / "script.py").write_text("print('hello')\n")
    path = directory / "workflow.yaml"
    path.write_text(yaml.safe_dump({"name": "wf", "file": "script.py",
                                    "working_dir": str(directory), **fields}))
    return path


def test_dry_runs_start_the_readers_before_each_agent(tmp_path, capsys):
    path = _write(tmp_path, nodes=2, args=["--x=1"], readers=3)
    main(["launch", str(path), "--dry-run"])
    out = capsys.readouterr().out
    nodes = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(nodes) == 2
    for line in nodes:
        wrapper, agent = line.split(" -- ")
        assert "tml.launch.node_readers" in wrapper and "--readers 3" in wrapper
        assert "--world-size 2 --trainers-per-node 1 --reader-argc 3" in wrapper
        assert agent.split(" -m torch.distributed.run")[0].endswith(" script.py --x=1 "
                                                                    + sys.executable)
    main(["launch", str(path), "--backend", "slurm", "--dry-run", "--runs-dir",
          str(tmp_path / "runs")])
    out = capsys.readouterr().out
    node_script = out.split("node.sh\n", 1)[1]
    last = node_script.strip().splitlines()[-1]
    assert last.startswith("exec ") and "tml.launch.node_readers" in last
    assert '--rdzv_endpoint "$TML_RDZV_ENDPOINT"' in last
    assert subprocess.run(["bash", "-n"], input=node_script, text=True).returncode == 0
    assert not (tmp_path / "runs").exists()
    main(["launch", str(path), "--backend", "kubernetes", "--dry-run", "--image", "reg/tml:1"])
    job = yaml.safe_load(capsys.readouterr().out)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        script = spec["template"]["spec"]["containers"][0]["command"][2]
        last = script.strip().splitlines()[-1]
        # The image's tml starts the pod's readers, then the agent.
        assert last.startswith("exec python -m tml.launch.node_readers --readers 3 "), last
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    plain = _write(tmp_path)
    main(["launch", str(plain), "--dry-run"])
    assert "node_readers" not in capsys.readouterr().out


@pytest.mark.parametrize("readers,message", [
    (True, "True is not a reader count"),
    ({"per_node": -1}, "readers.per_node"),
    ({"per_node": 1, "hosts": 2}, "readers.hosts"),
    ({"per_node": 1, "start_timeout_s": 0}, "readers.start_timeout_s"),
])
def test_bad_reader_fields_are_one_line(tmp_path, capsys, readers, message):
    path = _write(tmp_path, readers=readers)
    with pytest.raises(SystemExit) as exit_code:
        main(["launch", str(path), "--dry-run"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _two_nodes(config: str, save_dir: Path) -> str:
    """`run.py --nproc_per_node=2` on two nodes of this host (TML_NUM_NODES=2, the chief
    first); both launchers' output."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"TML_NUM_NODES": "2", "TML_RDZV_ENDPOINT": f"127.0.0.1:{port}",
              "TML_RUN_ID": save_dir.name, "TML_RDZV_TIMEOUT": "300"}
    cmd = [sys.executable, str(RUN), f"--config_yaml_path={config}", f"--save_dir={save_dir}",
           "--nproc_per_node=2"]
    procs = [subprocess.Popen(cmd, env=launcher_env(**common, TML_IS_CHIEF="1"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    deadline = time.monotonic() + 240
    while True:   # the chief's rendezvous store first
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert procs[0].poll() is None and time.monotonic() < deadline, \
            procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    procs.append(subprocess.Popen(cmd, env=launcher_env(**common), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return "".join(outputs)


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_each_nodes_launcher_starts_readers_for_its_own_trainers(tmp_path, graph):
    """maybe_run_training on two nodes x 2 workers with readers.num_readers 1: each node's
    launcher starts one reader serving its node's 2 trainers; losses as in-process."""
    def config(name, readers):
        path = small_twhin_config(tmp_path / name, graph, 500, 200, 50, train_log_every_n=5,
                                  eval_log_every_n=10**6, num_eval_steps=2, num_epochs=1,
                                  num_train_steps=30, checkpoint_every_n=1000)
        if readers:
            data = yaml.safe_load(open(path))
            data["readers"] = {"num_readers": readers}
            yaml.safe_dump(data, open(path, "w"))
        return path
    plain = _two_nodes(config("plain.yaml", 0), tmp_path / "plain")
    fed = _two_nodes(config("fed.yaml", 1), tmp_path / "fed")
    assert fed.count("started 1 reader(s) beside the trainers: 127.0.0.1:") == 2
    # One reader per node serves both of its node's ranks (ranks 0-1 on one, 2-3 on the other).
    assert len(set(re.findall(r"serving rank (\d) \(part 0 of 1\) from batch 0", fed))) == 4
    want, got = _losses(plain), _losses(fed)
    assert len(want) == 6 and got == want, (got, want)
