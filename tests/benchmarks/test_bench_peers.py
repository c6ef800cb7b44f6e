"""`make bench-peers`: tml against PyTorch-BigGraph in one run (issue 13).

The end-to-end test needs PBG's own environment (.venv-pbg, created by `make bench-peers`);
without it that test is skipped and says so. The row-access limit and the report arithmetic
are checked in-process either way.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.peers import compare
from projects.twhin.data.generate import generate_graph
from tests.twhin_setup import REPO, launcher_env


def test_row_access_limit_times_the_touched_rows(tmp_path):
    graph = tmp_path / "g"
    generate_graph(str(graph), num_users=500, num_tweets=100, num_edges=5000,
                   num_communities=5)
    sizes = {"num_users": 500, "num_tweets": 100, "dim": 8, "batch": 100}
    limit = compare.row_access_limit(sizes, str(graph), batches=5)
    assert limit["lookups_per_batch"] == 200 and limit["threads"] == 1
    assert limit["edges_per_s"] > 10_000


def test_report_states_every_row_against_pbg_best_and_the_limit():
    rows = {"tml_1_worker": {"edges_per_s": 400.0, "auc": 0.9},
            "pbg_1_worker": {"edges_per_s": 200.0, "auc": 0.8},
            "row_access_limit": {"edges_per_s": 1000.0}}
    report = {"rows": rows, "pbg_best": "pbg_1_worker", "rounds": 3,
              "date": "2026-12-02 06:00 UTC", "load": {"start": [1.0], "end": [2.0]},
              "labels": {"tml_1_worker": "tml, 1 worker", "pbg_1_worker": "PBG",
                         "row_access_limit": "limit"}}
    table = compare._table(report)
    assert "| tml, 1 worker | 400 | 2.00x | 40% | 0.900 |" in table
    assert "| limit | 1,000 | 5.00x | 100% |  |" in table
    assert "3 interleaved rounds" in table and "load average 1.0 at start" in table


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.path.exists(compare.PBG_PYTHON),
                    reason="no .venv-pbg: `make bench-peers` creates it")
def test_quick_peers_run_trains_and_scores_pbg_on_the_same_graph(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.peers", "--quick", "--rounds", "1",
                    "--name", "quick", "--results", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True, env=launcher_env(), timeout=840)
    report = json.load(open(tmp_path / "quick.json"))
    rows = report["rows"]
    assert set(rows) == {"tml_1_worker", "tml_2_workers", "pbg_1_worker", "pbg_2_workers",
                         "plain_pytorch", "row_access_limit"}
    assert rows[report["pbg_best"]]["vs_pbg_best"] == pytest.approx(1.0)
    for key in ("pbg_1_worker", "pbg_2_workers"):
        # PBG saw every train edge of the generated graph, each epoch, and learned it.
        assert rows[key]["example"]["edges"] == 39_200 * report["sizes"]["epochs"]
        assert rows[key]["auc"] > 0.65, rows[key]
    for row in rows.values():
        assert row["edges_per_s"] > 0 and len(row["load_samples"]) == 1
    assert "PyTorch-BigGraph 1.0, 1 worker" in (tmp_path / "quick.md").read_text()
