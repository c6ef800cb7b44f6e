"""One worker: TorchRec's one-rank all-to-alls against the local dists, step by step in one process.

Why: the two differ by well under a millisecond a step, and on a shared host the load
changes more than that between two runs. Here one process builds the TwHIN model twice on
`make bench`'s graph and config (FULL unless `--quick`; 1 intra-op thread), once as
TorchRec shards it (`shard_model(local_dists=False)`) and once with the local dists (the
one-worker default), and runs their train pipelines on the same batches in alternation,
A B A B ..., so that both see the same load. Reports each side's median main-thread CPU time
and wall time of a step (`pipeline.progress`) and the ratio A / B per pair of steps.

    python -m benchmarks.local_dists [--quick] [--steps 300] [--out f.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

from benchmarks import run as bench


def measure(quick: bool = False, steps: int = 300, skip: int = 10) -> dict:
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from projects.twhin.config import TwhinConfig
    from projects.twhin.data.data import create_dataset
    from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
    from projects.twhin.optimizer import build_optimizer
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import shard_model
    from tml.core.config import load_config_from_yaml

    sizes, graph = bench.bench_graph(quick)
    bench.one_process_rank()
    torch.set_num_threads(1)
    device = setup_and_get_device()
    with tempfile.TemporaryDirectory(prefix="tml-local-dists-") as work:
        config = load_config_from_yaml(
            TwhinConfig, bench._config(graph, sizes, os.path.join(work, "bench.yaml")))
    batches = list(itertools.islice(
        iter(create_dataset(config.train_data, config.model, num_epochs=2)), steps + 3))
    sides = {}
    for name, local in (("torchrec", False), ("local", True)):
        torch.manual_seed(0)
        model = TwhinModelAndLoss(apply_optimizers(
            TwhinModel(config.model, config.train_data), config.model))
        dmp = shard_model(model, device, local_dists=local)
        optimizer, _ = build_optimizer(dmp, config.model)
        sides[name] = {"pipeline": TrainPipelineSparseDist(dmp, optimizer, device),
                       "batches": iter(batches), "thread": [], "wall": [], "loss": []}
    for step in range(steps):
        for side in sides.values():
            torch.default_generator.manual_seed(step)
            wall, thread = time.perf_counter(), time.thread_time()
            out = side["pipeline"].progress(side["batches"])
            side["thread"].append(time.thread_time() - thread)
            side["wall"].append(time.perf_counter() - wall)
            side["loss"].append(float(out["loss"]))
    report: dict = {"sizes": sizes, "steps": steps - skip, "load": os.getloadavg()}
    for name, side in sides.items():
        for key in ("thread", "wall"):
            report[f"{name}_{key}_ms_median"] = 1000 * statistics.median(side[key][skip:])
    for key in ("thread", "wall"):
        report[f"{key}_torchrec_over_local"] = statistics.median(
            a / b for a, b in zip(sides["torchrec"][key][skip:], sides["local"][key][skip:]))
    report["losses_equal"] = sides["torchrec"]["loss"] == sides["local"]["loss"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = measure(args.quick, args.steps)
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
