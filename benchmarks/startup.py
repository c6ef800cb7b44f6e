"""Where the seconds of a one-step TwHIN run go, from command to exit (issue 13).

Three measurements on `make bench`'s graph and config with `num_train_steps: 1`:
* command to exit of `python projects/twhin/run.py --nproc_per_node=1` (the user's view);
* interpreter start and imports, each in a fresh interpreter: bare python, torch, torchrec
  (with fbgemm), and tml's TwHIN modules on top;
* `projects.twhin.run.run` in this process under cProfile: the cumulative time of each
  phase (device and process group, datasets, model, sharding plan, optimizers, the training
  loop with its first step, evaluation, checkpoint save).

    python -m benchmarks.startup [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

from benchmarks import run as bench

# (label, module file fragment, function name) of the phases reported from cProfile.
PHASES = (
    ("device + process group", "tml/common/device.py", "setup_and_get_device"),
    ("datasets", "projects/twhin/data/data.py", "create_dataset"),
    ("model (meta tables)", "projects/twhin/models/models.py", "__init__"),
    ("sharding plan + DMP", "tml/common/sharding.py", "shard_model"),
    ("optimizers", "projects/twhin/optimizer.py", "build_optimizer"),
    ("training loop (all)", "tml/core/custom_training_loop.py", "train"),
    ("  pipeline steps (fx trace + step)", "train_pipeline/train_pipelines.py", "progress"),
    ("  evaluation", "projects/twhin/metrics.py", "evaluate"),
    ("  checkpoint save", "tml/common/checkpointing.py", "save"),
)
IMPORTS = (("python", "pass"), ("torch", "import torch"),
           ("torchrec + fbgemm", "import torchrec, fbgemm_gpu"),
           ("tml TwHIN modules", "import projects.twhin.run, tml.core.custom_training_loop, "
            "projects.twhin.models.models, projects.twhin.data.data, tml.common.sharding"))


def _seconds(command: list[str], **kwargs: object) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes, graph = bench.bench_graph(args.quick)
    report: dict = {"load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="tml-startup-") as work:
        config = bench._config(graph, sizes, os.path.join(work, "one.yaml"), steps=1)
        report["command_to_exit_s"] = _seconds(
            [sys.executable, os.path.join(bench.REPO, "projects", "twhin", "run.py"),
             f"--config_yaml_path={config}", f"--save_dir={work}/cmd", "--nproc_per_node=1"],
            env=bench._env())
        report["imports_s"] = {label: _seconds([sys.executable, "-c", code], env=bench._env(),
                                               cwd=bench.REPO) for label, code in IMPORTS}

        from projects.twhin.config import TwhinConfig
        from projects.twhin.run import run
        from tml.core.config import load_config_from_yaml

        bench.one_process_rank(29600)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        run(load_config_from_yaml(TwhinConfig, config), save_dir=f"{work}/inproc")
        profiler.disable()
        report["run_in_process_s"] = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    phases = {}
    for label, fragment, name in PHASES:
        total = 0.0
        for (file, _, function), (_, _, _, cumulative, _) in stats.items():
            if function == name and file.endswith(fragment):
                total = max(total, cumulative)
        phases[label] = total
    report["phases_s"] = phases
    report["load_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
