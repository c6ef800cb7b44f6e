"""The GPU half of the speed benchmark (issue 13): one report from one run on one GPU.

    python -m benchmarks.gpu [--quick] [--device cuda|cpu] [--out f.json]

(`bash benchmarks/gpu.sh` runs it on a GPU host, installing the wheels the host lacks.)

Sections, each recorded even when another fails (its error is kept in the report):

* `copy`: the bandwidth a large device-to-device copy reaches (read + write bytes / s),
  the practical ceiling of any memory-bound kernel on this device, beside the GPU's
  nominal HBM bandwidth when the device is one we know.
* `tbe`: fbgemm's fused-SGD table-batched embedding (TBE) kernel alone, the kernel TorchRec's
  `fused` compute kernel runs: one large table, a batch of uniformly random ids, pooling
  1 (TwHIN's lookups), forward + backward with the update fused in. Bytes a step, by the
  model in `tbe_step_bytes`: the looked-up rows read, the pooled output written, its
  gradient read, and each distinct updated row read and written. Achieved bytes/s against
  `copy` and against the nominal HBM bandwidth (the issue's goal: at least 50%).
* `uvm_caching`: the same kernel with the table in host memory and a fraction of its rows
  cached in GPU memory (`EmbeddingLocation.MANAGED_CACHING`, what TorchRec builds for
  `compute_kernel: fused_uvm_caching`), sized larger than the GPU's memory when the host's
  memory allows it (the report says whether it was). CUDA only.
* `train`: tml TwHIN end to end (`benchmarks/twhin_tml.py`, 1 worker) on `make bench`'s
  FULL graph, per batch size with the fused kernel in GPU memory, and once with the user
  table on `fused_uvm_caching` (the planner path): positive edges/s and held-out AUC. Batch
  size changes quality (on CPU, batch 16000 at the same lr per edge lost 0.16 AUC), so the
  AUC stands beside each rate.

On a CPU host (`--device cpu`: the tests, a dry run) `copy` and `tbe` use fbgemm's CPU
kernels and a memcpy; `uvm_caching` is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import yaml

from benchmarks import run as bench

# Nominal HBM bandwidth (bytes/s) by a fragment of `torch.cuda.get_device_name()`; the
# vendors' data sheets (SXM parts). Unknown devices report only the measured copy.
NOMINAL_HBM = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
FLOAT_BYTES = 4


def tbe_step_bytes(lookups: int, distinct: int, dim: int, width: int = FLOAT_BYTES) -> int:
    """Bytes one fused-SGD TBE step moves at pooling 1: `lookups` rows read and as many
    pooled rows written (forward), the output's gradient read, and each of the `distinct`
    updated rows read and written (backward with the update fused in). Ids, offsets and
    the sort of the ids are left out (8-16 bytes per lookup against 4 x dim x 4)."""
    return width * dim * (3 * lookups + 2 * distinct)


def nominal_hbm(device_name: str) -> float | None:
    """The data-sheet HBM bandwidth of a known GPU, else None."""
    return next((bandwidth for key, bandwidth in NOMINAL_HBM.items() if key in device_name),
                None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Seconds per call of `fn`, after `warmup` calls, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def copy_bandwidth(device: torch.device, megabytes: int, steps: int = 10) -> dict:
    """Read + write bytes/s of `dst.copy_(src)` for a tensor of `megabytes`."""
    src = torch.ones(megabytes * 2**20 // FLOAT_BYTES, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(device, lambda: dst.copy_(src), steps)
    moved = 2 * src.numel() * FLOAT_BYTES
    return {"megabytes": megabytes, "seconds": seconds, "bytes_per_s": moved / seconds}


def _tbe(rows: int, dim: int, device: torch.device, location: str = "device",
         cache_load_factor: float = 0.2, lr: float = 0.01) -> torch.nn.Module:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    if device.type == "cpu":
        where, compute = EmbeddingLocation.HOST, ComputeDevice.CPU
    else:
        where = {"device": EmbeddingLocation.DEVICE,
                 "uvm_caching": EmbeddingLocation.MANAGED_CACHING}[location]
        compute = ComputeDevice.CUDA
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, where, compute)], optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr,
        cache_load_factor=cache_load_factor,
        device=device if device.type == "cuda" else None)


def tbe_bandwidth(device: torch.device, rows: int, dim: int, lookups: int, steps: int,
                  location: str = "device", seed: int = 0,
                  cache_load_factor: float = 0.2) -> dict:
    """One fused-SGD TBE step (forward, backward, update) on random ids: its time and bytes.

    The same `lookups` ids every step (drawn once with `seed`, uniform over the table), so
    the step's bytes are known exactly; `distinct` counts them. `rows_updated` checks the
    premise: after the steps exactly the looked-up rows have changed.
    """
    tbe = _tbe(rows, dim, device, location, cache_load_factor)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (lookups,), generator=generator).to(device)
    offsets = torch.arange(lookups + 1, device=device)
    grad = torch.full((lookups, dim), 1e-3, device=device)
    probe = ids[: min(lookups, 1024)]
    before = _rows(tbe, probe, device)

    def step() -> None:
        tbe(ids, offsets).backward(grad)

    seconds = _timed(device, step, steps)
    changed = (_rows(tbe, probe, device) != before).any(dim=1)
    distinct = int(torch.unique(ids).numel())
    moved = tbe_step_bytes(lookups, distinct, dim)
    return {"location": location, "rows": rows, "dim": dim, "table_gib": rows * dim *
            FLOAT_BYTES / 2**30, "lookups": lookups, "distinct": distinct, "steps": steps,
            "seconds_per_step": seconds, "bytes_per_step": moved,
            "bytes_per_s": moved / seconds, "lookups_per_s": lookups / seconds,
            "rows_updated": bool(changed.all())}


def _rows(tbe: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The current values of table rows `ids` (a forward without autograd)."""
    with torch.no_grad():
        offsets = torch.arange(ids.numel() + 1, device=device)
        return tbe(ids, offsets).detach().cpu()


def _host_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def uvm_table_rows(dim: int, gpu_bytes: int, host_bytes: int) -> tuple[int, bool]:
    """Rows of the UVM-cached table: 1.25x the GPU's memory if 70% of the host's available
    memory holds it, else that 70% (and then it is not larger than the GPU)."""
    want = int(1.25 * gpu_bytes)
    size = min(want, int(0.7 * host_bytes))
    return size // (dim * FLOAT_BYTES), size > gpu_bytes


def train_config(graph: str, sizes: dict, path: str, batch: int,
                 user_kernel: str | None = None) -> str:
    """`make bench`'s TwHIN config at `batch` edges a step (the lr per edge kept), with the
    user table's compute kernel set when `user_kernel` is given."""
    sized = {**sizes, "batch": batch,
             "lr": bench.EDGE_LR * batch * (1 + 2 * sizes["negatives"])}
    bench._config(graph, sized, path)
    data = yaml.safe_load(open(path))
    if user_kernel:
        data["model"]["embeddings"]["tables"][0]["compute_kernel"] = user_kernel
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def _section(report: dict, name: str, fn: Callable[[], object]) -> None:
    """Run one section; a failure is recorded (and printed) instead of ending the run."""
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as error:  # noqa: BLE001 (every section reports, whatever failed)
        report[name] = {"error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()[-3000:]}
    print(f"[gpu bench] {name} ({time.perf_counter() - started:.0f} s): "
          f"{json.dumps(report[name], default=str)[:600]}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a dry run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="copy,tbe,uvm_caching,train")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes for `train` (default 4000,65536)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--out-dir", default=None,
                        help="write the report as gpu-<device>.json in this directory")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a dry run: OpenMP threads only add noise at these sizes
    sections = args.sections.split(",")
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "quick": args.quick,
                    "load_start": os.getloadavg()}
    try:
        import fbgemm_gpu
        import torchrec
        report.update(torchrec=torchrec.__version__, fbgemm_gpu=fbgemm_gpu.__version__)
    except ImportError as error:
        report["imports"] = f"{type(error).__name__}: {error}"
    print(f"[gpu bench] {report['device']}: torch {report['torch']}, torchrec "
          f"{report.get('torchrec')}, fbgemm_gpu {report.get('fbgemm_gpu')}", flush=True)
    report["nominal_hbm_bytes_per_s"] = nominal_hbm(report["device"])
    small = args.quick or device.type == "cpu"
    if "copy" in sections:
        _section(report, "copy", lambda: copy_bandwidth(device, 64 if small else 4096))
    if "tbe" in sections:
        # Large: a 20M x 128 fp32 table (9.5 GiB), 1M lookups a step (512 MiB of rows).
        _section(report, "tbe", lambda: tbe_bandwidth(
            device, *((200_000, 64, 20_000, 5) if small else (20_000_000, 128, 1 << 20, 50))))
        _add_ratios(report)
    if "uvm_caching" in sections:
        if device.type != "cuda":
            report["uvm_caching"] = {"skipped": "needs CUDA"}
        else:
            gpu = torch.cuda.get_device_properties(device).total_memory
            rows, larger = uvm_table_rows(128, gpu, _host_available_bytes())
            if args.quick:
                rows, larger = 2_000_000, False

            def uvm() -> dict:
                result = tbe_bandwidth(device, rows, 128, 1 << 20, 20, location="uvm_caching")
                return {**result, "gpu_gib": gpu / 2**30, "larger_than_gpu": larger}

            _section(report, "uvm_caching", uvm)
    if "train" in sections:
        _section(report, "train", lambda: _train(args, device))
    report["load_end"] = os.getloadavg()
    out = args.out or (args.out_dir and os.path.join(
        args.out_dir, f"gpu-{device_label(report['device'])}.json"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"[gpu bench] report: {out}", flush=True)
    return report


def device_label(device_name: str) -> str:
    """A file-name label for a device: its model (`h200` of "NVIDIA H200"), else its name."""
    match = re.search(r"[A-Z]+[0-9]{2,}", device_name)
    return re.sub(r"[^a-z0-9]+", "-", (match.group(0) if match else device_name).lower())


def _add_ratios(report: dict) -> None:
    tbe, copy = report.get("tbe", {}), report.get("copy", {})
    if "bytes_per_s" in tbe and "bytes_per_s" in copy:
        tbe["vs_copy"] = tbe["bytes_per_s"] / copy["bytes_per_s"]
    if "bytes_per_s" in tbe and report.get("nominal_hbm_bytes_per_s"):
        tbe["vs_nominal_hbm"] = tbe["bytes_per_s"] / report["nominal_hbm_bytes_per_s"]


def _train(args: argparse.Namespace, device: torch.device) -> list[dict]:
    sizes, graph = bench.bench_graph(args.quick)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else \
        ([sizes["batch"]] if args.quick else [sizes["batch"], 65536])
    runs: list[tuple[int, str | None]] = [(batch, None) for batch in batches]
    if device.type == "cuda":
        runs.append((sizes["batch"], "fused_uvm_caching"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="tml-gpu-bench-") as work:
        for batch, kernel in runs:
            config = train_config(graph, sizes, os.path.join(work, f"b{batch}-{kernel}.yaml"),
                                  batch, kernel)
            try:
                rows.append({"batch": batch, "user_kernel": kernel or "default",
                             **bench._run_tml(config, 1, work)})
            except Exception as error:  # noqa: BLE001 (the other rows still run)
                stderr = getattr(error, "stderr", None) or b""
                rows.append({"batch": batch, "user_kernel": kernel or "default",
                             "error": f"{type(error).__name__}: {error}",
                             "stderr": (stderr.decode(errors="replace")
                                        if isinstance(stderr, bytes) else stderr)[-3000:]})
    return rows


if __name__ == "__main__":
    main()
