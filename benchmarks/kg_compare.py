"""tml TwHIN against PyKEEN on a small public link-prediction benchmark, side by side.

The dataset (Nations by default; UMLS or Kinships) is read from the PyKEEN package
installed in a separate virtual environment (its wheel ships train/valid/test as text), so
nothing is downloaded. Both sides use the same splits, the same embedding size in real
numbers (ComplEx in PyKEEN counts complex dimensions, so it gets dim/2), 1 CPU thread each,
and the same metric: filtered ranks over train + valid + test, ties at the mean (PyKEEN's
"realistic" rank, tml's 1 + #greater + #equal/2), both sides (head and tail) together.

    # once (`make bench-quality` does it): python3 -m venv .venv-pykeen &&
    #   .venv-pykeen/bin/pip install torch==2.13.0 pykeen==1.11.1
    .venv/bin/python -m benchmarks.kg_compare [.venv-pykeen] [--dataset nations umls]
        [--seeds 0 1 2] [--rows defaults,old,tuned] [--skip-pykeen] [--quick]

Writes benchmarks/results/kg_compare.json (or --out) and prints a markdown table. Each tml
row is evaluated on the validation split too (`validation_mrr`): choose settings by that,
report the test figures. `--skip-pykeen` keeps the PyKEEN rows already in --out (same
dataset, dim, epochs and seed) instead of running PyKEEN again (slow).
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

# tml runs: (kind, label, operator or None for the config's own, --set overrides, whether
# --epochs applies). "importer defaults" is `twhin import`'s config exactly as written
# (its own epochs, negatives, learning rates and operators: the rule in
# projects/twhin/importer.py). "old import defaults" is what the importer wrote before
# that rule (translation, 10 in-batch + 5 global negatives, Adagrad 0.5, SGD 0.05 for the
# relation vectors), trained for --epochs. The tuned ones drop in-batch negatives (with
# ~50 relations per batch of 79 edges, a relation's in-batch "negative" is mostly the
# positive itself), draw global negatives instead and raise both learning rates (tried:
# Adagrad 0.05 to 20, SGD 0.05 to 500, 50 to 200 epochs; Adam for tables fails on CPU:
# fbgemm refuses `betas`).
OLD_DEFAULTS = {"train_data.in_batch_negatives": 10, "train_data.global_negatives": 5,
                "model.embeddings.tables.0.optimizer.adagrad.lr": 0.5,
                "model.translation_optimizer.sgd.lr": 0.05}
TUNED = {"train_data.in_batch_negatives": 0, "train_data.global_negatives": 13,
         "model.embeddings.tables.0.optimizer.adagrad.lr": 5,
         "model.translation_optimizer.sgd.lr": 50}
TML_RUNS = [
    ("defaults", "importer defaults", None, {}, False),
    ("old", "old import defaults", "translation", OLD_DEFAULTS, True),
    ("tuned", "tuned", "translation", TUNED, True),
    ("tuned", "tuned", "diagonal", TUNED, True),
    ("tuned", "tuned", "complex_diagonal", TUNED, True),
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
from pykeen.training.callbacks import TrainingCallback
spec = json.loads(sys.argv[1])
start = time.perf_counter()


class CpuClock(TrainingCallback):
    # CPU seconds of the training loop: from its first batch to the end of training.
    first = last = None

    def pre_batch(self, **kwargs):
        if self.first is None:
            self.first = time.process_time()

    def post_train(self, losses, **kwargs):
        self.last = time.process_time()


clock = CpuClock()
data = ({"dataset": spec["dataset"]} if "dataset" in spec else
        {"training": spec["paths"]["train"], "validation": spec["paths"]["valid"],
         "testing": spec["paths"]["test"]})
result = pipeline(
    **data, model=spec["model"],
    model_kwargs=dict(embedding_dim=spec["dim"]),
    training_kwargs=dict(num_epochs=spec["epochs"], use_tqdm=False, callbacks=[clock],
                         **spec.get("training_kwargs", {})),
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
out["train_cpu_seconds"] = clock.last - clock.first
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


def _evaluate(twhin: list[str], save_dir: str, split: str, log: str, env: dict
              ) -> tuple[dict, float]:
    out, seconds = run(twhin + ["evaluate", "--config",
                                os.path.join(save_dir, "twhin_config.yaml"), "--checkpoint",
                                save_dir, "--split", split, "--json"], log, env)
    return json.loads(out), seconds


def tml_side(paths: dict[str, str], work: str, dim: int, epochs: int, seeds: list[int],
             runs: list, env: dict) -> list[dict]:
    twhin = [sys.executable, "-m", "projects.twhin"]
    data = os.path.join(work, "tml_data")
    run(twhin + ["import", "--triples", paths["train"], "--valid", paths["valid"],
                 "--test", paths["test"], "--out", data, "--dim", str(dim), "--force"],
        os.path.join(work, "tml_import.log"), env)
    config = os.path.join(data, "config.yaml")
    with open(config) as f:
        written = yaml.safe_load(f)
    num_relations = len(written["model"]["relations"])
    rows = []
    for index, (_, label, operator, overrides, set_epochs) in enumerate(runs):
        for seed in seeds:
            name = f"tml_run{index}_seed{seed}"
            save_dir = os.path.join(work, name)
            sets: dict = {} if operator is None else {
                f"model.relations.{i}.operator": operator for i in range(num_relations)}
            sets.update({"training.seed": seed}, **overrides)
            if set_epochs:
                sets["training.num_epochs"] = epochs
            flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
            _, train_s = run(twhin + ["train", "--config", config, "--save_dir", save_dir,
                                      "--nproc_per_node", "1"] + flags,
                             os.path.join(work, f"{name}_train.log"), env)
            metrics, eval_s = _evaluate(twhin, save_dir, "test",
                                        os.path.join(work, f"{name}_eval.log"), env)
            valid, _ = _evaluate(twhin, save_dir, "validation",
                                 os.path.join(work, f"{name}_valid.log"), env)
            with open(os.path.join(save_dir, "twhin_config.yaml")) as f:
                effective = yaml.safe_load(f)
            operators = sorted({r["operator"] for r in effective["model"]["relations"]})
            rows.append({"side": "tml", "model": f"{'/'.join(operators)} ({label})",
                         "dim": dim, "epochs": effective["training"]["num_epochs"],
                         "seed": seed, "mrr": metrics["mrr"],
                         "validation_mrr": valid["mrr"],
                         "hits_at_1": metrics["hits_at_1"], "hits_at_3": metrics["hits_at_3"],
                         "hits_at_10": metrics["hits_at_10"],
                         "mean_rank": metrics["mean_rank"],
                         "head_mrr": metrics["head"]["mrr"], "tail_mrr": metrics["tail"]["mrr"],
                         "train_seconds": train_s, "wall_seconds": train_s + eval_s,
                         "num_edges": metrics["num_edges"],
                         "skipped_unseen": metrics["num_skipped_unseen"],
                         "overrides": {k: v for k, v in sets.items()
                                       if not k.startswith("model.relations.")}})
            print(f"tml {rows[-1]['model']} seed {seed}: MRR {metrics['mrr']:.3f} "
                  f"(validation {valid['mrr']:.3f})", flush=True)
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
                     "pykeen_embedding_dim": model_dim, "epochs": epochs, "seed": seed,
                     **metrics,
                     "wall_seconds": wall, "kwargs": kwargs})
        print(f"pykeen {rows[-1]['model']}: MRR {metrics['mrr']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dataset | library | model / operator | dim | epochs | seed | valid MRR | MRR "
             "| Hits@1 | Hits@3 | Hits@10 | mean rank | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        valid = r.get("validation_mrr")
        lines.append(f"| {r['dataset']} | {r['side']} | {r['model']} | {r['dim']} "
                     f"| {r['epochs']} | {r.get('seed', '')} "
                     f"| {'' if valid is None else f'{valid:.3f}'} "
                     f"| {r['mrr']:.3f} | {r['hits_at_1']:.3f} | {r['hits_at_3']:.3f} "
                     f"| {r['hits_at_10']:.3f} | {r['mean_rank']:.2f} "
                     f"| {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def earlier_rows(path: str) -> list[dict]:
    """The rows of an earlier report at `path`, each with its dataset and seed."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        report = json.load(f)
    return [dict(row, dataset=row.get("dataset", report.get("dataset")),
                 seed=row.get("seed", report.get("seed"))) for row in report.get("rows", [])]


def _key(row: dict) -> tuple:
    return row["dataset"], row["side"], row["model"], row["dim"], row["epochs"], row["seed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", nargs="?", default=os.path.join(REPO, ".venv-pykeen"),
                        help="virtual environment with pykeen installed")
    parser.add_argument("--dataset", nargs="+", choices=sorted(DATASETS), default=["nations"])
    parser.add_argument("--dim", type=int, default=32, help="real numbers per embedding")
    parser.add_argument("--epochs", type=int, default=100,
                        help="epochs of every run except 'importer defaults' (its own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="tml runs repeat for each; PyKEEN runs use the first")
    parser.add_argument("--rows", default="defaults,old,tuned",
                        help="which tml rows: defaults, old, tuned (comma-separated)")
    parser.add_argument("--skip-pykeen", action="store_true",
                        help="do not run PyKEEN; keep the PyKEEN rows of --out for these "
                        "datasets")
    parser.add_argument("--append", action="store_true",
                        help="keep every row of --out that this run does not redo")
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
    kinds = set(args.rows.split(","))
    tml_runs = TML_RUNS[-1:] if args.quick else [r for r in TML_RUNS if r[0] in kinds]
    pykeen_runs = PYKEEN_RUNS[-1:] if args.quick else PYKEEN_RUNS
    work = args.work or tempfile.mkdtemp(prefix="kg_compare_")
    os.makedirs(work, exist_ok=True)
    version = subprocess.run([venv_python, "-c", "import pykeen; print(pykeen.get_version())"],
                             capture_output=True, text=True).stdout.strip()
    earlier = earlier_rows(args.out)
    names = [DATASETS[d] for d in args.dataset]
    rows = []
    for dataset in args.dataset:
        folder = os.path.join(work, dataset)
        os.makedirs(folder, exist_ok=True)
        paths = extract_dataset(venv_python, dataset, folder)
        found = tml_side(paths, folder, args.dim, args.epochs, args.seeds, tml_runs, env)
        if not args.skip_pykeen:
            found += pykeen_side(venv_python, DATASETS[dataset], args.dim, args.epochs,
                                 args.seeds[0], pykeen_runs, folder, env)
        rows += [dict(row, dataset=DATASETS[dataset]) for row in found]
    redone = {_key(row) for row in rows}
    kept = [row for row in earlier if _key(row) not in redone and (
        args.append or (args.skip_pykeen and row["side"] == "pykeen"
                        and row["dataset"] in names))]
    rows = kept + rows
    report = {"datasets": sorted({row["dataset"] for row in rows}), "dim": args.dim,
              "epochs": args.epochs, "seeds": sorted({row["seed"] for row in rows}),
              "pykeen_version": version,
              "threads": 1, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "metric": "filtered (train+valid+test), realistic rank (ties at the mean), "
                        "head and tail together, test split (validation_mrr: the same on "
                        "the validation split)",
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(rows))
    print(f"\nwritten: {args.out}; logs and checkpoints: {work}")


if __name__ == "__main__":
    main()
