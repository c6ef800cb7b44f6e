"""`make bench` end to end on the tiny graph: every row is measured and the report written."""

import json
import subprocess
import sys

import pytest

from tests.twhin_setup import REPO


@pytest.mark.slow
def test_quick_bench_writes_the_side_by_side_report(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--name", "quick",
                    "--results", str(tmp_path)], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    report = json.load(open(tmp_path / "quick.json"))
    for key in ("tml_1_worker", "tml_2_workers", "tml_1_worker_fp16", "plain_pytorch",
                "plain_pytorch_tuned_malloc"):
        assert report[key]["edges_per_s"] > 0, key
        # the tiny graph is learnable: every trainer must be well above chance
        assert report[key]["auc"] > 0.65, (key, report[key]["auc"])
    assert report["reader"]["edges_per_s"] > report["tml_1_worker"]["edges_per_s"]
    assert report["launch"]["self_launch"] > 0
    table = (tmp_path / "quick.md").read_text()
    assert "fp16 tables" in table and "malloc" in table
