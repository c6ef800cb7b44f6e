"""Where a TwHIN training step spends its time: torch.profiler per-op self time (issue 13).

Runs `projects.twhin.run.run` in this process as one worker on `make bench`'s graph and
config (FULL: 400k users, 70k tweets, 2M edges, dim 64, 4000 edges a step, 10 in-batch
negatives, SGD), no validation, and profiles `--active` steps after `--skip` warm-up steps
(the profiler is stepped after every `pipeline.progress`, so table initialisation and the
first steps stay out). Prints the per-op table (self CPU time, per step) and writes it as
JSON with `--out`.

    python -m benchmarks.profile_step [--quick] [--active 50] [--threads 1] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks import run as bench
from benchmarks.twhin_tml import wrapped_progress


def profile(quick: bool = False, skip: int = 10, active: int = 50,
            threads: int = 1, shapes: bool = False) -> dict:
    """Per-op self CPU time of `active` steps: {op: {"ms_per_step", "calls_per_step"}}."""
    from torch.profiler import ProfilerActivity, schedule

    from projects.twhin.config import TwhinConfig
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    sizes, graph = bench.bench_graph(quick)
    bench.one_process_rank()
    torch.set_num_threads(threads)
    captured: list = []
    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=skip, active=active, repeat=1), record_shapes=shapes,
        on_trace_ready=lambda p: captured.append(p.key_averages(group_by_input_shape=shapes)))
    step_times: list[float] = []

    def stepped(progress):  # noqa: ANN001, ANN202
        def step(dataloader_iter):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            out = progress(dataloader_iter)
            step_times.append(time.perf_counter() - start)
            prof.step()
            return out
        return step

    with tempfile.TemporaryDirectory(prefix="tml-profile-") as work:
        path = bench._config(graph, sizes, os.path.join(work, "bench.yaml"),
                             steps=skip + active + 1)
        config = load_config_from_yaml(TwhinConfig, path)
        config.validation_data = None
        with wrapped_progress(stepped), prof:
            run(config, save_dir=os.path.join(work, "save"))
    ops = {}
    for event in captured[0]:
        key = f"{event.key} {event.input_shapes}" if shapes else event.key
        ops[key] = {"ms_per_step": event.self_cpu_time_total / 1000 / active,
                          "calls_per_step": event.count / active}
    ops = dict(sorted(ops.items(), key=lambda item: -item[1]["ms_per_step"]))
    total = sum(op["ms_per_step"] for op in ops.values())
    measured = sorted(step_times[skip:skip + active])
    return {"sizes": sizes, "threads": threads, "active_steps": active,
            "profiled_ms_per_step": total,
            "progress_median_ms_under_profiler": 1000 * measured[len(measured) // 2],
            "load": os.getloadavg(), "ops": ops}


def table(report: dict, top: int = 25) -> str:
    lines = [f"profiled step: {report['profiled_ms_per_step']:.2f} ms self CPU "
             f"({report['active_steps']} steps, {report['threads']} thread(s), load "
             f"{report['load'][0]:.1f})", "| op | self ms per step | calls per step |",
             "|---|---|---|"]
    for name, op in list(report["ops"].items())[:top]:
        lines.append(f"| {name} | {op['ms_per_step']:.3f} | {op['calls_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--active", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", action="store_true",
                        help="one row per op and input shapes (which `cat` is the costly one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = profile(args.quick, args.skip, args.active, args.threads, args.shapes)
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
