"""`make bench` end to end on the tiny graph: every row is measured and the report written."""

import json

import pytest

TRAINERS = ("tml_1_worker", "tml_2_workers", "tml_1_worker_fp16", "plain_pytorch",
            "plain_pytorch_tuned_malloc")


@pytest.mark.slow
@pytest.mark.timeout(900)   # 83 s alone; 212 s measured on a loaded 2-core host (+~3 min
# for the reader rows under the same load)
def test_quick_bench_writes_the_side_by_side_report(tmp_path):
    # `make bench`'s main in this process (the trainers, readers and launches it measures
    # are its own processes): an interpreter importing torch less.
    from benchmarks.run import main

    main(["--quick", "--name", "quick", "--results", str(tmp_path)])
    report = json.load(open(tmp_path / "quick.json"))
    plain = report["plain_pytorch"]
    trained_edges = plain["steps"] * plain["batch"]   # every trainer runs the same epochs
    assert plain["batch"] == report["sizes"]["batch"] and plain["steps"] > 0
    for key in TRAINERS:
        row = report[key]
        # The rate is the work done over the time measured: the same edges for every trainer
        # (a rate of a shorter or empty run, or of another clock, fails here).
        assert row["edges_per_s"] * row["train_seconds"] == pytest.approx(trained_edges,
                                                                          rel=1e-6), key
        assert 0 < row["train_seconds"] <= row["total_seconds"], key
        assert row["edges_per_s"] > 1000, (key, row)   # far below any host's real rate
        # The tiny graph is learnable: well above chance, and tml (1 or 2 workers, fp16)
        # learns as well as the plain PyTorch trainer of the same model.
        assert row["auc"] > 0.65, (key, row["auc"])
        assert row["auc"] == pytest.approx(plain["auc"], abs=0.05), (key, row["auc"])
    assert report["tml_2_workers"]["workers"] == 2
    assert len(report["tml_2_workers"]["peak_rss_mib"]) == 2
    assert report["reader"]["edges_per_s"] == pytest.approx(
        report["reader"]["batches_per_s"] * plain["batch"], rel=1e-6)
    assert report["reader"]["edges_per_s"] > report["tml_1_worker"]["edges_per_s"]
    launch = report["launch"]
    assert launch["self_launch"] > 0 and launch["torchrun"] > 0
    assert launch["ratio"] == pytest.approx(launch["self_launch"] / launch["torchrun"])
    # Reader processes (issue 17): every serving row measured; the run fed by readers has
    # the in-process run's steps and result.
    readers = report["readers"]
    for key in ("in_process", "1_readers", "2_readers"):
        assert readers["serving"][key]["batches_per_s"] > 0, key
    fed, plain_run = readers["training"]["2_readers"], readers["training"]["in_process"]
    assert fed["steps"] == plain_run["steps"] > 0 and fed["final"] == plain_run["final"]
    assert readers["training"]["same_result"] is True
    table = (tmp_path / "quick.md").read_text()
    assert "fp16 tables" in table and "malloc" in table and "2 reader processes" in table
    assert f"| tml, 1 worker | {report['tml_1_worker']['edges_per_s']:,.0f} |" in table
