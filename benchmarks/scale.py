"""How large a table trains here: peak memory of one worker against the table's bytes.

Trains a TwHIN with a `rows x dim` user table for a few steps on a tiny generated graph,
evaluates it and writes its checkpoint (the step that once needed a second copy of the
table), and reports the worker's peak RSS, the ratio to the table's bytes and rows/GiB.

    python -m benchmarks.scale --rows 100000000 --dim 32      # 12.8 GB of fp32 table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

import tml  # noqa: F401
from projects.twhin.data.generate import generate_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")


def measure(rows: int, dim: int, work: str, data_type: str = "fp32") -> dict:
    """Train, evaluate and checkpoint a `rows x dim` table in one worker; its peak RSS."""
    graph = os.path.join(work, "graph")
    generate_graph(graph, num_users=5000, num_tweets=1000, num_edges=50_000,
                   num_communities=5, seed=0, validation_fraction=0.02)
    data = yaml.safe_load(open(LOCAL).read())
    for table, size in zip(data["model"]["embeddings"]["tables"], (rows, 1000)):
        table.update(num_embeddings=size, embedding_dim=dim, data_type=data_type,
                     optimizer={"sgd": {"lr": 10.0}})
    for section, split in (("train_data", "train"), ("validation_data", "validation")):
        data[section].update(data_root=os.path.join(graph, split), per_replica_batch_size=1000)
    data["training"].update(num_train_steps=20, num_epochs=1, checkpoint_every_n=10**9,
                            num_eval_steps=2, eval_log_every_n=10**9, async_checkpoint=False)
    config = os.path.join(work, f"scale-{rows}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    out = tempfile.mkdtemp(dir=work)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = REPO
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "twhin_tml.py"),
                    f"--config={config}", f"--save_dir={out}/save", f"--out_dir={out}",
                    "--nproc=1"], env=env, check=True, capture_output=True)
    report = json.load(open(os.path.join(out, "rank0.json")))
    table_bytes = rows * dim * (2 if data_type == "fp16" else 4)
    peak = report["peak_rss_mib"] * 2**20
    return {"rows": rows, "dim": dim, "data_type": data_type, "table_gib": table_bytes / 2**30,
            "peak_rss_gib": peak / 2**30, "peak_over_table": peak / table_bytes,
            "rows_per_gib": rows / (peak / 2**30), "steps": report["steps"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--data_type", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--name", default=f"scale-cpu-{os.cpu_count()}core")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tml-scale-") as work:
        result = measure(args.rows, args.dim, work, args.data_type)
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
