"""Where a training step's wall time goes besides its ops: the loop's parts, timed (issue 13).

`benchmarks.profile_step` counts the self CPU time of the ops of a step; on an idle box
that was ~2/3 of the wall time per step that `benchmarks.peers` measured. This program
runs `projects.twhin.run.run` in this process as one worker on `make bench`'s graph and
config (FULL unless `--quick`; 1 intra-op thread, no validation, no profiler) and times, for
every step after `--skip` warm-up steps:

* the loop iteration (from one `pipeline.progress` call's start to the next one's), and the
  part of it outside `progress` (the loop's own per-step Python);
* `progress`: wall, the main thread's CPU time, the whole process's CPU time;
* inside `progress`, the wait for the next batch (`next()` on the data iterator);
* the reader thread's CPU time (the `tml-prefetch` thread), and the rest of the process's
  CPU outside the main and reader threads (gloo's and OpenMP's native threads).

The wall time of `progress` that is neither main-thread CPU nor the batch wait is time the
main thread was off-CPU for another reason: waiting for the GIL held by the reader
thread, for a gloo worker thread (TorchRec's one-rank all-to-alls), or preempted.

`--batches` sets where the batches come from, to take the reader apart from the step:
`prefetch` (the loop's default: a reader thread two batches ahead), `inline` (read in the
main thread, `prefetch_batches=0`), `memory` (all batches read before training, then fed
from a list: no reader during the steps at all).

`--batch N` trains on batches of N edges instead of the benchmark's 4000 (the same lr per
edge, as `make bench --batch` sets it): steps
of several sizes give a step's fixed cost (the intercept) and its cost per edge (the slope).

    python -m benchmarks.step_wall [--quick] [--steps 200] [--batches prefetch] [--batch N]
                                   [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import threading
import time

from benchmarks import run as bench
from benchmarks.twhin_tml import wrapped_progress

BATCH_SOURCES = ("prefetch", "inline", "memory")


def _thread_cpu(thread: threading.Thread | None) -> float:
    """CPU seconds of a Python thread so far (0 if it is gone or None)."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, ProcessLookupError):
        return 0.0


def measure(quick: bool = False, steps: int = 200, skip: int = 10,
            batches: str = "prefetch", threads: int = 1, window: int = 100,
            batch: int | None = None) -> dict:
    """Per-step wall and CPU times of the loop's parts (ms, mean and median over steps)."""
    import torch

    import tml.core.custom_training_loop as ctl
    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    if batches not in BATCH_SOURCES:
        raise ValueError(f"batches must be one of {', '.join(BATCH_SOURCES)}, got {batches!r}")
    sizes, graph = bench.bench_graph(quick)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        sizes = {**sizes, "batch": batch}
        sizes["lr"] = bench.step_lr(sizes)          # the same lr per edge
    bench.one_process_rank()
    torch.set_num_threads(threads)

    rows: list[dict] = []            # one per progress call
    waits: list[float] = []          # next() on the data iterator, in order
    reader: dict = {"thread": None, "batch_rows": None}
    original_prefetch = ctl.prefetch

    def source(iterable, depth: int = 2):  # noqa: ANN001, ANN202
        if batches == "memory":
            items = list(itertools.islice(iterable, skip + steps + 3))
            inner = iter(items)
        else:
            inner = original_prefetch(iterable, depth=0 if batches == "inline" else depth)
        try:
            while True:
                start = time.perf_counter()
                try:
                    item = next(inner)
                except StopIteration:
                    return
                waits.append(time.perf_counter() - start)
                if reader["batch_rows"] is None:   # what the step really gets
                    reader["batch_rows"] = int(item.labels.shape[0])
                if reader["thread"] is None:   # started by the first next()
                    reader["thread"] = next((t for t in threading.enumerate()
                                             if t.name == "tml-prefetch"), None)
                yield item
        finally:
            if hasattr(inner, "close"):
                inner.close()

    def timed(progress):  # noqa: ANN001, ANN202
        def step(dataloader_iter):  # noqa: ANN001, ANN202
            waits_before = len(waits)
            wall, thread = time.perf_counter(), time.thread_time()
            process, reader_cpu = time.process_time(), _thread_cpu(reader["thread"])
            out = progress(dataloader_iter)
            rows.append({
                "start": wall, "wall": time.perf_counter() - wall,
                "thread_cpu": time.thread_time() - thread,
                "process_cpu": time.process_time() - process,
                "reader_cpu": _thread_cpu(reader["thread"]) - reader_cpu,
                "batch_wait": sum(waits[waits_before:])})
            return out
        return step

    with tempfile.TemporaryDirectory(prefix="tml-step-wall-") as work:
        path = bench._config(graph, sizes, os.path.join(work, "bench.yaml"),
                             steps=skip + steps)
        config = load_config_from_yaml(TwhinConfig, path)
        config.validation_data = None
        ctl.prefetch = source
        try:
            with wrapped_progress(timed):
                result = run(config, save_dir=os.path.join(work, "save"))
        finally:
            ctl.prefetch = original_prefetch
    for row, after in zip(rows, rows[1:]):
        row["iteration"] = after["start"] - row["start"]
        row["outside_progress"] = row["iteration"] - row["wall"]
    steady = rows[skip:-1]            # the last row has no next iteration
    for row in steady:
        row["other_threads_cpu"] = row["process_cpu"] - row["thread_cpu"] - row["reader_cpu"]
        row["progress_off_cpu"] = row["wall"] - row["thread_cpu"] - row["batch_wait"]
    keys = ("iteration", "outside_progress", "wall", "thread_cpu", "batch_wait",
            "progress_off_cpu", "process_cpu", "reader_cpu", "other_threads_cpu")
    per_step = {key: {"mean_ms": 1000 * statistics.fmean(r[key] for r in steady),
                      "median_ms": 1000 * statistics.median(r[key] for r in steady)}
                for key in keys}
    # The same by window of `window` steps (does a step get slower as training goes on?).
    windows = [{key: 1000 * statistics.fmean(r[key] for r in steady[i:i + window])
                for key in ("iteration", "thread_cpu", "progress_off_cpu")}
               for i in range(0, len(steady) - window + 1, window)]
    return {"sizes": sizes, "batch_rows": reader["batch_rows"], "batches": batches,
            "threads": threads, "steps": len(steady),
            "window": window, "windows_mean_ms": windows,
            "first_progress_ms": 1000 * rows[0]["wall"],
            "train_seconds": result.train_seconds,
            "edges_per_s_loop": len(rows) * sizes["batch"] / result.train_seconds,
            "edges_per_s_steady": sizes["batch"] / (per_step["iteration"]["mean_ms"] / 1000),
            "load": os.getloadavg(), "per_step": per_step}


def table(report: dict) -> str:
    lines = [f"batches of {report['batch_rows']} edges from: {report['batches']}; "
             f"{report['steps']} steps, "
             f"{report['threads']} thread(s), load {report['load'][0]:.1f}; first progress "
             f"{report['first_progress_ms']:.0f} ms; edges/s steady "
             f"{report['edges_per_s_steady']:,.0f}, whole loop {report['edges_per_s_loop']:,.0f}",
             "| per step | mean ms | median ms |", "|---|---|---|"]
    for key, value in report["per_step"].items():
        lines.append(f"| {key} | {value['mean_ms']:.2f} | {value['median_ms']:.2f} |")
    lines.append(f"by {report['window']} steps, mean ms (iteration / thread CPU / off-CPU): " +
                 ", ".join(f"{w['iteration']:.1f}/{w['thread_cpu']:.1f}/"
                           f"{w['progress_off_cpu']:.1f}" for w in report["windows_mean_ms"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--batches", choices=BATCH_SOURCES, default="prefetch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None,
                        help="edges per step (default: the benchmark's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = measure(args.quick, args.steps, args.skip, args.batches, args.threads,
                     batch=args.batch)
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
