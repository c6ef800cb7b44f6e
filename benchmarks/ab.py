"""A against B: tml's training rate at a git revision against the working tree, interleaved.

Why: on a shared, noisy host a change's effect is only visible as a ratio within one run.
This exports `--base` (a git revision) into a temporary directory, then runs
`benchmarks/twhin_tml.py` from the base and from this working tree in turns (base, new, base,
new, ...) on `make bench`'s graph and config, and reports each side's median edges/s, the
median of the per-round ratios new / base, and the load average of every sample. Both sides
run this tree's harness (`benchmarks/twhin_tml.py`) on their own code, which also reports
the CPU time of a training step: on a shared host (load average above the core count) the
wall-clock ratio measures the other jobs as much as the change, and the ratio of CPU time
per step (base / new, main thread and whole process) is the steadier figure.

    python -m benchmarks.ab --base HEAD~1 [--rounds 3] [--steps 300] [--workers 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

from benchmarks import run as bench


def _rate(tree: str, config: str, workers: int, work: str) -> dict:
    out = tempfile.mkdtemp(dir=work)
    env = {**bench._env(), "PYTHONPATH": tree}
    subprocess.run([sys.executable, os.path.join(bench.REPO, "benchmarks", "twhin_tml.py"),
                    f"--config={config}", f"--save_dir={out}/save", f"--out_dir={out}",
                    f"--nproc={workers}"], env=env, check=True, capture_output=True, cwd=tree)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(workers)]
    batch = yaml.safe_load(open(config))["train_data"]["per_replica_batch_size"]
    seconds = max(r["train_seconds"] for r in ranks)
    return {"edges_per_s": ranks[0]["steps"] * batch * workers / seconds,
            "auc": ranks[0]["auc"], "total_seconds": max(r["total_seconds"] for r in ranks),
            **{key: max(r[key] for r in ranks) for key in _CPU_KEYS}}


_CPU_KEYS = ("step_thread_cpu_ms", "step_process_cpu_ms", "step_thread_cpu_ms_median",
             "step_process_cpu_ms_median")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    sizes, graph = bench.bench_graph(args.quick)
    samples: dict[str, list[dict]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="tml-ab-") as work:
        base = os.path.join(work, "base")
        os.makedirs(base)
        archive = subprocess.run(["git", "archive", args.base], cwd=bench.REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        # Bytecode for both trees first. Where PYTHONDONTWRITEBYTECODE is set (as on this
        # box), a fresh tree is compiled from source at every import, and the modules
        # imported lazily inside the timed steps cost the base ~9% of a 400-step run in an
        # A/A comparison (the same code on both sides) while the working tree ran from
        # bytecode left by earlier commands.
        for tree in (base, bench.REPO):
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"[/\\]\.",
                            *(os.path.join(tree, d) for d in ("tml", "projects", "benchmarks"))],
                           check=True, capture_output=True)
        config = bench._config(graph, sizes, os.path.join(work, "ab.yaml"), steps=args.steps,
                               workers=args.workers)
        for round_ in range(args.rounds):
            # Which side runs first alternates: on this box the first of two back-to-back
            # runs was the slower one by ~9% in an A/A run (the same tree on both sides).
            order = (("base", base), ("new", bench.REPO))
            for side, tree in order if round_ % 2 == 0 else order[::-1]:
                load = os.getloadavg()
                sample = {**_rate(tree, config, args.workers, work), "load": load}
                samples[side].append(sample)
                print(f"round {round_ + 1} {side}: {sample['edges_per_s']:,.0f} edges/s, "
                      f"step CPU {sample['step_thread_cpu_ms']:.2f} ms thread, "
                      f"{sample['step_process_cpu_ms']:.2f} ms process "
                      f"(load {load[0]:.1f}, AUC {sample['auc']:.4f})", flush=True)
    ratios = [n["edges_per_s"] / b["edges_per_s"] for b, n in zip(samples["base"],
                                                                  samples["new"])]
    report = {"base": args.base, "workers": args.workers, "steps": args.steps,
              "rounds": args.rounds,
              "base_edges_per_s": statistics.median(s["edges_per_s"] for s in samples["base"]),
              "new_edges_per_s": statistics.median(s["edges_per_s"] for s in samples["new"]),
              "ratio_new_over_base": statistics.median(ratios), "ratios": ratios,
              "samples": samples}
    for key in _CPU_KEYS:
        speedups = [b[key] / n[key] for b, n in zip(samples["base"], samples["new"])]
        report[f"{key}_base_over_new"] = statistics.median(speedups)
        report[f"{key}_base_over_new_rounds"] = speedups
    report["auc"] = {side: [s["auc"] for s in samples[side]] for side in samples}
    print(f"new / base: {report['ratio_new_over_base']:.3f} (median of {ratios})")
    print(f"CPU per step base / new: thread {report['step_thread_cpu_ms_base_over_new']:.3f}, "
          f"process {report['step_process_cpu_ms_base_over_new']:.3f} (medians over rounds)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
