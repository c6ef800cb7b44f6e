"""Heavy Ranker throughput: examples/s on 1 and 2 CPU workers, small and local_prod-sized.

Each row is one `projects/home/recap/main.py` run on generated data (`--rows` examples of
the full segdense schema), evaluation and checkpoints pushed past the end (`--set`), so
the figure is the training loop's own (the last logged interval, data reading included).
Peak memory is the largest process's maximum RSS (GNU time, which counts the workers).

    python -m benchmarks.recap [--steps 30] [--out benchmarks/results/recap.md]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "projects", "home", "recap", "config", "local_prod.yaml")
SMALL = [  # a 2-block parallel MaskNet of 64 and an MLP of 64 instead of 4 x 1024 and 2048
    "model.backbone.mask_net_config.mask_blocks=[{aggregation_size: 64, input_layer_norm: "
    "false, output_size: 64}, {aggregation_size: 64, input_layer_norm: false, output_size: 64}]",
    "model.backbone.mask_net_config.mlp.layer_sizes=[64]",
]


def run(data: str, workers: int, steps: int, extra: list[str]) -> tuple[float, float]:
    """(examples/s of the last logged interval, peak RSS in MiB) of one run."""
    with tempfile.TemporaryDirectory() as save_dir:
        sets = [f"training.num_train_steps={steps}", f"training.train_log_every_n={steps // 2}",
                "training.eval_log_every_n=1000000", "training.checkpoint_every_n=1000000",
                "validation_data={}", *extra]
        command = ["/usr/bin/time", "-v", sys.executable, os.path.join(REPO, "projects", "home",
                   "recap", "main.py"), f"--config_yaml_path={CONFIG}", f"--save_dir={save_dir}",
                   f"--nproc_per_node={workers}", *[f"--set={s}" for s in sets]]
        env = {**os.environ, "PYTHONPATH": REPO, "RECAP_DATA": data, "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    rate = float(re.findall(r"([0-9.]+) examples/s", done.stderr)[-1])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return rate, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--out", default=None, help="Also write the table (markdown) here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([sys.executable, "-m", "projects.home.recap.data.generate", "--out", data,
                        "--rows", str(args.rows)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
        rows = ["| model | workers | examples/s | peak RSS per process |", "|---|---|---|---|"]
        for name, extra in (("small (2x64 MaskNet)", SMALL), ("local_prod (4x1024, 2048)", [])):
            for workers in (1, 2):
                rate, peak = run(data, workers, args.steps, extra)
                rows.append(f"| {name} | {workers} | {rate:.0f} | {peak:.0f} MiB |")
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
