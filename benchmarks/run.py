"""`make bench`: tml TwHIN against a plain-PyTorch trainer on one generated graph.

One run measures, side by side and in the same conditions (the machine is noisy, so the
report gives ratios within the run):
* tml TwHIN with 1 and 2 workers, end to end (data reading included): positive edges/s,
  peak RSS per process, held-out AUC;
* `benchmarks/baselines/plain_twhin.py`, the same model and loss in plain PyTorch;
* the data reader alone (batches/s), which must be at least 5x the training rate;
* command-to-finish of a one-step run: `python projects/twhin/run.py` (self-launch) against
  a direct `torchrun` of the same script (the launcher's own cost).

Writes benchmarks/results/<name>.json and <name>.md, and prints the table.

    python -m benchmarks.run [--name cpu-2core] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import yaml

import tml  # noqa: F401
from projects.twhin.data.generate import generate_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")
RESULTS = os.path.join(REPO, "benchmarks", "results")

FULL = {"num_users": 400_000, "num_tweets": 70_000, "num_edges": 2_000_000,
        "num_communities": 50, "dim": 64, "batch": 4000, "negatives": 10}
QUICK = {"num_users": 4_000, "num_tweets": 700, "num_edges": 40_000,
         "num_communities": 5, "dim": 16, "batch": 200, "negatives": 10}


def _config(graph: str, sizes: dict, path: str, steps: int | None = None) -> str:
    data = yaml.safe_load(open(LOCAL).read())
    sgd = {"sgd": {"lr": sizes["lr"]}}
    for table, rows in zip(data["model"]["embeddings"]["tables"],
                           (sizes["num_users"], sizes["num_tweets"])):
        table.update(num_embeddings=rows, embedding_dim=sizes["dim"], optimizer=sgd)
    data["model"]["translation_optimizer"] = {"sgd": {"lr": sizes["lr"] / 100}}
    for section, split in (("train_data", "train"), ("validation_data", "validation")):
        data[section].update(data_root=os.path.join(graph, split),
                             per_replica_batch_size=sizes["batch"],
                             in_batch_negatives=sizes["negatives"])
    data["training"].update(num_epochs=1, num_eval_steps=40, eval_log_every_n=10**9,
                            checkpoint_every_n=10**9, train_log_every_n=10**9,
                            num_train_steps=steps or 10**9)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO
    return env


def _run_tml(config: str, nproc: int, work: str) -> dict:
    out = tempfile.mkdtemp(dir=work)
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "twhin_tml.py"),
                    f"--config={config}", f"--save_dir={out}/save", f"--out_dir={out}",
                    f"--nproc={nproc}"], env=_env(), check=True, capture_output=True)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]
    seconds = max(r["train_seconds"] for r in ranks)
    batch = yaml.safe_load(open(config))["train_data"]["per_replica_batch_size"]
    return {"workers": nproc, "edges_per_s": ranks[0]["steps"] * batch * nproc / seconds,
            "train_seconds": seconds, "total_seconds": max(r["total_seconds"] for r in ranks),
            "peak_rss_mib": [round(r["peak_rss_mib"]) for r in ranks], "auc": ranks[0]["auc"],
            "threads_per_worker": ranks[0]["threads"]}


def _run_plain(config: str, work: str) -> dict:
    out = os.path.join(work, "plain.json")
    # Its best setting here: 1 thread (12% faster than 2 on the 2-core box, OpenMP spin).
    env = {**_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "benchmarks.baselines.plain_twhin",
                    f"--config={config}", f"--out={out}"], env=env, check=True, cwd=REPO,
                   capture_output=True)
    return json.load(open(out))


def _reader_rate(config: str, seconds: float = 5.0) -> dict:
    from projects.twhin.config import TwhinConfig
    from projects.twhin.data.data import create_dataset
    from tml.core.config import load_config_from_yaml

    cfg = load_config_from_yaml(TwhinConfig, config)
    dataset = create_dataset(cfg.train_data, cfg.model)
    count, start = 0, time.perf_counter()
    for _ in dataset:
        count += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"batches_per_s": count / elapsed,
            "edges_per_s": count * cfg.train_data.per_replica_batch_size / elapsed}


def _launch_overhead(config: str, work: str) -> dict:
    run = os.path.join(REPO, "projects", "twhin", "run.py")
    timings = {}
    commands = {
        "self_launch": [sys.executable, run, f"--config_yaml_path={config}", "--nproc_per_node=2"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2", run, f"--config_yaml_path={config}"],
    }
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command + [f"--save_dir={tempfile.mkdtemp(dir=work)}"], env=_env(),
                       check=True, capture_output=True)
        timings[name] = time.perf_counter() - start
    timings["ratio"] = timings["self_launch"] / timings["torchrun"]
    return timings


def _table(report: dict) -> str:
    rows = ["| trainer | edges/s | vs plain PyTorch | held-out AUC | peak RSS MiB per process |",
            "|---|---|---|---|---|"]
    plain = report["plain_pytorch"]["edges_per_s"]
    for name, entry in (("tml, 1 worker", report["tml_1_worker"]),
                        ("tml, 2 workers", report["tml_2_workers"]),
                        ("plain PyTorch, 1 process", report["plain_pytorch"])):
        rss = entry["peak_rss_mib"]
        rows.append(f"| {name} | {entry['edges_per_s']:,.0f} | {entry['edges_per_s'] / plain:.2f}x"
                    f" | {entry['auc']:.3f} | {rss if isinstance(rss, list) else round(rss)} |")
    reader = report["reader"]
    launch = report["launch"]
    rows += ["", f"Data reader alone: {reader['batches_per_s']:,.0f} batches/s "
             f"({reader['edges_per_s']:,.0f} edges/s, "
             f"{reader['edges_per_s'] / report['tml_1_worker']['edges_per_s']:.1f}x the 1-worker "
             "training rate).",
             f"One-step run, command to exit: self-launch {launch['self_launch']:.1f} s, "
             f"torchrun {launch['torchrun']:.1f} s (ratio {launch['ratio']:.2f})."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"cpu-{os.cpu_count()}core")
    parser.add_argument("--quick", action="store_true", help="tiny graph (smoke test)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["batch"] = args.batch or sizes["batch"]
    sizes["lr"] = args.lr or 1000.0
    os.makedirs(RESULTS, exist_ok=True)
    cache = os.path.join(REPO, "benchmarks", ".data")
    graph = os.path.join(cache, "quick" if args.quick else "full")
    generate_graph(graph, num_users=sizes["num_users"], num_tweets=sizes["num_tweets"],
                   num_edges=sizes["num_edges"], num_communities=sizes["num_communities"],
                   seed=0, validation_fraction=0.02)
    with tempfile.TemporaryDirectory(prefix="tml-bench-") as work:
        config = _config(graph, sizes, os.path.join(work, "bench.yaml"))
        one_step = _config(graph, sizes, os.path.join(work, "one_step.yaml"), steps=1)
        report = {"name": args.name, "sizes": sizes, "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}}
        report["plain_pytorch"] = _run_plain(config, work)
        report["tml_1_worker"] = _run_tml(config, 1, work)
        report["tml_2_workers"] = _run_tml(config, 2, work)
        report["reader"] = _reader_rate(config)
        report["launch"] = _launch_overhead(one_step, work)
    report["table"] = _table(report)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(report["table"] + "\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
