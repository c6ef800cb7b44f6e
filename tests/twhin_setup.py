"""Shared set-up of the tests that run TwHIN as a user would: environment and a small config."""

from __future__ import annotations

import os
from collections.abc import Iterable

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")
WORKER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launcher_env(remove: Iterable[str] = WORKER_VARS, **extra: str) -> dict[str, str]:
    """This process's environment for a child launcher: not a worker, repo importable, and
    CPU workers (`CUDA_VISIBLE_DEVICES=""`: on a GPU host the "more workers than GPUs"
    check would refuse 2 workers on 1 GPU; `gpu` tests use tests.conftest.gpu_env)."""
    removed = set(remove)
    env = {k: v for k, v in os.environ.items() if k not in removed}
    env["PYTHONPATH"] = REPO
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def small_twhin_config(path: str | os.PathLike, graph: str | os.PathLike, users: int,
                       tweets: int, batch: int, **training: object) -> str:
    """`local.yaml` resized to a generated graph at `graph`, with `training` overrides."""
    data = yaml.safe_load(open(LOCAL).read())
    data["model"]["embeddings"]["tables"][0]["num_embeddings"] = users
    data["model"]["embeddings"]["tables"][1]["num_embeddings"] = tweets
    data["train_data"].update(data_root=f"{graph}/train", per_replica_batch_size=batch)
    data["validation_data"].update(data_root=f"{graph}/validation",
                                   per_replica_batch_size=batch)
    data["training"].update(training)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)
