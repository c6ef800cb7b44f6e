"""tml TwHIN against PyKEEN on a small public link-prediction benchmark, side by side.

The dataset (Nations by default; UMLS or Kinships) is read from the PyKEEN package
installed in a separate virtual environment (its wheel ships train/valid/test as text), so
nothing is downloaded. Both sides use the same splits, the same embedding size in real
numbers (ComplEx in PyKEEN counts complex dimensions, so it gets dim/2), 1 CPU thread each,
and the same metric: filtered ranks over train + valid + test, ties at the mean (PyKEEN's
"realistic" rank, tml's 1 + #greater + #equal/2), both sides (head and tail) together.

    # once: python3 -m venv /tmp/kgvenv && /tmp/kgvenv/bin/pip install torch==2.13.0 pykeen
    .venv/bin/python -m benchmarks.kg_compare [/tmp/kgvenv] [--dataset nations] [--quick]

Writes benchmarks/results/kg_compare.json (or --out) and prints a markdown table.
train_s is the wall-clock of the whole `twhin train` command for tml (launcher, sharding
planner and checkpoints included) and PyKEEN's own training-loop time for PyKEEN (its
process and dataset set-up excluded); wall_s is each side's command-to-finish.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = {"nations": "Nations", "umls": "UMLS", "kinships": "Kinships"}

# tml runs: (label, operator, --set overrides). "imported" is `twhin import`'s config as
# written (translation operator, 10 in-batch + 5 global negatives, Adagrad 0.5, SGD 0.05
# for the relation vectors); the tuned ones drop in-batch negatives (with ~50 relations
# per batch of 79 edges, a relation's in-batch "negative" is mostly the positive itself),
# draw global negatives instead and raise both learning rates (tried: Adagrad 0.05 to
# 20, SGD 0.05 to 500, 50 to 200 epochs; Adam for tables fails on CPU: fbgemm refuses
# `betas`).
TUNED = {"train_data.in_batch_negatives": 0, "train_data.global_negatives": 13,
         "model.embeddings.tables.0.optimizer.adagrad.lr": 5,
         "model.translation_optimizer.sgd.lr": 50}
TML_RUNS = [
    ("imported config", "translation", {}),
    ("tuned", "translation", TUNED),
    ("tuned", "diagonal", TUNED),
    ("tuned", "complex_diagonal", TUNED),
]
# PyKEEN runs: (model, kwargs for pipeline()). Default pipeline = sLCWA, 1 negative per
# positive, Adam lr 1e-3; the "lcwa" ones score every tail (1-N) with Adam lr 5e-2
# (tried 1e-2 and 5e-2 on Nations; 5e-2 was better for both).
PYKEEN_RUNS = [
    ("TransE", {}),
    ("DistMult", {}),
    ("ComplEx", {}),
    ("DistMult", {"training_loop": "lcwa", "optimizer_kwargs": {"lr": 0.05}}),
    ("ComplEx", {"training_loop": "lcwa", "optimizer_kwargs": {"lr": 0.05}}),
]

PYKEEN_SCRIPT = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from pykeen.pipeline import pipeline
spec = json.loads(sys.argv[1])
start = time.perf_counter()
result = pipeline(
    dataset=spec["dataset"], model=spec["model"],
    model_kwargs=dict(embedding_dim=spec["dim"]),
    training_kwargs=dict(num_epochs=spec["epochs"], use_tqdm=False),
    evaluation_kwargs=dict(use_tqdm=False),
    random_seed=spec["seed"], device="cpu", **spec["kwargs"])
wall = time.perf_counter() - start
m = result.metric_results
out = {key: float(m.get_metric("both.realistic." + name)) for key, name in [
    ("mrr", "inverse_harmonic_mean_rank"), ("hits_at_1", "hits_at_1"),
    ("hits_at_3", "hits_at_3"), ("hits_at_10", "hits_at_10"),
    ("mean_rank", "arithmetic_mean_rank")]}
out["tail_mrr"] = float(m.get_metric("tail.realistic.inverse_harmonic_mean_rank"))
out["head_mrr"] = float(m.get_metric("head.realistic.inverse_harmonic_mean_rank"))
out["train_seconds"] = float(result.train_seconds)
out["pipeline_seconds"] = wall
print("RESULT " + json.dumps(out))
"""


def run(cmd: list[str], log: str, env: dict | None = None) -> tuple[str, float]:
    """Runs cmd from the repository root, stdout+stderr to log; returns stdout and seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"error: {cmd[:4]} failed ({proc.returncode}); see {log}")
    return proc.stdout, seconds


def extract_dataset(venv_python: str, name: str, work: str) -> dict[str, str]:
    """Copies the dataset's train/valid/test text files out of the installed pykeen."""
    code = (f"import pathlib, pykeen.datasets.{name} as m; "
            "print(pathlib.Path(m.__file__).parent)")
    folder = subprocess.run([venv_python, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    paths = {}
    for split in ("train", "valid", "test"):
        paths[split] = os.path.join(work, f"{name}_{split}.tsv")
        shutil.copyfile(os.path.join(folder, f"{split}.txt"), paths[split])
    return paths


def tml_side(paths: dict[str, str], work: str, dim: int, epochs: int, seed: int,
             runs: list, env: dict) -> list[dict]:
    twhin = [sys.executable, "-m", "projects.twhin"]
    data = os.path.join(work, "tml_data")
    run(twhin + ["import", "--triples", paths["train"], "--valid", paths["valid"],
                 "--test", paths["test"], "--out", data, "--dim", str(dim), "--force"],
        os.path.join(work, "tml_import.log"), env)
    config = os.path.join(data, "config.yaml")
    with open(config) as f:
        num_relations = len(yaml.safe_load(f)["model"]["relations"])
    rows = []
    for index, (label, operator, overrides) in enumerate(runs):
        save_dir = os.path.join(work, f"tml_run{index}")
        sets = {f"model.relations.{i}.operator": operator for i in range(num_relations)}
        sets.update({"training.num_epochs": epochs, "training.seed": seed}, **overrides)
        flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
        _, train_s = run(twhin + ["train", "--config", config, "--save_dir", save_dir,
                                  "--nproc_per_node", "1"] + flags,
                         os.path.join(work, f"tml_run{index}_train.log"), env)
        out, eval_s = run(twhin + ["evaluate", "--config",
                                   os.path.join(save_dir, "twhin_config.yaml"),
                                   "--checkpoint", save_dir, "--split", "test", "--json"],
                          os.path.join(work, f"tml_run{index}_eval.log"), env)
        metrics = json.loads(out)
        rows.append({"side": "tml", "model": f"{operator} ({label})", "dim": dim,
                     "epochs": epochs, "mrr": metrics["mrr"],
                     "hits_at_1": metrics["hits_at_1"], "hits_at_3": metrics["hits_at_3"],
                     "hits_at_10": metrics["hits_at_10"], "mean_rank": metrics["mean_rank"],
                     "head_mrr": metrics["head"]["mrr"], "tail_mrr": metrics["tail"]["mrr"],
                     "train_seconds": train_s, "wall_seconds": train_s + eval_s,
                     "num_edges": metrics["num_edges"],
                     "skipped_unseen": metrics["num_skipped_unseen"],
                     "overrides": {k: v for k, v in sets.items()
                                   if not k.startswith("model.relations.")}})
        print(f"tml {rows[-1]['model']}: MRR {metrics['mrr']:.3f}", flush=True)
    return rows


def pykeen_side(venv_python: str, dataset: str, dim: int, epochs: int, seed: int,
                runs: list, work: str, env: dict) -> list[dict]:
    rows = []
    for index, (model, kwargs) in enumerate(runs):
        # ComplEx's embedding_dim is complex numbers: dim/2 of them hold dim reals.
        model_dim = dim // 2 if model == "ComplEx" else dim
        spec = {"dataset": dataset, "model": model, "dim": model_dim, "epochs": epochs,
                "seed": seed, "kwargs": kwargs}
        out, wall = run([venv_python, "-c", PYKEEN_SCRIPT, json.dumps(spec)],
                        os.path.join(work, f"pykeen_run{index}.log"), env)
        metrics = json.loads(out.split("RESULT ", 1)[1])
        loop = kwargs.get("training_loop", "slcwa")
        lr = kwargs.get("optimizer_kwargs", {}).get("lr", 0.001)
        rows.append({"side": "pykeen", "model": f"{model} ({loop}, Adam {lr})", "dim": dim,
                     "pykeen_embedding_dim": model_dim, "epochs": epochs, **metrics,
                     "wall_seconds": wall, "kwargs": kwargs})
        print(f"pykeen {rows[-1]['model']}: MRR {metrics['mrr']:.3f}", flush=True)
    return rows


def table(dataset: str, rows: list[dict]) -> str:
    lines = ["| dataset | library | model / operator | dim | epochs | MRR | Hits@1 | Hits@3 "
             "| Hits@10 | mean rank | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {dataset} | {r['side']} | {r['model']} | {r['dim']} | {r['epochs']} "
                     f"| {r['mrr']:.3f} | {r['hits_at_1']:.3f} | {r['hits_at_3']:.3f} "
                     f"| {r['hits_at_10']:.3f} | {r['mean_rank']:.2f} "
                     f"| {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", nargs="?", default="/tmp/kgvenv",
                        help="virtual environment with pykeen installed")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="nations")
    parser.add_argument("--dim", type=int, default=32, help="real numbers per embedding")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="one run per side (tuned ComplEx / ComplEx lcwa)")
    parser.add_argument("--work", help="keep data, checkpoints and logs here")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "kg_compare.json"))
    args = parser.parse_args()
    venv_python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(venv_python):
        sys.exit(f"error: {venv_python} not found (create the PyKEEN venv first)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tml_runs = TML_RUNS[-1:] if args.quick else TML_RUNS
    pykeen_runs = PYKEEN_RUNS[-1:] if args.quick else PYKEEN_RUNS
    work = args.work or tempfile.mkdtemp(prefix="kg_compare_")
    os.makedirs(work, exist_ok=True)
    paths = extract_dataset(venv_python, args.dataset, work)
    version = subprocess.run([venv_python, "-c", "import pykeen; print(pykeen.get_version())"],
                             capture_output=True, text=True).stdout.strip()
    rows = tml_side(paths, work, args.dim, args.epochs, args.seed, tml_runs, env)
    rows += pykeen_side(venv_python, DATASETS[args.dataset], args.dim, args.epochs,
                        args.seed, pykeen_runs, work, env)
    report = {"dataset": DATASETS[args.dataset], "dim": args.dim, "epochs": args.epochs,
              "seed": args.seed, "pykeen_version": version, "threads": 1,
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "metric": "filtered (train+valid+test), realistic rank (ties at the mean), "
                        "head and tail together, test split",
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(DATASETS[args.dataset], rows))
    print(f"\nwritten: {args.out}; logs and checkpoints: {work}")


if __name__ == "__main__":
    main()
