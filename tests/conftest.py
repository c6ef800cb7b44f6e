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
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not host_has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marker gpu)")
        for item in gpu_items:
            item.add_marker(skip)
