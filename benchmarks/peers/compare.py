"""`make bench-peers`: tml against PyTorch-BigGraph 1.0 on the same graph, in one run.

Why: a speed claim against PBG means something only when both trained the same graph on
the same machine at the same time, and were scored the same way. On a shared, noisy host
absolute rates drift, so this program interleaves the trainers round by round (tml 1
worker, PBG 1 worker, tml N workers, PBG 2 workers, plain PyTorch, row-access limit, then
again), reports each row's median, and states every row as a ratio to PBG's best setting and
as a fraction of the row-access limit measured in the same run. The load average is
recorded with every sample.

Rows:
* tml TwHIN, 1 and N workers (`benchmarks/twhin_tml.py`, `make bench`'s config);
* PyTorch-BigGraph 1.0 (`benchmarks/peers/pbg_train.py`, in .venv-pbg), workers 1 and 2,
  batch 1000, hogwild_delay 0, no eval split; its best by median rate is the yardstick;
* the plain-PyTorch baseline (`benchmarks/baselines/plain_twhin.py`);
* the row-access limit: for one batch, gather the touched rows of both tables (2 lookups
  per edge) and scatter-add a gradient of the same shape back, 1 thread; batch / that time.

Held-out quality: PBG's trained tables and translations are loaded into the plain baseline's
model and scored by the plain baseline's `evaluate` (the same held-out edges, the same
in-batch negatives, seed and AUC code); tml scores itself with its own evaluation on the
same held-out edges, and the plain row shows the two agree.

    python -m benchmarks.peers [--quick] [--rounds 3] [--name peers-cpu-2core]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import run as bench

REPO = bench.REPO
PBG_PYTHON = os.path.join(REPO, ".venv-pbg", "bin", "python")
PBG_TRAIN = os.path.join(REPO, "benchmarks", "peers", "pbg_train.py")
PBG_BATCH = 1000
# PBG's Adagrad lr on the FULL graph, 2 workers, 2 epochs, scored as below (2026-12-02):
# 0.03 -> AUC 0.52, 0.1 (PBG's default) -> 0.70, 1.0 -> 0.56.
PBG_LR = 0.1
PBG_INIT_SCALE = 0.1


def _graph_hash(graph: str) -> str:
    params = json.load(open(os.path.join(graph, "_SUCCESS")))["params"]
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def prepare_pbg_graph(graph: str) -> str:
    """The graph's train edges in PBG's HDF5 layout, cached by the graph's parameters."""
    from benchmarks.baselines.plain_twhin import _read_edges

    cache = os.path.join(os.path.dirname(graph), f"pbg-{_graph_hash(graph)}")
    if not os.path.exists(os.path.join(cache, "pbg", "_SUCCESS")):
        os.makedirs(cache, exist_ok=True)
        params = json.load(open(os.path.join(graph, "_SUCCESS")))["params"]
        lhs, rel, rhs = _read_edges(os.path.join(graph, "train"))
        for name, array in (("lhs", lhs), ("rel", rel), ("rhs", rhs)):
            np.save(os.path.join(cache, f"{name}.npy"), array)
        with open(os.path.join(cache, "counts.json"), "w") as f:
            json.dump({"user": params["num_users"], "tweet": params["num_tweets"]}, f)
        subprocess.run([PBG_PYTHON, PBG_TRAIN, "--cache", cache, "--out", cache,
                        "--prepare_only"], check=True, capture_output=True)
        for name in ("lhs", "rel", "rhs"):
            os.remove(os.path.join(cache, f"{name}.npy"))
    return cache


def _pbg_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_pbg(cache: str, config: str, sizes: dict, workers: int, work: str) -> dict:
    """Train PBG once; score its tables with the plain baseline's evaluate."""
    import torch
    import yaml

    from benchmarks.baselines.plain_twhin import PlainTwhin, evaluate

    out = tempfile.mkdtemp(dir=work, prefix=f"pbg{workers}-")
    subprocess.run([PBG_PYTHON, PBG_TRAIN, "--cache", cache, "--out", out,
                    "--workers", str(workers), "--batch", str(PBG_BATCH),
                    "--negatives", str(sizes["negatives"]), "--epochs", str(sizes["epochs"]),
                    "--dim", str(sizes["dim"]), "--lr", str(PBG_LR),
                    "--init_scale", str(PBG_INIT_SCALE)],
                   check=True, capture_output=True, env=_pbg_env())
    report = json.load(open(os.path.join(out, "report.json")))
    data = yaml.safe_load(open(config))
    relations = torch.zeros((4, 2), dtype=torch.long)
    relations[:, 1] = 1                       # every relation is user -> tweet
    model = PlainTwhin([sizes["num_users"], sizes["num_tweets"]], sizes["dim"], relations)
    with torch.no_grad():
        model.tables[0].weight.copy_(torch.from_numpy(np.load(os.path.join(out, "user.npy"))))
        model.tables[1].weight.copy_(torch.from_numpy(np.load(os.path.join(out, "tweet.npy"))))
        model.translations.copy_(torch.from_numpy(np.load(os.path.join(out, "translations.npy"))))
    report["auc"] = evaluate(model, data["validation_data"]["data_root"],
                             data["validation_data"]["per_replica_batch_size"],
                             sizes["negatives"])
    return report


def row_access_limit(sizes: dict, graph: str, batches: int = 50) -> dict:
    """Edges/s of gathering and scatter-adding one batch's touched rows, nothing else."""
    import torch

    from benchmarks.baselines.plain_twhin import _read_edges

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lhs, _, rhs = (torch.from_numpy(a) for a in _read_edges(os.path.join(graph, "train")))
        tables = [torch.randn(sizes["num_users"], sizes["dim"]),
                  torch.randn(sizes["num_tweets"], sizes["dim"])]
        batch = sizes["batch"]
        count = min(batches, len(lhs) // batch)
        grads = [torch.randn(batch, sizes["dim"]) for _ in tables]
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            for index in range(count):
                sl = slice(index * batch, (index + 1) * batch)
                for table, ids, grad in zip(tables, (lhs[sl], rhs[sl]), grads):
                    rows = table.index_select(0, ids)
                    table.index_add_(0, ids, grad, alpha=-1e-9)
                    del rows
            samples.append(count * batch / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return {"edges_per_s": statistics.median(samples), "lookups_per_batch": 2 * batch,
            "dim": sizes["dim"], "threads": 1}


def _summary(samples: list[dict]) -> dict:
    rates = [s["edges_per_s"] for s in samples]
    aucs = [s["auc"] for s in samples if s.get("auc") is not None]
    return {"edges_per_s": statistics.median(rates), "edges_per_s_samples": rates,
            "auc": statistics.median(aucs) if aucs else None, "auc_samples": aucs,
            "load_samples": [s["load"] for s in samples],
            "example": {k: v for k, v in samples[-1].items()
                        if k not in ("edges_per_s", "auc", "load")}}


def _table(report: dict) -> str:
    rows_ = report["rows"]
    pbg = rows_[report["pbg_best"]]["edges_per_s"]
    limit = rows_["row_access_limit"]["edges_per_s"]
    lines = ["| trainer | edges/s (median) | vs PBG best | of row-access limit | held-out AUC |",
             "|---|---|---|---|---|"]
    for key, label in report["labels"].items():
        row = rows_[key]
        auc = "" if row.get("auc") is None else f"{row['auc']:.3f}"
        lines.append(f"| {label} | {row['edges_per_s']:,.0f} | {row['edges_per_s'] / pbg:.2f}x"
                     f" | {row['edges_per_s'] / limit:.0%} | {auc} |")
    lines += ["", f"{report['rounds']} interleaved rounds, medians; load average "
              f"{report['load']['start'][0]:.1f} at start, {report['load']['end'][0]:.1f} at end "
              f"({report['date']})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"peers-cpu-{os.cpu_count()}core")
    parser.add_argument("--quick", action="store_true", help="tiny graph (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tml's N (the multi-worker row)")
    parser.add_argument("--results", default=bench.RESULTS)
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to run (e.g. tml_1_worker,pbg_1_worker,"
                        "row_access_limit): a shorter same-run comparison; the PBG row and "
                        "the row-access limit are always kept, as the ratios need them")
    args = parser.parse_args(argv)
    if not os.path.exists(PBG_PYTHON):
        raise SystemExit("error: .venv-pbg is missing: run `make bench-peers` (it creates it)")
    sizes = dict(bench.QUICK if args.quick else bench.FULL)
    sizes["lr"] = bench.EDGE_LR * sizes["batch"] * (1 + 2 * sizes["negatives"])
    graph = os.path.join(REPO, "benchmarks", ".data", "quick" if args.quick else "full")
    from projects.twhin.data.generate import generate_graph
    generate_graph(graph, num_users=sizes["num_users"], num_tweets=sizes["num_tweets"],
                   num_edges=sizes["num_edges"], num_communities=sizes["num_communities"],
                   seed=0, validation_fraction=0.02)
    cache = prepare_pbg_graph(graph)
    labels = {"tml_1_worker": "tml, 1 worker",
              f"tml_{args.workers}_workers": f"tml, {args.workers} workers",
              "pbg_1_worker": "PyTorch-BigGraph 1.0, 1 worker",
              "pbg_2_workers": "PyTorch-BigGraph 1.0, 2 workers",
              "plain_pytorch": "plain PyTorch baseline",
              "row_access_limit": "row-access limit (gather + scatter-add)"}
    samples: dict[str, list[dict]] = {key: [] for key in labels}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tml-peers-") as work:
        config = bench._config(graph, sizes, os.path.join(work, "bench.yaml"))
        config_n = bench._config(graph, sizes, os.path.join(work, "bench-n.yaml"),
                                 workers=args.workers)
        steps = {
            "tml_1_worker": lambda: bench._run_tml(config, 1, work),
            "pbg_1_worker": lambda: run_pbg(cache, config, sizes, 1, work),
            f"tml_{args.workers}_workers": lambda: bench._run_tml(config_n, args.workers, work),
            "pbg_2_workers": lambda: run_pbg(cache, config, sizes, 2, work),
            "plain_pytorch": lambda: bench._run_plain(config, work),
            "row_access_limit": lambda: row_access_limit(sizes, graph),
        }
        if args.only:
            wanted = {name.strip() for name in args.only.split(",") if name.strip()}
            unknown = wanted - set(steps)
            if unknown:
                raise SystemExit(f"error: --only: unknown row(s) {', '.join(sorted(unknown))} "
                                 f"(rows: {', '.join(steps)})")
            wanted |= {"pbg_1_worker", "row_access_limit"}
            steps = {key: step for key, step in steps.items() if key in wanted}
            labels = {key: label for key, label in labels.items() if key in wanted}
            samples = {key: value for key, value in samples.items() if key in wanted}
        for round_ in range(args.rounds):
            for key, step in steps.items():
                load = os.getloadavg()
                result = step()
                result["load"] = load
                samples[key].append(result)
                print(f"round {round_ + 1}: {key} {result['edges_per_s']:,.0f} edges/s "
                      f"auc {result.get('auc')} (load {load[0]:.1f})", flush=True)
    rows_ = {key: _summary(value) for key, value in samples.items()}
    pbg_best = max((key for key in ("pbg_1_worker", "pbg_2_workers") if key in rows_),
                   key=lambda k: rows_[k]["edges_per_s"])
    pbg = rows_[pbg_best]["edges_per_s"]
    limit = rows_["row_access_limit"]["edges_per_s"]
    for row in rows_.values():
        row["vs_pbg_best"] = row["edges_per_s"] / pbg
        row["of_row_access_limit"] = row["edges_per_s"] / limit
    report = {"name": args.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m benchmarks.peers " + " ".join(argv or sys.argv[1:]),
              "sizes": sizes, "rounds": args.rounds, "pbg_best": pbg_best,
              "pbg_settings": {"batch": PBG_BATCH, "lr": PBG_LR, "init_scale": PBG_INIT_SCALE,
                               "hogwild_delay": 0, "num_batch_negs": sizes["negatives"],
                               "num_uniform_negs": 0, "optimizer": "PBG's row Adagrad"},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "load": {"start": load_start, "end": os.getloadavg()},
              "labels": labels, "rows": rows_}
    report["table"] = _table(report)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.results, f"{args.name}.md"), "w") as f:
        f.write(report["table"] + "\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
