"""The suite's own rules (tests/conftest.py): CPU workers on any host, and prerequisites
that skip locally but fail under CI, so a feature cannot go silently untested there; under
pytest-xdist, a shared fixture made once for every worker process, and the test groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ci, require
from tests.twhin_setup import launcher_env


def test_workers_are_cpu_workers_on_any_host() -> None:
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert launcher_env()["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_a_missing_prerequisite_skips_outside_ci(monkeypatch: pytest.MonkeyPatch,
                                                  value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="no slurmctld"):
        require(False, "no slurmctld")
    require(True, "present")  # nothing happens


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_a_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch,
                                               value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception,
                       match=r"prerequisite missing under CI \(CI=true must not skip\): no bazel"):
        require(None, "no bazel")
    require("yes", "present")


# Run by two processes at once in the test below: each asks for the same shared result.
_SHARED_MAKER = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.conftest import _once_for_all_workers

class Factory:   # what _once_for_all_workers reads of pytest's TempPathFactory
    def getbasetemp(self):
        return Path(sys.argv[2]) / os.environ["PYTEST_XDIST_WORKER"]

def make(directory):
    with open(Path(sys.argv[2]) / "made.txt", "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\n")
    time.sleep(1)   # the other process arrives while this one is still making it
    (directory / "result").write_text("made")
    return {"dir": str(directory)}

print(_once_for_all_workers(Factory(), "shared", make)["dir"])
"""


def test_a_shared_fixture_is_made_once_for_all_xdist_workers(tmp_path: Path) -> None:
    """Two worker processes ask at once; one makes it, both get its result."""
    from tests.twhin_setup import REPO

    for worker in ("gw0", "gw1"):
        (tmp_path / worker).mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", _SHARED_MAKER, REPO, str(tmp_path)],
                                  env={**os.environ, "PYTEST_XDIST_WORKER": worker},
                                  stdout=subprocess.PIPE, text=True)
                 for worker in ("gw0", "gw1")]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs == [str(tmp_path / "shared")] * 2
    assert len((tmp_path / "made.txt").read_text().splitlines()) == 1
    assert (tmp_path / "shared" / "result").read_text() == "made"


def test_xdist_groups_keep_a_file_together_and_the_slurm_and_one_process_tests_in_one() -> None:
    from tests.conftest import SLURM_GROUP, xdist_group_of

    class Item:   # the two things xdist_group_of reads of a pytest.Item
        def __init__(self, nodeid: str, slurm: bool, one_process: str | None = None) -> None:
            self.nodeid, self.slurm, self.one_process = nodeid, slurm, one_process

        def get_closest_marker(self, name: str) -> object:
            if name == "slurm" and self.slurm:
                return pytest.mark.slurm.mark
            if name == "one_process" and self.one_process:
                return pytest.mark.one_process(self.one_process).mark
            return None

    assert xdist_group_of(Item("tests/a/test_x.py::test_one[1]", False)) == \
        xdist_group_of(Item("tests/a/test_x.py::test_two", False)) == "tests/a/test_x.py"
    assert xdist_group_of(Item("tests/a/test_x.py::test_s", True)) == \
        xdist_group_of(Item("tests/b/test_y.py::test_t", True)) == SLURM_GROUP
    # Two big-memory tests in different files never run side by side.
    assert xdist_group_of(Item("tests/a/test_x.py::test_big", False, "big-memory")) == \
        xdist_group_of(Item("tests/b/test_y.py::test_big", False, "big-memory")) == "big-memory"


def test_group_order_puts_the_costliest_group_first() -> None:
    from tests.conftest import group_order

    tests = [("tests/a.py::t1", "tests/a.py", False), ("tests/a.py::t2", "tests/a.py", False),
             ("tests/b.py::t", "tests/b.py", True),        # not measured: a slow test, 20 s
             ("tests/c.py::t1", "slurm", True), ("tests/d.py::t", "slurm", False),
             ("tests/e.py::t", "tests/e.py", False),        # not measured: 0.3 s
             ("tests/f.py::t", "tests/f.py", False)]        # ties with e.py: collection order
    # a.py measured 50 s (25 s a test); c.py 30 s, plus d.py's 0.3 s, in the slurm group.
    assert group_order(tests, {"tests/a.py": 50.0, "tests/c.py": 30.0}) == \
        ["tests/a.py", "slurm", "tests/b.py", "tests/e.py", "tests/f.py"]


# A tiny suite run by `pytest -n 2 --dist loadgroup` with this suite's hooks: each test
# records the process it ran in.
_GROUPED_CONFTEST = """
from tests.conftest import (  # noqa: F401
    pytest_collection_modifyitems, pytest_configure, pytest_unconfigure,
    pytest_xdist_make_scheduler)
"""
_GROUPED_TEST = """
import os, time
import pytest

def record(name):
    time.sleep(0.3)   # the other process is running meanwhile
    with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + " " + repr(time.monotonic()))
"""


def test_xdist_runs_each_group_in_one_process_costliest_first(tmp_path: Path) -> None:
    """The groups reach xdist's scheduler (pytest 9.2 drops xdist's own), so a file, the
    SLURM tests and a `one_process` name each run in one process; the costliest go first."""
    from tests.twhin_setup import REPO

    suite, records = tmp_path / "suite", tmp_path / "records"
    suite.mkdir()
    records.mkdir()
    (suite / "conftest.py").write_text(_GROUPED_CONFTEST)
    files = {  # file: [(test, marks)]
        "test_a.py": [("a1", ""), ("a2", ""), ("a3", "")],
        "test_b.py": [("b1", ""), ("b2", ""), ("b_slurm", "slurm slow")],
        "test_c.py": [("c1", ""), ("c_slurm", "slurm slow")],
        "test_d.py": [("d_big", "one_process('big') slow"), ("d1", "")],
        "test_e.py": [("e_big", "one_process('big')"), ("e1", ""), ("e2", "")],
    }
    for name, tests in files.items():
        body = _GROUPED_TEST
        for test, marks in tests:
            decorators = "".join(f"@pytest.mark.{mark}\n" for mark in marks.split())
            body += f"\n{decorators}def test_{test}():\n    record('{test}')\n"
        (suite / name).write_text(body)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup",
                           "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(suite)], cwd=suite, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": REPO, "RECORD_DIR": str(records)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = {}
    for path in records.iterdir():
        worker, started = path.read_text().split()
        ran[path.name] = (worker, float(started))
    assert len(ran) == 13 and {w for w, _ in ran.values()} == {"gw0", "gw1"}, ran

    def workers(*tests: str) -> set[str]:
        return {ran[test][0] for test in tests}

    assert len(workers("a1", "a2", "a3")) == 1
    assert len(workers("b1", "b2")) == 1 and len(workers("e1", "e2")) == 1
    assert len(workers("b_slurm", "c_slurm")) == 1        # across files
    assert len(workers("d_big", "e_big")) == 1
    # The two costliest groups (slurm: two slow tests; big: one) start first, one each.
    firsts = {min((t, test) for test, (w, t) in ran.items() if w == worker)[1]
              for worker in ("gw0", "gw1")}
    assert firsts == {"b_slurm", "d_big"}, ran


_GRPC_THREADS = """
import sys
sys.path.insert(0, sys.argv[1])
import pyarrow.flight as flight
from tml.common.fork_safety import grpc_threads_running
before = grpc_threads_running()
server = flight.FlightServerBase("grpc://127.0.0.1:0")
client = flight.connect(f"grpc://127.0.0.1:{server.port}")
client.close()
server.shutdown()
print(before, grpc_threads_running())
"""


def test_forked_checks_are_spawned_once_grpc_threads_run_in_the_process() -> None:
    """gRPC's threads outlive the Flight client and server that started them: from then on
    `launch_checks` must not fork (tests/launch_checks.py)."""
    from tests.twhin_setup import REPO

    done = subprocess.run([sys.executable, "-c", _GRPC_THREADS, REPO], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"]
