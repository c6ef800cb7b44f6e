"""A worker's process group is really gone after `finish_workers`, DDP or not.

torch 2.13's `torch.distributed.nn.functional` captures the default group in its functions'
default arguments when it is imported; DDP and functional collectives import it lazily, after
the group exists, and the group then outlived `destroy_process_group` with gloo's threads
running until interpreter teardown, where a worker now and then aborted after a finished run
(`tml.common.process_group`). Fresh `torchrun` processes: the import order is the point, so
the workers must not inherit this test process's modules.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.twhin_setup import REPO

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from tml.common.device import setup_and_get_device
    from tml.trainer.launch import finish_workers

    def gloo_threads():
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{task}/comm").read().strip())
            except OSError:
                pass
        return sorted(name for name in names if "gloo" in name)

    setup_and_get_device()
    if sys.argv[1] == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        del model
    else:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc
        total = fc.all_reduce(torch.ones(2), "sum", dist.group.WORLD)
        assert float(total.sum()) == 4.0
        del total
    alive = gloo_threads()
    finish_workers()
    import gc
    gc.collect()
    with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"]), "w") as out:
        out.write(f"{bool(alive)} {gloo_threads()}")
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
@pytest.mark.parametrize("mode", ["ddp", "functional"])
def test_no_gloo_thread_outlives_finish_workers(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
         str(script), mode, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # Both ranks ran gloo's threads during the step, and none is left after the teardown.
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "True []", rank
