"""`make bench`: tml TwHIN against a plain-PyTorch trainer on one generated graph.

One run measures, side by side and in the same conditions (the machine is noisy, so the
report gives ratios within the run):
* tml TwHIN with 1 and 2 workers, end to end (data reading included): positive edges/s,
  peak RSS per process, held-out AUC;
* tml with fp16 tables (half the memory; fbgemm converts on the fly on CPU);
* `benchmarks/baselines/plain_twhin.py`, the same model and loss in plain PyTorch, as a
  user would run it and again with the glibc malloc settings tml's workers give themselves
  (`tml.common.allocator`), so the table shows how much of a difference is the allocator's;
* the data reader alone (batches/s), which must be at least 5x the training rate;
* command-to-finish of a one-step run: `python projects/twhin/run.py` (self-launch) against
  a direct `torchrun` of the same script (the launcher's own cost);
* reader processes (`benchmarks/readers.py`): batches/s to a trainer from 1 and 2 readers
  against in-process reading, and a short run fed by readers against in-process reading.

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
from benchmarks import readers as readers_bench
from projects.twhin.data.generate import generate_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")
RESULTS = os.path.join(REPO, "benchmarks", "results")

FULL = {"num_users": 400_000, "num_tweets": 70_000, "num_edges": 2_000_000,
        "num_communities": 50, "dim": 64, "batch": 4000, "negatives": 10, "epochs": 2}
QUICK = {"num_users": 4_000, "num_tweets": 700, "num_edges": 40_000,
         "num_communities": 5, "dim": 16, "batch": 200, "negatives": 10, "epochs": 2}
# SGD step per edge. The loss is a mean over the batch's B * (1 + 2 * negatives) logits
# (84,000 for FULL), so the table lr is this times that count (~50,000 for FULL). Measured
# on FULL (plain trainer, held-out AUC): lr 1,000 leaves the tables where they started (AUC
# 0.50 after any number of epochs); 50,000 gives 0.73 after one epoch and 0.87 after two;
# 100,000 diverges in the second epoch (sampled in-batch negatives are scored against a
# whole relation, so their rows take ~50x a positive's gradient).
EDGE_LR = 0.6
# The relation vectors' gradient sums over every edge of the relation in the batch (~1,000
# rows each): at lr / 100 they diverge in the first epoch and at lr / 1,000 they cost 0.11
# AUC after two epochs; at lr / 10,000 they cost 0.01 (against not training them at all).
TRANSLATION_LR_RATIO = 1e-4


def step_lr(sizes: dict) -> float:
    """The SGD lr per step for `sizes`' batch: `EDGE_LR` per edge of the mean loss."""
    return EDGE_LR * sizes["batch"] * (1 + 2 * sizes["negatives"])


def bench_graph(quick: bool = False) -> tuple[dict, str]:
    """`make bench`'s sizes (with the SGD lr per step) and its generated graph, made once and
    cached in benchmarks/.data: every tool that measures a step measures the same one."""
    sizes = dict(QUICK if quick else FULL)
    sizes["lr"] = step_lr(sizes)
    graph = os.path.join(REPO, "benchmarks", ".data", "quick" if quick else "full")
    generate_graph(graph, num_users=sizes["num_users"], num_tweets=sizes["num_tweets"],
                   num_edges=sizes["num_edges"], num_communities=sizes["num_communities"],
                   seed=0, validation_fraction=0.02)
    return sizes, graph


def one_process_rank(port_base: int = 29500) -> None:
    """This process as rank 0 of a world of one, for tools that train in-process."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port_base + os.getpid() % 1000))


def _config(graph: str, sizes: dict, path: str, steps: int | None = None,
            workers: int = 1, data_type: str = "fp32") -> str:
    """The tml TwHIN YAML; the plain trainer reads the same file (workers=1).

    With N workers TorchRec divides the table gradients by N (as DDP does the dense ones):
    a step is the mean over N batches, so the lr is N times larger (linear scaling) to make
    the same progress per edge; measured on FULL, 2 workers at the 1-worker lr reach AUC
    0.70 where 1 worker reaches 0.87, and 0.87 with it doubled.
    """
    data = yaml.safe_load(open(LOCAL).read())
    lr = sizes["lr"] * workers
    sgd = {"sgd": {"lr": lr}}
    for table, rows in zip(data["model"]["embeddings"]["tables"],
                           (sizes["num_users"], sizes["num_tweets"])):
        table.update(num_embeddings=rows, embedding_dim=sizes["dim"], optimizer=sgd,
                     data_type=data_type)
    data["model"]["translation_optimizer"] = {"sgd": {"lr": lr * TRANSLATION_LR_RATIO}}
    for section, split in (("train_data", "train"), ("validation_data", "validation")):
        data[section].update(data_root=os.path.join(graph, split),
                             per_replica_batch_size=sizes["batch"],
                             in_batch_negatives=sizes["negatives"])
    data["training"].update(num_epochs=sizes["epochs"], num_eval_steps=40,
                            eval_log_every_n=10**9, checkpoint_every_n=10**9,
                            train_log_every_n=10**9, num_train_steps=steps or 10**9)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # The repository first; a PYTHONPATH already set (packages installed beside it, as on
    # a GPU host) stays after it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def _run_tml(config: str, nproc: int, work: str, prefix: tuple[str, ...] = ()) -> dict:
    """tml with `nproc` workers on `config`; `prefix` goes before the command (`taskset`)."""
    out = tempfile.mkdtemp(dir=work)
    subprocess.run([*prefix, sys.executable, os.path.join(REPO, "benchmarks", "twhin_tml.py"),
                    f"--config={config}", f"--save_dir={out}/save", f"--out_dir={out}",
                    f"--nproc={nproc}"], env=_env(), check=True, capture_output=True)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]
    seconds = max(r["train_seconds"] for r in ranks)
    batch = yaml.safe_load(open(config))["train_data"]["per_replica_batch_size"]
    return {"workers": nproc, "edges_per_s": ranks[0]["steps"] * batch * nproc / seconds,
            "train_seconds": seconds, "total_seconds": max(r["total_seconds"] for r in ranks),
            "peak_rss_mib": [round(r["peak_rss_mib"]) for r in ranks], "auc": ranks[0]["auc"],
            "threads_per_worker": ranks[0]["threads"]}


def _run_plain(config: str, work: str, tuned_malloc: bool = False) -> dict:
    out = os.path.join(work, "plain.json")
    # Its best setting here: 1 thread (12% faster than 2 on the 2-core box, OpenMP spin).
    env = {**_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if tuned_malloc:
        # The glibc settings tml's workers apply to themselves (tml.common.allocator), given
        # to the baseline too: this row shows what is tml's and what is the allocator's.
        from tml.common import allocator
        env.update(MALLOC_MMAP_THRESHOLD_=str(allocator.MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(allocator.TRIM_THRESHOLD),
                   MALLOC_TOP_PAD_=str(allocator.TOP_PAD))
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
    for name, key in (("tml, 1 worker", "tml_1_worker"),
                      ("tml, 2 workers", "tml_2_workers"),
                      ("tml, 1 worker, fp16 tables", "tml_1_worker_fp16"),
                      ("plain PyTorch, 1 process", "plain_pytorch"),
                      ("plain PyTorch, with tml's malloc settings", "plain_pytorch_tuned_malloc")):
        if key not in report:
            continue
        entry = report[key]
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
    parser.add_argument("--results", default=RESULTS, help="directory for the report")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["batch"] = args.batch or sizes["batch"]
    sizes["lr"] = args.lr or step_lr(sizes)
    os.makedirs(args.results, exist_ok=True)
    cache = os.path.join(REPO, "benchmarks", ".data")
    graph = os.path.join(cache, "quick" if args.quick else "full")
    generate_graph(graph, num_users=sizes["num_users"], num_tweets=sizes["num_tweets"],
                   num_edges=sizes["num_edges"], num_communities=sizes["num_communities"],
                   seed=0, validation_fraction=0.02)
    with tempfile.TemporaryDirectory(prefix="tml-bench-") as work:
        config = _config(graph, sizes, os.path.join(work, "bench.yaml"))
        config_2 = _config(graph, sizes, os.path.join(work, "bench-2.yaml"), workers=2)
        one_step = _config(graph, sizes, os.path.join(work, "one_step.yaml"), steps=1)
        report = {"name": args.name, "sizes": sizes, "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}}
        report["plain_pytorch"] = _run_plain(config, work)
        report["tml_1_worker"] = _run_tml(config, 1, work)
        report["tml_2_workers"] = _run_tml(config_2, 2, work)
        report["tml_1_worker_fp16"] = _run_tml(
            _config(graph, sizes, os.path.join(work, "bench-fp16.yaml"), data_type="fp16"),
            1, work)
        report["plain_pytorch_tuned_malloc"] = _run_plain(config, work, tuned_malloc=True)
        # --quick is a smoke test of every row: a 1 s window still counts hundreds of
        # batches (the full run keeps 5 s windows for steady rates).
        window = 1.0 if args.quick else 5.0
        report["reader"] = _reader_rate(config, window)
        report["launch"] = _launch_overhead(one_step, work)
        # Reader processes (issue 17): their rows and table come from benchmarks/readers.py.
        report["readers"] = readers_bench.run(config, work, seconds=window)
    report["table"] = _table(report) + "\n\n" + report["readers"].pop("table")
    with open(os.path.join(args.results, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.results, f"{args.name}.md"), "w") as f:
        f.write(report["table"] + "\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
