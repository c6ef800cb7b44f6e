"""Workflow fields that are not commands never run as commands; artifacts never leave
their roots; the workflow reader answers any file with a result or one error line.

Each attack below is performed: the payload would create a marker file if any backend
ran it, and the test checks the marker is absent and the message names file and field.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given

from tests.fuzz_support import FUZZ_SETTINGS, files_under, mutated, outcome
from tests.tml.launch.test_launch_workflow import launch, write_workflow
from tml.launch import kubernetes, slurm
from tml.launch.artifacts import REFUSED_FILE, copy_artifacts
from tml.launch.cli import main
from tml.launch.local import free_port
from tml.launch.workflow import load_workflow

MARK = "MARKER"


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _scripts(out: str, runs: Path) -> tuple[str, str]:
    """(job.sbatch, node.sh) from the output of `--backend slurm --dry-run`."""
    _, batch, node = out.split(f"# {runs}/")
    assert batch.split("\n", 1)[0].endswith("/job.sbatch")
    assert node.split("\n", 1)[0].endswith("/node.sh")
    return batch.split("\n", 1)[1], node.split("\n", 1)[1]


def _touch(tmp_path: Path) -> str:
    return f"touch {tmp_path / MARK}"


# (fields of the workflow, the field named in the message, text the message holds).
# `{touch}` becomes a command creating the marker.
ATTACKS = [
    ({"environment": {"BAD=1;{touch}": "1"}}, "environment",
     "is not an environment variable name"),
    ({"environment": {"A\n{touch}": "1"}}, "environment", "is not an environment variable"),
    ({"environment": {"A": "x\n{touch}"}}, "environment", "A: 'x\\n"),
    ({"resources": {"time": "01:00:00\n{touch}"}}, "resources.time", "is not a SLURM time"),
    ({"resources": {"time": "01:00:00 --wrap={touch}"}}, "resources.time",
     "is not a SLURM time"),
    ({"resources": {"gpu": {"count": 1, "name": "a100\n{touch}"}}}, "resources.gpu.name",
     "is not a GPU type"),
    ({"resources": {"gpu": {"count": 1, "name": "a100:1 --wrap={touch}"}}},
     "resources.gpu.name", "is not a GPU type"),
    ({"resources": {"memory": "16GB\n{touch}"}}, "resources.memory", "not a memory size"),
    ({"resources": {"shm_size": "1Gi;{touch}"}}, "resources.shm_size", "not a memory size"),
    ({"resources": {"gpu": {"memory": "40Gi\n{touch}"}}}, "resources.gpu.memory",
     "not a memory size"),
    ({"name": "wf\n{touch}"}, "name", "is not a valid name"),
    ({"name": "wf;{touch}"}, "name", "is not a valid name"),
    ({"name": "../../escaped"}, "name", "is not a valid name"),
    ({"args": ["--x=1\n{touch}"]}, "args", "control character '\\n' is not allowed"),
    ({"file": "script.py\n{touch}"}, "file", "control character '\\n' is not allowed"),
    ({"file": "--no-python"}, "file", "is not a script path"),
    ({"working_dir": "{tmp}\n{touch}"}, "working_dir", "control character"),
    ({"requirements": ["--index-url=http://evil.invalid"]}, "requirements",
     "is not a pip requirement"),
    ({"requirements": ["torch; {touch}"]}, "requirements", "is not a pip requirement"),
    ({"requirements": ["torch\n{touch}"]}, "requirements", "control character"),
    ({"artifacts": ["../outside"]}, "artifacts", "'..' is not allowed"),
    ({"artifacts": ["/etc/passwd"]}, "artifacts", "must be a path relative to working_dir"),
    ({"artifacts": ["~/x"]}, "artifacts", "must be a path relative to working_dir"),
    ({"artifacts": ["out\n{touch}"]}, "artifacts", "control characters are not allowed"),
    ({"before_run": ["echo hi\x00{touch}"]}, "before_run", "control character '\\x00'"),
    ({"version": "3.11\n{touch}"}, "version", "is not a Python major.minor version"),
]


def _fill(value: object, tmp_path: Path) -> object:
    if isinstance(value, str):
        return value.replace("{touch}", _touch(tmp_path)).replace("{tmp}", str(tmp_path))
    if isinstance(value, list):
        return [_fill(v, tmp_path) for v in value]
    if isinstance(value, dict):
        return {_fill(k, tmp_path): _fill(v, tmp_path) for k, v in value.items()}
    return value


@pytest.mark.parametrize("fields, field, text", ATTACKS,
                         ids=[f"{a[1]}-{i}" for i, a in enumerate(ATTACKS)])
def test_injection_through_a_workflow_field_is_refused_on_every_backend(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, field: str,
        text: str) -> None:
    path = write_workflow(tmp_path, **_fill(fields, tmp_path))
    runs = tmp_path / "runs"
    for backend in (["--backend", "slurm", "--dry-run"], ["--backend", "local", "--dry-run"],
                    ["--backend", "local"], ["--backend", "kubernetes", "--dry-run"]):
        err = _refused([str(path), *backend, "--runs-dir", str(runs)], capsys)
        assert err.startswith(f"error: {path}: {field}: "), (backend, err)
        assert text in err, (backend, err)
    assert not (tmp_path / MARK).exists()
    assert not runs.exists()


def test_the_attacks_would_have_run_had_they_been_written(tmp_path: Path) -> None:
    """The payloads are live: a line of the attack text, run by bash, creates the marker
    (so the refusal above is what keeps it absent)."""
    payload = _fill("01:00:00\n{touch}", tmp_path)
    subprocess.run(["bash", "-c", f"#SBATCH --time={payload}"], check=True)
    assert (tmp_path / MARK).exists()


def test_a_partition_option_is_a_plain_name(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path)
    err = _refused([str(path), "--backend", "slurm", "--dry-run", "--partition",
                    f"gpu\n{_touch(tmp_path)}"], capsys)
    assert err.startswith("error: --partition 'gpu\\ntouch ") and "not a SLURM partition" in err
    assert not (tmp_path / MARK).exists()


def test_a_python_tag_in_the_workflow_is_refused_not_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "script.py").write_text("print('hello')\n")
    path = tmp_path / "workflow.yaml"
    path.write_text(f"name: !!python/object/apply:os.system [{_touch(tmp_path)!r}]\n"
                    "file: script.py\n")
    err = _refused([str(path), "--backend", "slurm", "--dry-run"], capsys)
    assert err == (f"error: {path}: not valid YAML: could not determine a constructor for "
                   "the tag 'tag:yaml.org,2002:python/object/apply:os.system' "
                   "(line 1, column 7)")
    assert not (tmp_path / MARK).exists()


# --- legitimate values arrive byte for byte -------------------------------------------

AWKWARD = "it's \"quoted\" $HOME `touch MARKER` $(touch MARKER) \\ ; | & * ? ~ -x  é ✓ "


@pytest.mark.slow
def test_an_awkward_environment_value_reaches_the_slurm_worker_byte_for_byte(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The node script from `--backend slurm --dry-run`, run by bash as srun would (with
    the variables SLURM and the batch script set), starts torchrun; its worker records its
    environment: the value is the workflow's, byte for byte, and nothing in it ran."""
    (tmp_path / "script.py").write_text(
        "import json, os\n"
        "json.dump(dict(os.environ), open('worker-env.json', 'w'))\n")
    value = AWKWARD + "'"
    path = write_workflow(tmp_path, environment={"TML_AWKWARD": value, "PYTHONPATH": "."},
                          args=["an arg with 'quotes'"])
    main(["launch", str(path), "--backend", "slurm", "--dry-run",
          "--runs-dir", str(tmp_path / "runs")])
    _, node = _scripts(capsys.readouterr().out, tmp_path / "runs")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(SLURM_NODEID="0", TML_RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
               TML_RDZV_ID="test", SLURM_CPUS_PER_TASK="1")
    result = subprocess.run(["bash", "-c", node], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    worker = json.loads((tmp_path / "worker-env.json").read_text())
    assert worker["TML_AWKWARD"] == value
    assert worker["LOCAL_RANK"] == "0"  # a torchrun worker, not the shell
    assert not (tmp_path / MARK).exists()


def test_an_awkward_environment_value_survives_the_kubernetes_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_workflow(tmp_path, environment={"TML_AWKWARD": AWKWARD,
                                                 "TML_YAML": "key: [1, 2] # not a comment"},
                          before_run=["echo one", "echo two"])
    main(["launch", str(path), "--backend", "kubernetes", "--dry-run"])
    job = yaml.safe_load(capsys.readouterr().out)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]
    assert {"name": "TML_AWKWARD", "value": AWKWARD} in container["env"]
    assert {"name": "TML_YAML", "value": "key: [1, 2] # not a comment"} in container["env"]


def test_the_slurm_scripts_quote_paths_with_spaces_and_percent_signs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A working_dir and runs dir with spaces, quotes and % stay whole: they are quoted in
    the scripts, passed to sbatch as arguments (not #SBATCH lines, which sbatch splits) and
    their % is doubled where SLURM reads filename patterns."""
    work = tmp_path / "my work's dir"
    work.mkdir()
    path = write_workflow(work, artifacts=["out"])
    runs = tmp_path / "runs 100%"
    main(["launch", str(path), "--backend", "slurm", "--dry-run", "--runs-dir", str(runs)])
    batch, node = _scripts(capsys.readouterr().out, runs)
    directives = [line for line in batch.splitlines() if line.startswith("#SBATCH")]
    assert all(re.fullmatch(r"#SBATCH --[a-z-]+(=[A-Za-z0-9_.:+-]+)?", d) for d in directives)
    assert batch.splitlines()[1:len(directives) + 1] == directives  # contiguous, first
    assert "'--output=" in batch and "100%%/wf/" in batch and "/logs/node-%n.log" in batch
    for script in (batch, node):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    workflow = load_workflow(str(path))
    command = slurm.sbatch_command(workflow, "/r 100%", "/r 100%/job.sbatch")
    assert command == ["sbatch", "--parsable", f"--chdir={work}",
                       "--output=/r 100%%/logs/batch-%j.log", "/r 100%/job.sbatch"]


# --- artifacts stay inside working_dir and the run directory ----------------------------

def _hostile_working_dir(tmp_path: Path) -> tuple[Path, Path, Path]:
    """What a job could leave at its artifact paths: links out, a pipe, a good checkpoint."""
    work, secret, runs = tmp_path / "work", tmp_path / "secret", tmp_path / "runs"
    work.mkdir()
    secret.mkdir()
    (secret / "key").write_text("SECRET")
    (work / "leak").symlink_to(secret)                 # the artifact itself leads out
    (work / "parent").symlink_to(secret)               # a parent of the artifact leads out
    ckpt = work / "ckpt"
    ckpt.mkdir()
    (ckpt / "ok.txt").write_text("model")
    (ckpt / "latest").symlink_to("ok.txt")             # inside: kept as a link
    (ckpt / "inner").symlink_to("../../secret/key")    # leads out: left out
    (ckpt / "absolute").symlink_to(ckpt / "ok.txt")    # absolute: left out
    (work / "etc").symlink_to("/etc")
    os.mkfifo(work / "pipe")                           # would block a naive copy
    return work, secret, runs


HOSTILE_ARTIFACTS = ["leak", "parent/key", "ckpt", "etc/passwd", "pipe", "absent"]


def _check_nothing_escaped(run_dir: Path, secret: Path) -> None:
    copied = run_dir / "artifacts"
    assert (copied / "ckpt" / "ok.txt").read_text() == "model"
    assert os.readlink(copied / "ckpt" / "latest") == "ok.txt"
    assert files_under(copied) == {"ckpt", "ckpt/ok.txt", "ckpt/latest"}
    assert files_under(secret) == {"key"}
    refused = (run_dir / REFUSED_FILE).read_text().splitlines()
    assert [line.split("'")[1] for line in refused] == ["leak", "parent/key", "etc/passwd",
                                                       "pipe"]
    assert "resolves outside" in refused[0] and "not a regular file" in refused[3]


def test_artifact_copy_refuses_links_out_of_both_roots(tmp_path: Path) -> None:
    work, secret, runs = _hostile_working_dir(tmp_path)
    run_dir = runs / "wf" / "1"
    result = copy_artifacts(str(work), HOSTILE_ARTIFACTS, str(run_dir))
    assert result.copied == ["ckpt"] and result.missing == ["absent"]
    _check_nothing_escaped(run_dir, secret)
    # A link planted in the run directory's artifacts does not carry the copy out of it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "dst").mkdir()
    (work / "dst" / "x.txt").write_text("x")
    (run_dir / "artifacts" / "dst").symlink_to(outside)
    result = copy_artifacts(str(work), ["dst/x.txt"], str(run_dir))
    assert result.copied == [] and "artifact destination 'dst/x.txt': resolves outside" \
        in result.refused[0]
    assert files_under(outside) == set()


def test_the_slurm_batch_script_copies_artifacts_with_the_same_checks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The artifact lines of job.sbatch, run by bash on the 'master node'."""
    work, secret, runs = _hostile_working_dir(tmp_path)
    (work / "script.py").write_text("")
    path = write_workflow(work, artifacts=HOSTILE_ARTIFACTS)
    main(["launch", str(path), "--backend", "slurm", "--dry-run", "--runs-dir", str(runs)])
    batch, _ = _scripts(capsys.readouterr().out, runs)
    start = batch.index("# Artifacts from")
    copy_lines = batch[start:batch.index('echo "$code"')]
    result = subprocess.run(["bash", "-c", copy_lines], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 1, result.stderr  # refusals: the batch script goes on
    assert "artifact 'leak': resolves outside" in result.stderr
    (run_dir,) = (runs / "wf").iterdir()
    _check_nothing_escaped(run_dir, secret)


@pytest.mark.slow
def test_a_local_job_that_plants_links_gets_no_files_from_outside(tmp_path: Path) -> None:
    """The job itself creates the links (after the launch checked the workflow); the launch
    copies what is inside, refuses the rest and ends with one error line naming it."""
    work, secret, runs = tmp_path / "work", tmp_path / "secret", tmp_path / "runs"
    work.mkdir()
    secret.mkdir()
    (secret / "key").write_text("SECRET")
    (work / "script.py").write_text(
        "import os, glob\n"
        "os.makedirs('ckpt', exist_ok=True)\n"
        "open('ckpt/ok.txt', 'w').write('model')\n"
        f"os.symlink({str(secret)!r}, 'leak')\n"
        f"os.symlink({str(secret / 'key')!r}, 'ckpt/inner')\n")
    path = write_workflow(work, artifacts=["ckpt", "leak"])
    result = launch([str(path), "--runs-dir", str(runs)], timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    (run_dir,) = (runs / "wf").iterdir()
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: artifact 'leak': resolves outside {work} (through a symbolic "
                    f"link); not copied; see {run_dir}/{REFUSED_FILE}")
    assert files_under(run_dir / "artifacts") == {"ckpt", "ckpt/ok.txt"}
    assert files_under(secret) == {"key"}


# --- the reader, fuzzed -----------------------------------------------------------------

VALID = b"""name: fuzz-wf
file: script.py
args: ["--x=1", "--y=two words"]
nodes: 2
requirements: ["pyyaml>=1"]
before_run: ["echo hi"]
environment: {A: "x y", B_2: "z"}
artifacts: [out/model, logs]
working_dir: .
version: "3.11"
resources:
  cpu: 2
  memory: 16GB
  shm_size: 512MB
  time: "1-02:00:00"
  interruptible: true
  gpu: {count: 2, name: a100, memory: 40Gi}
"""


def test_the_valid_fuzz_seed_loads(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_bytes(VALID)
    assert load_workflow(str(path)).resources.gpu.name == "a100"


@FUZZ_SETTINGS
@given(data=mutated(VALID))
def test_fuzzed_workflow_files_load_or_fail_with_one_line(tmp_path: Path, data: bytes) -> None:
    """Mutated workflow files through `load_workflow` (what tml launch calls): success or one
    TmlError line. What loads renders on every backend with its #SBATCH lines intact."""
    path = tmp_path / "w.yaml"
    path.write_bytes(data)
    loaded = []
    if outcome(lambda: loaded.append(load_workflow(str(path)))) == "ok":
        workflow = loaded[0]
        batch, _ = slurm.render_scripts(workflow, str(tmp_path / "run"))
        lines = batch.splitlines()
        directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        assert directives == list(range(1, len(directives) + 1))
        job = yaml.safe_load(kubernetes.render(workflow, "20260101-000000-abcdef"))
        env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"][0]["env"]
        assert {e["name"]: e["value"] for e in env if e["name"] != "PYTHONUNBUFFERED"} == \
            workflow.environment
