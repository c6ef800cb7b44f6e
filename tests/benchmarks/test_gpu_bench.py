"""The GPU benchmark's parts that run anywhere: its byte model, its sizing, its configs, and
a dry run of `benchmarks/gpu.sh` on the CPU (the GPU figures need a GPU host)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from benchmarks import gpu
from tests.twhin_setup import REPO


def test_tbe_bytes_model_and_the_uvm_table_size():
    # 3 row-sized transfers per lookup (row read, output write, gradient read) and a read
    # and a write per distinct updated row: 4 lookups of 2 distinct rows of dim 8, fp32.
    assert gpu.tbe_step_bytes(4, 2, 8) == 4 * 8 * (3 * 4 + 2 * 2)
    gib = 2**30
    rows, larger = gpu.uvm_table_rows(128, gpu_bytes=80 * gib, host_bytes=200 * gib)
    assert rows == int(1.25 * 80 * gib) // 512 and larger
    rows, larger = gpu.uvm_table_rows(128, gpu_bytes=139 * gib, host_bytes=120 * gib)
    assert rows == int(0.7 * 120 * gib) // 512 and not larger  # the host is the limit
    assert gpu.nominal_hbm("NVIDIA H200") == 4.8e12 and gpu.nominal_hbm("Tesla T4") is None
    assert [gpu.device_label(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
                                          "cpu")] == ["h100", "a100", "cpu"]


def test_train_configs_keep_the_lr_per_edge_and_set_the_user_kernel(tmp_path):
    from projects.twhin.config import TwhinConfig
    from tml.core.config import load_config_from_yaml

    sizes = {**gpu.bench.QUICK}
    graph = str(tmp_path / "graph")
    plain = gpu.train_config(graph, sizes, str(tmp_path / "a.yaml"), 1000)
    uvm = gpu.train_config(graph, sizes, str(tmp_path / "b.yaml"), 4000, "fused_uvm_caching")
    a, b = (load_config_from_yaml(TwhinConfig, path) for path in (plain, uvm))
    assert (a.train_data.per_replica_batch_size, b.train_data.per_replica_batch_size) == \
        (1000, 4000)
    lrs = [c.model.embeddings.tables[0].optimizer.sgd.lr for c in (a, b)]
    assert lrs[1] == pytest.approx(4 * lrs[0])   # lr / batch: the same step per edge
    assert a.model.embeddings.tables[0].compute_kernel is None
    assert b.model.embeddings.tables[0].compute_kernel.value == "fused_uvm_caching"
    assert b.model.embeddings.tables[1].compute_kernel is None
    assert yaml.safe_load(open(uvm))["train_data"]["data_root"] == f"{graph}/train"


def test_cpu_dry_run_measures_the_tbe_step_it_models(tmp_path):
    report = gpu.main(["--device", "cpu", "--quick", "--sections", "copy,tbe,uvm_caching",
                       "--out", str(tmp_path / "r.json")])
    assert json.load(open(tmp_path / "r.json"))["tbe"] == report["tbe"]
    tbe = report["tbe"]
    assert "error" not in tbe, tbe
    # The ids the step looked up (seed 0): the byte count is the model's for these ids.
    ids = torch.randint(0, tbe["rows"], (tbe["lookups"],),
                        generator=torch.Generator().manual_seed(0))
    assert tbe["distinct"] == ids.unique().numel() < tbe["lookups"]
    assert tbe["bytes_per_step"] == gpu.tbe_step_bytes(tbe["lookups"], tbe["distinct"],
                                                       tbe["dim"])
    assert tbe["rows_updated"]     # the fused update ran on every looked-up row
    assert tbe["bytes_per_s"] == pytest.approx(tbe["bytes_per_step"] / tbe["seconds_per_step"])
    assert tbe["vs_copy"] == pytest.approx(tbe["bytes_per_s"] / report["copy"]["bytes_per_s"])
    assert report["uvm_caching"] == {"skipped": "needs CUDA"}
    assert "train" not in report


@pytest.mark.slow
def test_the_script_runs_with_the_packages_already_installed(tmp_path):
    # The venv's python as `python3`: torchrec imports, so nothing is installed.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"),
                           str(tmp_path / "no-wheels"), "--quick", "--sections", "copy"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[gpu bench] cpu: torch 2.13.0" in done.stdout and "torchrec 1.8.0" in done.stdout
    report = json.load(open(tmp_path / "out" / "gpu-cpu.json"))
    assert report["device"] == "cpu" and report["copy"]["bytes_per_s"] > 0
    assert set(report) >= {"torchrec", "fbgemm_gpu", "load_start", "load_end"}
    assert not (tmp_path / "no-wheels").exists()
