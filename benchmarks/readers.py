"""Reader rows of `make bench` (issue 17): the reader service against in-process reading.

* batches/s a trainer receives from 1 and 2 reader processes (`tml.readers`), against the
  same dataset read in-process (what a trainer does without readers);
* a short training run (1 worker) fed by 2 readers against the same run reading
  in-process: the same steps and the same final loss are required, the rates are reported.

Readers run as the TwHIN reader role (`projects/twhin/run.py` with `TML_ROLE=reader`),
started the way the launcher starts them beside the trainers.

    python -m benchmarks.readers [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "projects", "twhin", "run.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO
    return env


@contextlib.contextmanager
def reader_processes(config: str, count: int, world_size: int,
                     work: str) -> Iterator[list[str]]:
    """`count` TwHIN reader processes of `config` on 127.0.0.1; their addresses."""
    from tml.readers.roles import local_readers

    command = [sys.executable, RUN, f"--config_yaml_path={config}",
               f"--save_dir={os.path.join(work, 'unused')}"]
    with local_readers(command, count, world_size, _env(), tempfile.mkdtemp(dir=work),
                       start_timeout_s=300) as addresses:
        yield addresses


def _rate(batches: Iterator, batch_size: int, seconds: float) -> dict:
    next(batches)   # connected and started (not part of the rate)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    for _ in batches:
        count += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    # The trainer process's own CPU per batch (all its threads): what the readers take off
    # the trainer's cores, measurable even when the host's cores are all busy.
    return {"batches": count, "seconds": elapsed, "batches_per_s": count / elapsed,
            "edges_per_s": count * batch_size / elapsed,
            "trainer_cpu_ms_per_batch": 1e3 * (time.process_time() - cpu) / max(count, 1)}


def _train(config: str, work: str, name: str, addresses: list[str] | None) -> dict:
    out = tempfile.mkdtemp(dir=work, prefix=name)
    env = _env()
    if addresses:
        env["TML_READERS"] = ",".join(addresses)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "twhin_tml.py"),
                             f"--config={config}", f"--save_dir={out}/save",
                             f"--out_dir={out}", "--nproc=1"], env=env, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(f"{name} training failed: {result.stderr[-2000:]}")
    rank = json.load(open(os.path.join(out, "rank0.json")))
    final = [line for line in result.stderr.splitlines() if "done: step" in line]
    return {"steps": rank["steps"], "train_seconds": rank["train_seconds"],
            "steps_per_s": rank["steps"] / rank["train_seconds"],
            "total_seconds": time.perf_counter() - start, "auc": rank["auc"],
            "final": final[-1].split("done: ", 1)[1].split("; checkpoint")[0] if final else None}


def measure(config: str, train_config: str, work: str, seconds: float = 4.0) -> dict:
    """batches/s to one trainer in-process and from 1 and 2 reader processes; then the
    short run of `train_config` in-process and fed by the same 2 readers (the training
    section does not change what the readers serve)."""
    from projects.twhin.config import TwhinConfig
    from projects.twhin.data.data import create_dataset
    from projects.twhin.data.edges import EdgeBatch
    from tml.core.config import load_config_from_yaml
    from tml.readers.client import ReaderDataset

    cfg = load_config_from_yaml(TwhinConfig, config)
    batch = cfg.train_data.per_replica_batch_size
    serving = {"in_process": _rate(iter(create_dataset(cfg.train_data, cfg.model,
                                                       num_epochs=100)), batch, seconds)}
    training = {"in_process": _train(train_config, work, "in_process", None)}
    for count in (1, 2):
        with reader_processes(config, count, 1, work) as addresses:
            dataset = ReaderDataset(addresses, 0, 1, EdgeBatch)
            serving[f"{count}_readers"] = _rate(iter(dataset), batch, seconds)
            dataset.close()
            if count == 2:
                training["2_readers"] = _train(train_config, work, "readers", addresses)
    training["same_result"] = training["in_process"]["final"] == training["2_readers"]["final"]
    return {"serving": serving, "training": training}


def table(report: dict) -> str:
    serving, training = report["serving"], report["training"]
    base = serving["in_process"]["batches_per_s"]
    lines = ["| data to one trainer | batches/s | vs in-process | trainer CPU ms per batch |",
             "|---|---|---|---|"]
    for name, key in (("in-process reading", "in_process"), ("1 reader process", "1_readers"),
                      ("2 reader processes", "2_readers")):
        rate = serving[key]["batches_per_s"]
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | "
                     f"{serving[key]['trainer_cpu_ms_per_batch']:.2f} |")
    plain, fed = training["in_process"], training["2_readers"]
    lines += ["", "| training run, 1 worker | steps | steps/s | result |", "|---|---|---|---|",
              f"| reading in-process | {plain['steps']} | {plain['steps_per_s']:.1f} | "
              f"{plain['final']} |",
              f"| fed by 2 readers | {fed['steps']} | {fed['steps_per_s']:.1f} | "
              f"{fed['final']} |",
              "", f"Same steps and result: {training['same_result']}."]
    return "\n".join(lines)


def run(config: str, work: str, train_steps: int = 60, seconds: float = 4.0) -> dict:
    """The reader rows for `config` (the training rows stop at `train_steps`; each serving
    rate is measured over `seconds`)."""
    data = yaml.safe_load(open(config))
    data["training"]["num_train_steps"] = train_steps
    data["training"]["train_log_every_n"] = train_steps
    short = os.path.join(work, "readers-train.yaml")
    with open(short, "w") as f:
        yaml.safe_dump(data, f)
    report = measure(config, short, work, seconds)
    report["table"] = table(report)
    return report


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import FULL, QUICK, _config
    from projects.twhin.data.generate import generate_graph

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["lr"] = 0.6 * sizes["batch"] * (1 + 2 * sizes["negatives"])
    graph = os.path.join(REPO, "benchmarks", ".data", "quick" if args.quick else "full")
    generate_graph(graph, num_users=sizes["num_users"], num_tweets=sizes["num_tweets"],
                   num_edges=sizes["num_edges"], num_communities=sizes["num_communities"],
                   seed=0, validation_fraction=0.02)
    with tempfile.TemporaryDirectory(prefix="tml-bench-readers-") as work:
        report = run(_config(graph, sizes, os.path.join(work, "bench.yaml")), work)
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
