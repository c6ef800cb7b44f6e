"""Does tml train faster with more cores? One worker on 1 core against 1 and 2 workers on 2.

Issue 13 asks that going from 1 to 2 cores speed training up, and how the default uses the
cores it has. Each setting is `make bench`'s tml run (`benchmarks/twhin_tml.py`: end to end,
data reading included) pinned with `taskset` to its cores, the settings interleaved round
by round so that a noisy machine slows all of them alike; the report gives medians and the
ratio of each to one worker on one core, with the load average at the start and end.

    python -m benchmarks.cores [--rounds 3] [--steps 300] [--quick] [--out FILE.json]

Needs `taskset` (util-linux) and at least 2 cores. The default thread count of a worker
(`OMP_NUM_THREADS`) follows the cores this process may use (`tml.common.run_training`), so
a pinned run gets what the default would give it on a machine of that many cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

import yaml

from benchmarks import run as bench

# (label, cores pinned, workers, reader processes). With a reader process the batches are
# built outside the worker (`tml.readers`), so its main thread shares the GIL with no
# batch-building thread: the way for one worker to use a second core.
SETTINGS = (("1 worker, 1 core", "0", 1, 0), ("1 worker, 2 cores", "0,1", 1, 0),
            ("1 worker + 1 reader process, 2 cores", "0,1", 1, 1),
            ("2 workers, 2 cores", "0,1", 2, 0))


def measure(rounds: int, steps: int, quick: bool) -> dict:
    """Interleaved rounds of every setting; medians and ratios to one worker on one core."""
    if shutil.which("taskset") is None:
        raise SystemExit("benchmarks.cores needs taskset (util-linux)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("benchmarks.cores needs at least 2 cores")
    sizes, graph = bench.bench_graph(quick)
    report: dict = {"sizes": sizes, "steps": steps, "rounds": rounds,
                    "load_start": os.getloadavg(),
                    "runs": {label: [] for label, *_ in SETTINGS}}
    with tempfile.TemporaryDirectory(prefix="tml-cores-") as work:
        configs = {(n, r): _config(graph, sizes, work, steps, n, r)
                   for _, _, n, r in SETTINGS}
        for _ in range(rounds):
            for label, cpus, workers, readers in SETTINGS:
                row = bench._run_tml(configs[workers, readers], workers, work,
                                     prefix=("taskset", "-c", cpus))
                row["load"] = os.getloadavg()[0]
                report["runs"][label].append(row)
    report["load_end"] = os.getloadavg()
    base = statistics.median(r["edges_per_s"] for r in report["runs"][SETTINGS[0][0]])
    report["median_edges_per_s"] = {
        label: statistics.median(r["edges_per_s"] for r in runs)
        for label, runs in report["runs"].items()}
    report["ratio_to_1_core"] = {label: rate / base
                                 for label, rate in report["median_edges_per_s"].items()}
    return report


def _config(graph: str, sizes: dict, work: str, steps: int, workers: int,
            readers: int) -> str:
    """`make bench`'s config for `workers`, its batches from `readers` processes if any."""
    path = bench._config(graph, sizes, os.path.join(work, f"w{workers}r{readers}.yaml"),
                         steps=steps, workers=workers)
    if readers:
        data = yaml.safe_load(open(path))
        data["readers"] = {"num_readers": readers}
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
    return path


def table(report: dict) -> str:
    lines = ["| setting | edges/s (median) | vs 1 worker on 1 core | threads per worker | "
             "held-out AUC |", "|---|---|---|---|---|"]
    for label, runs in report["runs"].items():
        lines.append(f"| {label} | {report['median_edges_per_s'][label]:,.0f} | "
                     f"{report['ratio_to_1_core'][label]:.2f}x | "
                     f"{runs[0]['threads_per_worker']} | {runs[-1]['auc']:.3f} |")
    lines.append(f"\n{report['rounds']} interleaved rounds of {report['steps']} steps; load "
                 f"average {report['load_start'][0]:.1f} at the start, "
                 f"{report['load_end'][0]:.1f} at the end.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny graph (smoke test)")
    parser.add_argument("--out", default=None, help="write the report as JSON here "
                        "(and the table beside it as .md)")
    args = parser.parse_args(argv)
    report = measure(args.rounds, args.steps, args.quick)
    report["table"] = table(report)
    print(report["table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(report["table"] + "\n")
    return report


if __name__ == "__main__":
    main()
