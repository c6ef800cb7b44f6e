"""Workflows as dstack's torchrun provider writes them (`.dstack/workflows.yaml`, a
`workflows:` list chosen by name) and every field form of that syntax, each bad value
refused in one line naming the file, the workflow and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.twhin_setup import launcher_env
from tml.launch.cli import main
from tml.launch.workflows_file import load_selected

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"

# The provider's basic example, as the issue quotes it, with 2 nodes and CPU resources.
EXAMPLE = """\
workflows:
  - name: train
    provider: torchrun
    file: "train.py"
    requirements: "requirements.txt"
    artifacts:
      - path: model
    nodes: 2
    resources:
      cpu: 1
"""

# A worker that needs the other node: gloo all_reduce over both, rank 0 saves a "model".
TRAIN = """\
import json
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
if dist.get_rank() == 0:
    os.makedirs("model", exist_ok=True)
    with open("model/weights.txt", "w") as f:
        f.write(f"world={dist.get_world_size()} sum={total.item():g}\\n")
dist.destroy_process_group()
"""


def launch(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m tml.launch ARGV` run in `cwd`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tml.launch", *argv], cwd=cwd,
                          env=launcher_env(), capture_output=True, text=True, timeout=timeout)


def dstack_repo(root: Path, text: str = EXAMPLE) -> Path:
    """A directory laid out as a dstack repository: .dstack/workflows.yaml and train.py."""
    (root / ".dstack").mkdir(parents=True, exist_ok=True)
    (root / ".dstack" / "workflows.yaml").write_text(text)
    (root / "train.py").write_text(TRAIN)
    (root / "requirements.txt").write_text("")
    return root / ".dstack" / "workflows.yaml"


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def workflows_file(directory: Path, *entries: dict) -> Path:
    path = directory / "workflows.yaml"
    path.write_text(yaml.safe_dump({"workflows": list(entries)}, sort_keys=False))
    (directory / "train.py").touch()
    return path


def entry(name: str = "train", **fields: object) -> dict:
    return {"name": name, "provider": "torchrun", "file": "train.py", **fields}


# --- the provider's example runs as written ----------------------------------------------

@pytest.mark.slow
def test_the_dstack_example_runs_as_written_on_two_local_nodes(tmp_path: Path) -> None:
    """`tml launch train` in a dstack repository: two agents meet, the gloo all_reduce sums
    both ranks, and the artifact `model` comes back into the run directory."""
    dstack_repo(tmp_path)
    result = launch(["train", "--runs-dir", "runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "train"
    assert (run_dir / "artifacts" / "model" / "weights.txt").read_text() == \
        "world=2 sum=3\n"
    assert sorted(os.listdir(run_dir / "logs")) == ["node-0.log", "node-1.log"]


def test_file_and_workflow_options_choose_the_entry(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`tml launch train` reads .dstack/workflows.yaml here; `--file F --workflow NAME` and
    `NAME --file F` read F. `--dry-run` shows the chosen workflow's nodes; nothing starts."""
    path = workflows_file(tmp_path, entry("prepare"), entry("train", nodes=3))
    monkeypatch.chdir(tmp_path)
    dstack_repo(tmp_path)
    for argv, nodes in ((["train"], 2), (["--file", str(path), "--workflow", "train"], 3),
                        (["train", "--file", str(path)], 3), (["-f", str(path), "prepare"], 1),
                        ([".dstack/workflows.yaml"], 2)):
        main(["launch", *argv, "--dry-run"])
        assert f"--nnodes {nodes}" in capsys.readouterr().out, argv
    assert not (tmp_path / "runs").exists()


def test_a_single_workflow_file_still_loads_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump({"name": "wf", "file": "train.py"}))
    selected = load_selected(str(path), None)
    assert [w.name for w in selected.runs] == ["wf"]
    assert selected.workflow.nodes == 1 and selected.workflow.provider is None


def test_one_workflow_in_a_list_needs_no_name(tmp_path: Path) -> None:
    path = workflows_file(tmp_path, entry("only"))
    assert load_selected(str(path), None).workflow.name == "only"


# --- choosing a workflow: one line naming the file and the workflow ----------------------

def test_choosing_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error_of(["launch", "train"], capsys) == (
        f"error: no workflow file 'train' and no .dstack/workflows.yaml in {tmp_path} to "
        "find a workflow named 'train' in")
    assert error_of(["launch"], capsys).startswith("error: name a workflow")

    path = workflows_file(tmp_path, entry("a"), entry("b"))
    assert error_of(["launch", "--file", str(path), "--workflow", "c"], capsys) == \
        f"error: {path}: no workflow named 'c' (workflows: a, b)"
    assert error_of(["launch", str(path)], capsys).startswith(
        f"error: {path} holds 2 workflows (a, b): choose one by name")

    path = workflows_file(tmp_path, entry("a"), entry("a"))
    assert error_of(["launch", "--file", str(path), "--workflow", "a"], capsys) == \
        f"error: {path}: workflows.1: name: workflow 'a' is defined twice"
    path = workflows_file(tmp_path, entry("a\nb", provider=None))
    assert error_of(["launch", str(path)], capsys) == (
        f"error: {path}: workflows.0: name: workflow name 'a\\nb' is not a valid name: use "
        "1-64 ASCII letters, digits, '_' or '-', starting with a letter or '_'")
    path = workflows_file(tmp_path, {"provider": "torchrun", "file": "train.py"})
    assert error_of(["launch", str(path)], capsys) == \
        f"error: {path}: workflows.0: name: Field required"
    path = workflows_file(tmp_path, entry("a", provider="docker"))
    assert error_of(["launch", str(path)], capsys) == (
        f"error: {path}: workflow a: provider: 'docker' is not supported: tml launch runs "
        "provider: torchrun")
    path = workflows_file(tmp_path, {"name": "a", "file": "train.py"})
    assert error_of(["launch", str(path)], capsys) == (
        f"error: {path}: workflow a: provider: Field required (tml launch runs provider: "
        "torchrun)")
    path.write_text(yaml.safe_dump({"workflows": [entry("a")], "variables": {}}))
    assert error_of(["launch", str(path)], capsys).startswith(
        f"error: {path}: variables: unknown field")
    path.write_text("workflows: train\n")
    assert error_of(["launch", str(path)], capsys) == \
        f"error: {path}: workflows: expected a list of workflows"
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump({"name": "one", "file": "train.py"}))
    assert error_of(["launch", "--file", str(single), "--workflow", "two"], capsys) == \
        f"error: {single}: no workflow named 'two' (the file holds one workflow, 'one')"
    assert not (tmp_path / "runs").exists()


# --- every field form, and every field's bad value ----------------------------------------

def test_the_field_forms_of_the_dstack_syntax(tmp_path: Path) -> None:
    path = workflows_file(tmp_path, entry(
        args="--lr 0.1 --name 'two words' \"x;y\"",
        environment=["A=1", "B=x=y", "EMPTY="],
        artifacts=["out", {"path": "model"}],
        resources={"cpu": 2, "memory": "16GB", "shm_size": "2GB", "gpu": 0,
                   "interruptible": True},
        version=HERE, requirements="requirements.txt",
        before_run="echo hi", working_dir=str(tmp_path)))
    workflow = load_selected(str(path), "train").workflow
    assert workflow.args == ["--lr", "0.1", "--name", "two words", "x;y"]
    assert workflow.environment == {"A": "1", "B": "x=y", "EMPTY": ""}
    numbers = workflows_file(tmp_path, entry(environment={"PORT": 8080, "RATE": 0.5}))
    assert load_selected(str(numbers), None).workflow.environment == \
        {"PORT": "8080", "RATE": "0.5"}
    assert workflow.artifacts == ["out", "model"]
    assert workflow.resources.gpu.count == 0 and workflow.resources.interruptible
    assert workflow.resources.memory == "16GB" and workflow.resources.shm_size == "2GB"
    assert workflow.requirements_file == "requirements.txt"
    assert workflow.requirement_specs == [] and workflow.before_run == ["echo hi"]
    assert workflow.nodes == 1

    gpu = workflows_file(tmp_path, entry(resources={"gpu": {"count": 4, "name": "K80",
                                                            "memory": "12GB"}}))
    resources = load_selected(str(gpu), "train").workflow.resources
    assert (resources.gpu.count, resources.gpu.name, resources.gpu.memory) == (4, "K80", "12GB")
    assert load_selected(str(workflows_file(tmp_path, entry(resources={"gpu": 2}))),
                         None).workflow.nproc_per_node == 2


def test_the_spellings_of_dstack_s_provider_source_and_readme(tmp_path: Path) -> None:
    """dstack's torchrun provider reads `script` or `file` (its README writes `script`), its
    schema puts `nodes` under resources too and allows the version as a number (YAML reads
    3.10 as 3.1), and `depends-on` entries may carry the tag `:latest`."""
    raw = {"name": "train", "provider": "torchrun", "script": "train.py",
           "resources": {"nodes": 3, "cpu": 1}, "version": 3.10,
           "depends-on": ["prep:latest"]}
    path = workflows_file(tmp_path, raw, entry("prep"))
    selected = load_selected(str(path), "train")
    workflow = selected.workflow
    assert (workflow.file, workflow.nodes, workflow.resources.cpu) == ("train.py", 3, 1)
    assert workflow.version == "3.10" and workflow.deps == ["prep:latest"]
    # prep:latest is not run again: only the chosen workflow runs, prep is reused.
    assert [w.name for w in selected.runs] == ["train"] and list(selected.reused) == ["prep"]
    for number, text in ((3.9, "3.9"), (3.11, "3.11"), (3.12, "3.12")):
        numbered = workflows_file(tmp_path, entry(version=number))
        assert load_selected(str(numbered), None).workflow.version == text


def test_a_latest_dependency_without_a_finished_run_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry("prep"), entry("train", deps=["prep:latest"],
                                                         working_dir=str(tmp_path)))
    runs_dir = tmp_path / "runs"
    err = error_of(["launch", "train", "--file", str(path), "--runs-dir", str(runs_dir),
                    "--dry-run"], capsys)
    assert err == (f"error: {path}: workflow train: deps: prep:latest: no finished run of prep in {runs_dir} "
                   "(launch prep first, or write prep without :latest to run it before)")
    assert not runs_dir.exists()


BAD_FIELDS = [
    ({"file": "-m"}, "file: '-m' is not a script path"),
    ({"nodes": 0}, "nodes: Input should be greater than 0"),
    ({"nodes": "two"}, "nodes: Input should be a valid integer"),
    ({"args": "--x 'unclosed"}, "args: \"--x 'unclosed\" cannot be split into arguments"),
    ({"args": "--x\nrm -rf /"}, "args: '--x\\nrm -rf /': control character"),
    ({"args": [["nested"]]}, "args.0: Input should be a valid string"),
    ({"environment": ["NOEQUALS"]}, "environment: item 0: 'NOEQUALS' is not KEY=VALUE"),
    ({"environment": ["BAD;touch x=1"]},
     "environment: 'BAD;touch x' is not an environment variable name"),
    ({"environment": ["A=1", "A=2"]}, "environment: item 1: 'A' is set twice"),
    ({"environment": ["A=x\ny"]}, "environment: A: 'x\\ny': control character"),
    ({"environment": {"1A": "x"}}, "environment: '1A' is not an environment variable name"),
    ({"environment": {"A": True}}, "environment.A: Input should be a valid string"),
    ({"environment": {"A": ["x"]}}, "environment.A: Input should be a valid string"),
    ({"artifacts": [{"path": "../up"}]}, "artifacts: item 0 '../up'"),
    ({"artifacts": ["/etc"]}, "artifacts: item 0 '/etc': must be a path relative to"),
    ({"artifacts": [{"pth": "model"}]},
     "artifacts: item 0: an artifact is {path: ...}; unknown field(s) pth"),
    ({"requirements": "/etc/passwd"},
     "requirements: requirements file '/etc/passwd': must be a path relative to working_dir"),
    ({"requirements": "../r.txt"}, "requirements: requirements file '../r.txt'"),
    ({"requirements": ["--index-url=http://x"]}, "requirements: '--index-url=http://x' is not a pip requirement"),
    ({"version": 3.2}, "version: 3.2: write the version quoted"),
    ({"version": 3}, "version: 3: write the version quoted"),
    ({"version": "3"}, "version: '3' is not a Python major.minor version"),
    ({"working_dir": "a\nb"}, "working_dir: 'a\\nb': control character"),
    ({"before_run": ["echo \x01"]}, "before_run: 'echo \\x01': control character"),
    ({"resources": {"cpu": 0}}, "resources.cpu: Input should be greater than 0"),
    ({"resources": {"memory": "lots"}}, "resources.memory: not a memory size: 'lots'"),
    ({"resources": {"shm_size": "16XB"}}, "resources.shm_size: not a memory size: '16XB'"),
    ({"resources": {"gpu": True}}, "resources.gpu: True is not a GPU count"),
    ({"resources": {"gpu": -1}}, "resources.gpu.count: Input should be greater than or equal"),
    ({"resources": {"gpu": {"count": 1, "name": "a;b"}}},
     "resources.gpu.name: 'a;b' is not a GPU type"),
    ({"resources": {"gpu": {"memory": "big"}}}, "resources.gpu.memory: not a memory size"),
    ({"resources": {"gpu": {"cuont": 1}}}, "resources.gpu.cuont: unknown field"),
    ({"resources": {"interruptible": "perhaps"}},
     "resources.interruptible: Input should be a valid boolean"),
    ({"resources": {"time": "2h\n#SBATCH"}}, "resources.time: '2h\\n#SBATCH' is not a SLURM"),
    ({"deps": ["a b"]}, "deps: dependency 'a b' is not a valid name"),
    ({"deps": ["nowhere"]}, "deps: no workflow named 'nowhere' in this file"),
    ({"deps": ["train"]}, "deps: a cycle (train -> train)"),
    ({"deps": ["x"], "depends-on": ["x"]}, "<top level>: write deps or depends-on, not both"),
    ({"deps": ["x:v1"]}, "deps: 'x:v1': only the tag :latest is supported"),
    ({"deps": ["nowhere:latest"]}, "deps: no workflow named 'nowhere' in this file"),
    ({"script": "train.py"}, "<top level>: write file or script, not both"),
    ({"nodes": 2, "resources": {"nodes": 3}},
     "<top level>: nodes is 2 but resources.nodes is 3: write one"),
    ({"nodez": 2}, "nodez: unknown field"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS,
                         ids=[next(iter(f)) + "-" + str(i) for i, (f, _) in
                              enumerate(BAD_FIELDS)])
def test_a_bad_value_in_each_field_is_one_line_naming_file_workflow_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict,
        message: str) -> None:
    name = fields.get("name", "train")
    path = workflows_file(tmp_path, {**entry(), **fields})
    err = error_of(["launch", "--file", str(path), "--workflow", name,
                    "--runs-dir", str(tmp_path / "runs")], capsys)
    assert err.startswith(f"error: {path}: workflow {name}: {message}"), err
    assert not (tmp_path / "runs").exists()


def test_a_dependency_cycle_is_refused_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry("a", deps=["b"]), entry("b", **{"depends-on": ["c"]}),
                          entry("c", deps=["a"]))
    assert error_of(["launch", "--file", str(path), "--workflow", "a"], capsys) == \
        f"error: {path}: workflow c: deps: a cycle (a -> b -> c -> a)"


def test_a_python_version_mismatch_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry(version="2.7", working_dir=str(tmp_path)))
    err = error_of(["launch", str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert err.startswith(f"error: {path}: workflow train: version: the workflow needs Python "
                          f"2.7, but tml launch runs on Python {HERE}")
    assert not (tmp_path / "runs").exists()


# --- requirements: a file installed into the run's own environment ------------------------

def write_wheel(directory: Path, name: str = "tmlreqprobe", value: str = "from the run env") \
        -> Path:
    """A pure-Python wheel written by hand (no build backend, no network): pip installs it
    from the path alone."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": f"VALUE = {value!r}\n",
             f"{name}-0.1.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{name}-0.1.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-0.1.dist-info/RECORD,,")
    files[f"{name}-0.1.dist-info/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


USES_THE_PACKAGE = TRAIN.replace(
    'f.write(f"world=', 'import tmlreqprobe, sys\n'
    '        f.write(f"{tmlreqprobe.VALUE} {sys.prefix} world=')


@pytest.mark.slow
def test_a_requirements_file_is_installed_into_the_run_environment_only(tmp_path: Path) -> None:
    """A local wheel named in requirements.txt is importable by both nodes' workers (rank 0
    writes its value into the artifact), and not by the launcher's interpreter afterwards.
    PIP_NO_INDEX in the workflow's environment keeps pip off the network (and shows pip gets
    the workflow's environment)."""
    wheel = write_wheel(tmp_path / "dist")
    dstack_repo(tmp_path, EXAMPLE + "    environment:\n      - PIP_NO_INDEX=1\n")
    (tmp_path / "train.py").write_text(USES_THE_PACKAGE)
    (tmp_path / "requirements.txt").write_text(
        f"# a local wheel\n./dist/{wheel.name}\n")
    result = launch(["train", "--runs-dir", "runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "artifacts" / "model" / "weights.txt").read_text() == \
        f"from the run env {run_dir / 'env'} world=2 sum=3\n"
    assert "Successfully installed tmlreqprobe-0.1" in \
        (run_dir / "logs" / "requirements.log").read_text()
    here = subprocess.run([sys.executable, "-c", "import tmlreqprobe"], env=launcher_env(),
                          capture_output=True, text=True)
    assert here.returncode != 0 and "No module named 'tmlreqprobe'" in here.stderr


@pytest.mark.parametrize("lines, message", [
    ("--index-url http://evil\n", "line 1: '--index-url http://evil': pip options are not "
     "allowed"),
    ("torch\n-r other.txt\n", "line 2: '-r other.txt': pip options are not allowed"),
    ("-e ./pkg\n", "line 1: '-e ./pkg': pip options are not allowed"),
    ("../outside.whl\n", "line 1: local path '../outside.whl'"),
    ("/etc/x.whl\n", "line 1: local path '/etc/x.whl': must be a path relative to"),
    ("torch >= \n", "line 1: 'torch >=' is not a pip requirement or a local path"),
    ("ok\nbad\\\n ==!\n", "line 2: 'bad ==!' is not a pip requirement"),
])
def test_a_requirements_file_line_that_is_not_a_requirement_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: str, message: str) -> None:
    path = workflows_file(tmp_path, entry(requirements="requirements.txt",
                                          working_dir=str(tmp_path)))
    (tmp_path / "requirements.txt").write_text(lines)
    err = error_of(["launch", str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert err.startswith(f"error: {path}: workflow train: requirements: requirements.txt "
                          f"{message}") or \
        err.startswith(f"error: {path}: workflow train: requirements: {message}"), err
    assert not (tmp_path / "runs").exists()


def test_a_missing_requirements_file_is_named(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry(requirements="reqs.txt", working_dir=str(tmp_path)))
    assert error_of(["launch", str(path), "--dry-run"], capsys) == \
        f"error: {path}: workflow train: requirements: {tmp_path}/reqs.txt does not exist"


def test_the_backends_run_the_nodes_in_the_run_environment(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    path = workflows_file(tmp_path, entry(requirements="requirements.txt",
                                          working_dir=str(tmp_path)))
    (tmp_path / "requirements.txt").write_text("")
    main(["launch", str(path), "--backend", "slurm", "--dry-run", "--runs-dir",
          str(tmp_path / "runs")])
    script = capsys.readouterr().out
    assert "-m tml.launch.run_env" in script and "/env/bin/python -m torch.distributed.run" \
        in script
    main(["launch", str(path), "--backend", "kubernetes", "--dry-run"])
    manifest = capsys.readouterr().out
    assert "tml.launch.run_env /tmp/tml-run-env . requirements.txt" in manifest
    assert "/tmp/tml-run-env/bin/python -m torch.distributed.run" in manifest


# --- deps: workflows that run first, and pass their artifacts on -------------------------

PREPARE = """\
import json
import os
os.makedirs("data", exist_ok=True)
with open("data/vocab.txt", "w") as f:
    f.write("made by prepare in " + os.getcwd() + "\\n")
"""

CONSUME = """\
import json
import os
with open("data/vocab.txt") as f:
    vocab = f.read()
os.makedirs("model", exist_ok=True)
with open("model/out.txt", "w") as f:
    f.write("train read: " + vocab)
"""


@pytest.mark.slow
def test_a_dependency_runs_first_and_its_artifact_reaches_the_dependent(tmp_path: Path) -> None:
    """`train` depends on `prepare`, each in its own working directory: prepare runs first,
    its artifact `data` is copied into train's working_dir, and train's artifact says it
    read prepare's file. A failing dependency stops the chain in one line."""
    (tmp_path / "prep").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "prep" / "prepare.py").write_text(PREPARE)
    (tmp_path / "work" / "train.py").write_text(CONSUME)
    (tmp_path / "prep" / "fail.py").write_text("raise SystemExit(4)\n")
    path = tmp_path / "workflows.yaml"
    path.write_text(yaml.safe_dump({"workflows": [
        {"name": "train", "provider": "torchrun", "file": "train.py", "working_dir": "work",
         "depends-on": ["prepare"], "artifacts": [{"path": "model"}]},
        {"name": "prepare", "provider": "torchrun", "file": "prepare.py",
         "working_dir": "prep", "artifacts": ["data"]},
        {"name": "broken", "provider": "torchrun", "file": "fail.py", "working_dir": "prep"},
        {"name": "after-broken", "provider": "torchrun", "file": "train.py",
         "working_dir": "work", "deps": ["broken"]},
    ]}, sort_keys=False))
    result = launch(["--file", str(path), "--workflow", "train", "--runs-dir", "runs"],
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "train"
    assert (run_dir / "artifacts" / "model" / "out.txt").read_text() == \
        f"train read: made by prepare in {tmp_path / 'prep'}\n"
    (prepare_run,) = (tmp_path / "runs" / "prepare").iterdir()
    assert (run_dir / "deps").read_text() == f"prepare {prepare_run}\n"
    assert (tmp_path / "work" / "data" / "vocab.txt").is_file()

    # `prepare:latest`: prepare is not run again; its newest finished run's artifact is used.
    (tmp_path / "work" / "data" / "vocab.txt").unlink()
    with open(path) as f:
        workflows = yaml.safe_load(f)
    workflows["workflows"][0]["depends-on"] = ["prepare:latest"]
    path.write_text(yaml.safe_dump(workflows, sort_keys=False))
    result = launch(["--file", str(path), "--workflow", "train", "--runs-dir", "runs"],
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [prepare_run] == list((tmp_path / "runs" / "prepare").iterdir())
    second = Path(result.stdout.strip().splitlines()[-1])
    assert (second / "deps").read_text() == f"prepare:latest {prepare_run}\n"
    assert (second / "artifacts" / "model" / "out.txt").read_text() == \
        f"train read: made by prepare in {tmp_path / 'prep'}\n"

    result = launch(["after-broken", "--file", str(path), "--runs-dir", "runs"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: dependency broken of after-broken failed, after-broken not started: node 0 "
        "failed"), result.stderr[-3000:]
    assert not (tmp_path / "runs" / "after-broken").exists()


def test_deps_are_refused_on_kubernetes_and_in_a_single_workflow_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry("a"), entry("b", deps=["a"]))
    assert error_of(["launch", "b", "--file", str(path), "--backend", "kubernetes",
                     "--dry-run"], capsys) == (
        f"error: {path}: workflow b: deps: --backend kubernetes writes one PyTorchJob; run "
        "the dependencies first")
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump({"name": "one", "file": "train.py", "deps": ["a"]}))
    assert error_of(["launch", str(single)], capsys).startswith(
        f"error: {single}: workflow one: deps: a file with one workflow has no other")


def test_dry_run_shows_the_dependencies_first(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = workflows_file(tmp_path, entry("a", working_dir=str(tmp_path)),
                          entry("b", deps=["a"], working_dir=str(tmp_path)))
    main(["launch", "b", "--file", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert out.index("# workflow a") < out.index("# workflow b")


def test_a_passed_artifact_never_lands_outside_the_dependent_working_dir(tmp_path: Path) -> None:
    """The dependent's working_dir holds a link `data -> outside/`: the copy is refused in one
    line and nothing is written outside."""
    from tml.launch.cli import _pass_artifacts
    from tml.launch.workflow import LaunchError, Workflow

    dep_run = tmp_path / "runs" / "prepare" / "1"
    (dep_run / "artifacts" / "data").mkdir(parents=True)
    (dep_run / "artifacts" / "data" / "vocab.txt").write_text("v")
    (tmp_path / "prep").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "work" / "data").symlink_to(tmp_path / "outside")
    dep = Workflow(name="prepare", file="p.py", working_dir=str(tmp_path / "prep"),
                   artifacts=["data"])
    workflow = Workflow(name="train", file="t.py", working_dir=str(tmp_path / "work"),
                        deps=["prepare"])
    with pytest.raises(LaunchError, match=r"^workflow train: deps: prepare: artifact "
                       r"destination 'data': resolves outside"):
        _pass_artifacts(dep, str(dep_run), workflow)
    assert list((tmp_path / "outside").iterdir()) == []


# --- tml run torchrun: the same workflow, from the command line --------------------------

SHOW_ARGS = TRAIN.replace(
    'f.write(f"world=', 'import sys, json\n'
    '        f.write(json.dumps([sys.argv[1:], os.environ["TML_X"]]) + f" world=')


@pytest.mark.slow
def test_tml_run_torchrun_runs_a_script_on_two_nodes_without_a_workflow_file(
        tmp_path: Path) -> None:
    """Script words pass through as argv words (a `;` stays a character), tml's options may
    follow them, and a word after `--` is the script's even when it looks like tml's."""
    (tmp_path / "train.py").write_text(SHOW_ARGS)
    result = subprocess.run(
        [sys.executable, "-c", "from tml.launch.cli import main; main()", "run", "torchrun",
         "train.py", "--lr", "0.1", "two words;touch hacked", "--nnodes", "2", "--cpu", "1",
         "-e", "TML_X=x=1", "-a", "model", "--runs-dir", "runs", "--", "-e", "kept"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "train"
    assert (run_dir / "artifacts" / "model" / "weights.txt").read_text() == \
        '[["--lr", "0.1", "two words;touch hacked", "-e", "kept"], "x=1"] world=2 sum=3\n'
    assert not (tmp_path / "hacked").exists()


@pytest.mark.parametrize("words, message", [
    (["-e", "BAD;touch x=1"], "environment: 'BAD;touch x' is not an "
     "environment variable name"),
    (["-e", "NOEQUALS"], "environment: item 0: 'NOEQUALS' is not KEY=VALUE"),
    (["-a", "../up"], "artifacts: item 0 '../up'"),
    (["-r", "/etc/passwd"], "requirements: requirements file '/etc/passwd': "
     "must be a path relative to working_dir"),
    (["--gpu", "two"], "resources.gpu.count: Input should be a valid integer"),
    (["--nnodes", "0"], "nodes: Input should be greater than 0"),
    (["--memory", "lots"], "resources.memory: not a memory size: 'lots'"),
    (["--gpu-name", "a;b"], "resources.gpu.name: 'a;b' is not a GPU type"),
    (["--gpu-memory", "big"], "resources.gpu.memory: not a memory size: 'big'"),
    (["--name", "../x"], "name: workflow name '../x' is not a valid name"),
])
def test_tml_run_torchrun_options_get_the_workflow_checks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        words: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").touch()
    err = error_of(["run", "torchrun", "train.py", *words, "--runs-dir", "runs"], capsys)
    assert err.startswith(f"error: tml run torchrun: {message}"), err
    assert not (tmp_path / "runs").exists()


def test_tml_run_command_line_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error_of(["run", "torchrun"], capsys) == \
        "error: tml run torchrun: FILE is missing (tml run torchrun train.py ...)"
    assert error_of(["run", "torchrun", "--bogus", "train.py"], capsys).startswith(
        "error: tml run torchrun: --bogus: unknown option before FILE")
    assert error_of(["run", "bash", "x.sh"], capsys) == \
        "error: tml run bash: unknown provider (tml runs torchrun)"
    assert error_of(["run", "torchrun", "train.py", "--nnodes"], capsys) == \
        "error: tml run torchrun: --nnodes needs a value"
    assert error_of(["run", "torchrun", "absent.py"], capsys) == \
        f"error: tml run torchrun: file: {tmp_path}/absent.py does not exist"


# --- run management: tml runs, tml logs, tml stop ----------------------------------------

SLEEPER = """\
import os, sys, time
os.makedirs("progress", exist_ok=True)
with open(f"progress/started-{os.environ['GROUP_RANK']}", "w") as f:
    f.write("started\\n")
print("worker on group rank", os.environ["GROUP_RANK"], "is up", flush=True)
time.sleep(600)
"""


def tml(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tml.launch.cli import main; main()",
                           *argv], cwd=cwd, env=launcher_env(), capture_output=True,
                          text=True, timeout=120)


def _wait_for(check, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


@pytest.mark.slow
def test_a_local_run_is_listed_its_logs_read_and_it_is_stopped(tmp_path: Path) -> None:
    """A 2-node run that would sleep 10 minutes: `tml runs` lists it running, `tml logs RUN
    --node 1` prints node 1's log, `tml stop RUN` stops it (the launcher ends with one line,
    no agent or worker is left, the artifacts written so far are copied) and `tml runs`
    then says stopped."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    path = workflows_file(tmp_path, entry("sleepy", file="sleeper.py", nodes=2,
                                          artifacts=["progress"]))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tml.launch", "--file", str(path), "--workflow", "sleepy",
         "--runs-dir", "runs"], cwd=tmp_path, env=launcher_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(list(tmp_path.glob("progress/started-*"))) == 2)
        (run_dir,) = (tmp_path / "runs" / "sleepy").iterdir()
        record = json.loads((run_dir / "run.json").read_text())
        assert len(record["node_pids"]) == 2
        listing = tml(["runs"], tmp_path).stdout.splitlines()
        assert listing[0].split() == ["NAME", "RUN", "BACKEND", "STATUS", "START", "EXIT"]
        assert listing[1].split()[:4] == ["sleepy", run_dir.name, "local", "running"]

        log = tml(["logs", "sleepy", "--node", "1"], tmp_path)
        assert log.returncode == 0 and "is up" in log.stdout and "==>" not in log.stdout
        both = tml(["logs", run_dir.name], tmp_path).stdout
        assert "==> node-0.log <==" in both and "==> node-1.log <==" in both
        assert tml(["logs", "sleepy", "--node", "5"], tmp_path).stderr.strip() == (
            f"error: run sleepy/{run_dir.name} has no log of node 5 (logs: node-0.log, "
            "node-1.log)")

        follower = subprocess.Popen(
            [sys.executable, "-c", "from tml.launch.cli import main; main()", "logs", "sleepy",
             "-f", "--node", "0"], cwd=tmp_path, env=launcher_env(), stdout=subprocess.PIPE,
            text=True)
        stopped = tml(["stop", f"sleepy/{run_dir.name}"], tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"sleepy/{run_dir.name}: stopped"
        _, err = launcher.communicate(timeout=60)
        # `tml logs -f` printed node 0's log and ended with the run.
        followed, _ = follower.communicate(timeout=30)
        assert "is up" in followed and "==>" not in followed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2
    assert err.strip().splitlines()[-1].startswith(
        f"error: run sleepy/{run_dir.name} stopped (signal 15)"), err[-2000:]
    for pid in record["node_pids"]:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
    assert sorted(os.listdir(run_dir / "artifacts" / "progress")) == \
        ["started-0", "started-1"]
    assert tml(["runs"], tmp_path).stdout.splitlines()[1].split()[:4] == \
        ["sleepy", run_dir.name, "local", "stopped"]
    assert tml(["stop", "sleepy"], tmp_path).stderr.strip() == \
        f"error: run sleepy/{run_dir.name} is not running (status stopped)"


def _record(runs_dir: Path, name: str, run_id: str, **fields: object) -> Path:
    from dataclasses import asdict

    from tml.launch.runs import RunRecord, write

    run_dir = runs_dir / name / run_id
    (run_dir / "logs").mkdir(parents=True)
    values: dict = {"name": name, "run_id": run_id, "backend": "local", "status": "done",
                    "start": f"2026-12-02T00:00:{run_id[-2:]}Z", "run_dir": str(run_dir),
                    **fields}
    record = RunRecord(**values)
    write(record)
    assert json.loads((run_dir / "run.json").read_text()) == asdict(record)
    return run_dir


def test_runs_table_lost_runs_and_run_names(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Records are listed oldest first; a running record whose launcher is gone shows as
    lost; a run is found by id, NAME/ID or name (newest); errors are one line."""
    runs_dir = tmp_path / "runs"
    _record(runs_dir, "train", "20261202-000000-aaaa01", exit_code=0)
    _record(runs_dir, "train", "20261202-000000-aaaa02", status="failed", exit_code=3)
    # A launcher that is gone: a pid whose command line is not the recorded one.
    _record(runs_dir, "prepare", "20261202-000000-bbbb03", status="running",
            launcher_pid=os.getpid(), launcher_cmdline="not this process")
    (runs_dir / "junk" / "x").mkdir(parents=True)  # a directory without a record
    main(["runs", "--runs-dir", str(runs_dir)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:4] + row[5:] for row in rows[1:]] == [
        ["train", "20261202-000000-aaaa01", "local", "done", "0"],
        ["train", "20261202-000000-aaaa02", "local", "failed", "3"],
        ["prepare", "20261202-000000-bbbb03", "local", "lost"]]

    from tml.launch.runs import find

    assert find(str(runs_dir), "train").run_id == "20261202-000000-aaaa02"
    assert find(str(runs_dir), "train/20261202-000000-aaaa01").status == "done"
    assert error_of(["logs", "nothing", "--runs-dir", str(runs_dir)], capsys) == \
        f"error: no run 'nothing' in {runs_dir} (tml runs lists them)"
    assert error_of(["stop", "train", "--runs-dir", str(runs_dir)], capsys) == \
        "error: run train/20261202-000000-aaaa02 is not running (status failed)"
    main(["stop", "prepare", "--runs-dir", str(runs_dir)])
    assert capsys.readouterr().out.strip() == "prepare/20261202-000000-bbbb03: stopped"


# --- fuzzing the dstack form --------------------------------------------------------------

FUZZ_SEED = b"""\
workflows:
  - name: prepare
    provider: torchrun
    file: prepare.py
    artifacts: [data]
  - name: train
    provider: torchrun
    file: "train.py"
    args: "--lr 0.1 --name 'two words'"
    depends-on: [prepare]
    requirements: "requirements.txt"
    environment: ["A=1", "B=x=y"]
    artifacts:
      - path: model
    nodes: 2
    version: "3.11"
    resources:
      cpu: 2
      memory: 16GB
      shm_size: 2GB
      interruptible: true
      gpu: {count: 2, name: K80, memory: 12GB}
"""


def test_the_dstack_fuzz_seed_loads(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_bytes(FUZZ_SEED)
    assert [w.name for w in load_selected(str(path), "train").runs] == ["prepare", "train"]


def _fuzz_case(tmp_path: Path, data: bytes) -> None:
    from tests.fuzz_support import outcome
    from tml.launch import kubernetes, slurm

    path = tmp_path / "w.yaml"
    path.write_bytes(data)
    loaded = []
    if outcome(lambda: loaded.append(load_selected(str(path), "train"))) == "ok":
        for workflow in loaded[0].runs:
            batch, _ = slurm.render_scripts(workflow, str(tmp_path / "run"))
            lines = batch.splitlines()
            directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
            assert directives == list(range(1, len(directives) + 1))
            kubernetes.render(workflow, "20260101-000000-abcdef")
            for key in workflow.environment:
                assert key.isidentifier() and key.isascii()


def test_fuzzed_dstack_workflows_files_load_or_fail_with_one_line(tmp_path: Path) -> None:
    """Mutated dstack files through `load_selected` (what tml launch calls): success or one
    TmlError line; what loads renders on SLURM with its #SBATCH block intact."""
    from hypothesis import given

    from tests.fuzz_support import FUZZ_SETTINGS, mutated

    @FUZZ_SETTINGS
    @given(data=mutated(FUZZ_SEED))
    def run(data: bytes) -> None:
        _fuzz_case(tmp_path, data)

    run()


def test_a_dependency_in_the_same_working_dir_is_not_copied_onto_itself(tmp_path: Path) -> None:
    from tml.launch.cli import _pass_artifacts
    from tml.launch.workflow import Workflow

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocab.txt").write_text("written by the dependency")
    dep = Workflow(name="prepare", file="p.py", working_dir=str(tmp_path), artifacts=["data"])
    workflow = Workflow(name="train", file="t.py", working_dir=str(tmp_path), deps=["prepare"])
    _pass_artifacts(dep, str(tmp_path / "no-such-run"), workflow)
    assert (tmp_path / "data" / "vocab.txt").read_text() == "written by the dependency"


def test_a_run_launched_on_another_host_is_not_judged_or_signalled_here(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shared runs directory: a running record from another login node stays running
    (its process ids mean nothing here) and tml stop refuses to signal anything."""
    runs_dir = tmp_path / "runs"
    _record(runs_dir, "train", "20261202-000000-cccc01", status="running",
            launcher_pid=os.getpid(), launcher_cmdline="elsewhere", host="other-host")
    main(["runs", "--runs-dir", str(runs_dir)])
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "running"
    assert error_of(["stop", "train", "--runs-dir", str(runs_dir)], capsys) == \
        "error: run train/20261202-000000-cccc01 was launched on other-host; run tml stop there"


def test_requirements_lines_are_read_as_pip_reads_them(tmp_path: Path) -> None:
    """Comments (whole-line and after whitespace), blank lines and `\\` continuations; a
    local path becomes absolute inside working_dir; a `#` inside a word stays."""
    from tml.launch.run_env import read_requirements

    (tmp_path / "r.txt").write_text("# c\nfoo>=1 # why\nbar\t# tab\nbaz \\\n  ==1\n\n"
                                    "./dist/x-0.1-py3-none-any.whl\n"
                                    "pkg @ https://example.org/p.whl#sha256=00\n")
    assert read_requirements(str(tmp_path), "r.txt", "wf") == [
        "foo>=1", "bar", "baz   ==1", f"{tmp_path}/dist/x-0.1-py3-none-any.whl",
        "pkg @ https://example.org/p.whl#sha256=00"]


def test_tml_run_torchrun_takes_dstack_s_gpu_options(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tml.launch import run_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").touch()
    _, selected = run_command.parse(["train.py", "--gpu", "2", "--gpu-name", "H100",
                                     "--gpu-memory", "80GB", "--lr", "0.1"])
    gpu = selected.workflow.resources.gpu
    assert (gpu.count, gpu.name, gpu.memory) == (2, "H100", "80GB")
    assert selected.workflow.args == ["--lr", "0.1"]
