"""Suite-wide rules: CPU workers on any host, prerequisites that CI may not skip, GPU tests.

- The suite's workers run on CPU (gloo), also on a GPU host: this process and every child
  it starts see `CUDA_VISIBLE_DEVICES=""`, set here before anything initialises CUDA, so
  the "more workers than GPUs" check never refuses a 2-worker test on a 1-GPU host. The
  GPUs that were visible are kept in `VISIBLE_GPUS` for the `gpu` tests, which run their
  CUDA checks in a child started with `gpu_env()`.
- `require(condition, why)`: a test's prerequisite (a SLURM install, Bazel, a notebook
  kernel). Locally a missing one skips the test; under CI (`CI=true`) it fails it, so no
  feature goes silently untested.
- `@pytest.mark.gpu` tests are skipped on hosts without an NVIDIA GPU.
- Under pytest-xdist (`make test`: `-n 2 --dist loadgroup` on 2 cores or more): the tests of one
  file stay in one process (their module fixtures, a SLURM cluster or a trained run, are
  made once), the SLURM tests of every file share one process (one cluster, one apt-get at
  a time), so do the tests marked `one_process(name)` with the same name (the big-memory
  tests: two 1.5 GB tables never side by side, whatever files they are in). The groups go
  out costliest first (seconds per file measured in tests/durations.json), so no long group
  is left for the end, by this suite's own scheduler (tests/xdist_schedule.py: xdist's
  loadgroup loses the groups under pytest 9.2). `small_trained_twhin` is trained once for
  all processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def in_ci() -> bool:
    """True under CI (`CI` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition: object, why: str) -> None:
    """Skip the test when `condition` is false; under CI fail it instead, naming `why`."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing under CI (CI=true must not skip): {why}",
                    pytrace=False)
    pytest.skip(why)


def host_has_gpu() -> bool:
    """An NVIDIA GPU is present and was not hidden before the tests started (asks
    nvidia-smi, not torch: the test process itself must never initialise CUDA)."""
    if VISIBLE_GPUS is not None and VISIBLE_GPUS.strip() in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment for a child that must see the host's GPUs (for `gpu` tests)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    if VISIBLE_GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    env["PYTHONPATH"] = REPO
    env.update(extra)
    return env


# The xdist group of the SLURM tests: one cluster, one apt-get and its dpkg lock at a time.
SLURM_GROUP = "slurm"


def xdist_group_of(item: pytest.Item) -> str:
    """The xdist group a test runs in: `slurm` for the SLURM tests, the name given by
    `@pytest.mark.one_process(name)` (tests that must not overlap, such as the big-memory
    tests), else its file."""
    if item.get_closest_marker("slurm"):
        return SLURM_GROUP
    shared = item.get_closest_marker("one_process")
    if shared is not None:
        return str(shared.args[0])
    return item.nodeid.split("::", 1)[0]


# Seconds per test file in a measured run, to hand the costliest groups out first.
DURATIONS = Path(__file__).with_name("durations.json")


def group_order(tests: list[tuple[str, str, bool]], file_seconds: dict[str, float]) -> list[str]:
    """The groups of `tests` ((node id, group, slow) in collection order), costliest first.

    A test costs its file's measured seconds over the file's test count; a file that was
    not measured, 20 s a slow test and 0.3 s any other. Ties keep collection order."""
    per_file = Counter(nodeid.split("::", 1)[0] for nodeid, _, _ in tests)
    cost: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, (nodeid, group, slow) in enumerate(tests):
        path = nodeid.split("::", 1)[0]
        share = (file_seconds[path] / per_file[path] if path in file_seconds
                 else 20.0 if slow else 0.3)
        cost[group] = cost.get(group, 0.0) + share
        first.setdefault(group, index)
    return sorted(cost, key=lambda group: (-cost[group], first[group]))


def write_groups(path: str, groups: dict[str, str]) -> None:
    """`{node id: group}` for the scheduler (tests/xdist_schedule.py), written whole
    (each worker writes the same map; a reader never sees half of one)."""
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w") as f:
        json.dump(groups, f)
    os.replace(partial, path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not host_has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marker gpu)")
        for item in gpu_items:
            item.add_marker(skip)
    # In an xdist worker, `--dist loadgroup` reads as the option `loadgroup` (`dist` is "no").
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return   # one process, or another xdist mode: collection order as it is
    groups = {item.nodeid: xdist_group_of(item) for item in items}
    file_seconds = json.loads(DURATIONS.read_text())["seconds"]
    order = group_order([(item.nodeid, groups[item.nodeid],
                          item.get_closest_marker("slow") is not None) for item in items],
                        file_seconds)
    rank = {group: position for position, group in enumerate(order)}
    # The scheduler hands the groups out in this order (a group's tests stay in collection
    # order): a long group handed out last would leave the other process idle.
    items.sort(key=lambda item: rank[groups[item.nodeid]])
    from tests.xdist_schedule import GROUPS_ENV

    write_groups(os.environ[GROUPS_ENV], groups)


def pytest_configure(config: pytest.Config) -> None:
    """The controller of an xdist run (`--dist loadgroup`): a file for the workers' groups,
    named in the environment the workers are started with."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None) \
            or config.getvalue("dist") != "loadgroup":
        return
    from tests.xdist_schedule import GROUPS_ENV

    directory = tempfile.mkdtemp(prefix="tml-test-groups-")
    config.stash[_GROUPS_DIR] = directory
    os.environ[GROUPS_ENV] = os.path.join(directory, "groups.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_GROUPS_DIR, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        from tests.xdist_schedule import GROUPS_ENV

        os.environ.pop(GROUPS_ENV, None)


_GROUPS_DIR = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadgroup` with the groups of `xdist_group_of` (tests/xdist_schedule.py),
    in the workers' order (costliest first)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.xdist_schedule import GroupScheduling

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def _once_for_all_workers(tmp_path_factory: pytest.TempPathFactory, name: str,
                          make: Callable[[Path], dict[str, str]]) -> dict[str, str]:
    """`make(directory)` run once per test run, also under pytest-xdist: the first worker
    makes it under an exclusive lock in the run's shared temporary directory and records
    the result; the others wait for the lock and read the record."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent   # pytest-of-USER/pytest-N, shared by this run's workers
    record = base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            return json.loads(record.read_text())
        directory = base / name
        shutil.rmtree(directory, ignore_errors=True)   # what a failed first try left
        directory.mkdir()
        made = make(directory)
        record.write_text(json.dumps(made))
        return made


@pytest.fixture(scope="session")
def small_trained_twhin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One small TwHIN trained once per test run (projects/twhin/run.py, 1 worker, 10 steps,
    checkpoints at 5 and 10), for the tests that only read or copy it: `config` (its YAML),
    `save` (its save_dir; copy it before changing anything), `run_py`. Sharing it saves an
    interpreter start, a graph and a training run per test."""
    return _once_for_all_workers(tmp_path_factory, "small_trained_twhin", _train_small_twhin)


def _train_small_twhin(root: Path) -> dict[str, str]:
    from projects.twhin.data.generate import generate_graph
    from tests.twhin_setup import launcher_env, small_twhin_config

    graph = root / "graph"
    generate_graph(str(graph), num_users=300, num_tweets=100, num_edges=3000,
                   num_communities=4, seed=1, validation_fraction=0.05)
    config = small_twhin_config(root / "twhin.yaml", graph, 300, 100, 100,
                                train_log_every_n=5, eval_log_every_n=100000,
                                num_eval_steps=1, num_epochs=1, num_train_steps=10,
                                checkpoint_every_n=5)
    run_py = os.path.join(REPO, "projects", "twhin", "run.py")
    save = root / "save"
    done = subprocess.run([sys.executable, run_py, f"--config_yaml_path={config}",
                           f"--save_dir={save}", "--nproc_per_node=1"], env=launcher_env(),
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"5", "10"} <= set(os.listdir(save))
    return {"config": str(config), "save": str(save), "run_py": run_py}
