"""Forked workers from a process with no script to re-run: `run_forked`, and
`maybe_run_training` from an interactive `__main__` (what a notebook cell does; the
quickstart notebook itself now calls `projects.twhin.fit`)."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.twhin_setup import REPO

SCRIPT = textwrap.dedent("""
    import os
    from tml.common.run_training import maybe_run_training, run_forked

    def work(scale, tag):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        value = torch.tensor([float(dist.get_rank() + 1) * scale])
        dist.all_reduce(value)
        rank = dist.get_rank()
        dist.destroy_process_group()
        return {"rank": rank, "sum": value.item(), "tag": tag, "pid": os.getpid()}

    first = maybe_run_training(work, "__main__", nproc_per_node=2, scale=2.0, tag="x")
    second = run_forked(work, 2, scale=1.0, tag="y")
    print(sorted(first), [r["sum"] for r in first.values()], [r["tag"] for r in first.values()])
    print(sorted(second), [r["sum"] for r in second.values()])
    print(len({r["pid"] for r in first.values()} | {os.getpid()}))
    try:
        run_forked(work, 2, scale=1.0)
    except Exception as error:
        print(type(error).__name__, str(error).splitlines()[0][:80])
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interactive_main_and_run_forked_return_each_ranks_value():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-"], input=SCRIPT, text=True, env=env,
                          capture_output=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "[0, 1] [6.0, 6.0] ['x', 'x']"
    assert lines[1] == "[0, 1] [3.0, 3.0]"
    assert lines[2] == "3"        # two workers, each its own process besides the caller
    assert lines[3].startswith("TmlError training kwargs do not fit work"), lines[3]


AFTER_OPENMP = textwrap.dedent("""
    import torch
    from tml.common.run_training import run_forked

    # The parent's OpenMP threads start (as after any torch work in a notebook or a test).
    torch.set_num_threads(2)
    for _ in range(3):
        torch.nn.functional.logsigmoid(torch.randn(4_000_000)).sum()

    def work():
        # A multi-threaded kernel in the forked worker: GNU OpenMP hung here forever.
        values = torch.nn.functional.logsigmoid(torch.randn(4_000_000))
        return (torch.get_num_threads(), bool(values.sum() < 0))

    print(run_forked(work, 2))
""")


@pytest.mark.slow
def test_forked_workers_run_after_the_parent_used_openmp_threads():
    done = subprocess.run([sys.executable, "-c", AFTER_OPENMP], cwd=REPO, capture_output=True,
                          text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": REPO, "TML_MAX_RESTARTS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{0: (1, True), 1: (1, True)}"


AFTER_FLIGHT = textwrap.dedent("""
    import sys

    import pyarrow.flight as flight

    from tml.common.run_training import run_forked, run_spawned
    from workers_module import flight_imported   # importable: a spawned worker can load it

    def flight_imported_here():                  # defined in __main__: can only be forked
        return "pyarrow.flight" in sys.modules

    print(run_forked(flight_imported, 2))        # no gRPC threads yet: forked
    print(run_spawned(flight_imported, 2))       # spawned: fresh interpreters
    try:
        run_spawned(flight_imported_here, 2)
    except Exception as error:
        print(type(error).__name__, str(error).split(":")[0])
    server = flight.FlightServerBase("grpc://127.0.0.1:0")
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    client.close()
    server.shutdown()
    print(run_forked(flight_imported, 2))        # gRPC threads run: spawned
    print(run_forked(flight_imported_here, 2))   # forked, with a warning
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_are_spawned_once_grpc_threads_run_and_the_function_is_importable(tmp_path):
    """A process that made an Arrow Flight client keeps gRPC threads; forked workers hung
    (`tml.common.fork_safety`). An importable function's workers are spawned then: a
    spawned worker has not imported pyarrow.flight, a forked one inherited it.
    `run_spawned` always spawns, and refuses a function a fresh interpreter cannot import."""
    (tmp_path / "workers_module.py").write_text(
        "import sys\n\n\ndef flight_imported():\n    return 'pyarrow.flight' in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]), TML_MAX_RESTARTS="0")
    done = subprocess.run([sys.executable, "-"], input=AFTER_FLIGHT, text=True, env=env,
                          capture_output=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()[-5:]
    assert lines == ["{0: True, 1: True}", "{0: False, 1: False}", "TmlError run_spawned",
                     "{0: False, 1: False}", "{0: True, 1: True}"], lines
    assert "is defined in __main__, so its workers are forked" in done.stderr
