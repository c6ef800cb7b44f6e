"""benchmarks/quality.py: candidate overrides expand to valid `--set` flags for a config."""

import copy

import pytest

from benchmarks.quality import CANDIDATES, _sets
from projects.twhin.cli import apply_overrides

CONFIG = {"training": {"num_epochs": 1, "seed": 0},
          "model": {"translation_optimizer": {"sgd": {"lr": 0.05}},
                    "embeddings": {"tables": [{"optimizer": {"adagrad": {"lr": 0.5}}},
                                              {"optimizer": {"adagrad": {"lr": 0.5}}}]},
                    "relations": [{"operator": "translation"}, {"operator": "translation"}]},
          "train_data": {"in_batch_negatives": 10, "global_negatives": 5,
                         "per_replica_batch_size": 8}}


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_every_candidate_applies_to_every_table_and_relation(name):
    flags = _sets(CONFIG, CANDIDATES[name])
    values = [f for f in flags if f != "--set"]

    data = apply_overrides(copy.deepcopy(CONFIG), values, "config.yaml")
    overrides = CANDIDATES[name]
    if "OPS" in overrides:
        assert {r["operator"] for r in data["model"]["relations"]} == {overrides["OPS"]}
    key = "model.embeddings.tables.*.optimizer.adagrad.lr"
    if key in overrides:
        assert [t["optimizer"]["adagrad"]["lr"] for t in data["model"]["embeddings"]["tables"]] \
            == [overrides[key]] * 2


def test_make_bench_quality_creates_pykeens_own_pinned_environment(tmp_path):
    """`make bench-quality` on a clean clone makes PyKEEN's venv itself (as bench-peers
    does PBG's), pinned, and hands that venv to the benchmark; a dry run shows the plan."""
    import shutil
    import subprocess

    from tests.conftest import require
    from tests.twhin_setup import REPO

    require(shutil.which("make"), "make is not installed")
    venv = tmp_path / "pk"
    plan = subprocess.run(["make", "-n", "bench-quality", f"PYKEEN_VENV={venv}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert f"-m venv {venv}" in plan
    assert f"{venv}/bin/pip install --quiet pykeen==1.11.1" in plan
    assert f"-m benchmarks.quality --pykeen {venv}" in plan
    default = subprocess.run(["make", "-n", "bench-quality"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    assert "--pykeen .venv-pykeen" in default
    assert "--graphs patterns:3000:40000:21,longtail:10000:60000:21,nations,umls,kinships" \
        in default


def test_pykeen_alone_takes_the_dim_twhin_import_wrote(tmp_path):
    """`--candidates ""` trains no tml config; PyKEEN then gets the imported config's dim
    (as many reals per entity as tml's), read from where `one_graph` imported the graph."""
    import yaml

    from benchmarks.quality import written_dim

    folder = tmp_path / "longtail_100_600_7" / "data"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"embeddings": {"tables": [{"embedding_dim": 48}, {"embedding_dim": 48}]}}}))
    assert written_dim("longtail:100:600:7", str(tmp_path)) == 48
    with pytest.raises(FileNotFoundError):
        written_dim("longtail:100:600:8", str(tmp_path))


def test_test_sample_is_a_seeded_subset_both_sides_rank(tmp_path):
    """`--test-sample N`: N distinct lines of the test file, in file order, the same ones
    every time (tml's import and PyKEEN read the same file); a smaller file is used whole."""
    from benchmarks.quality import sample_test_split

    test = tmp_path / "test.tsv"
    lines = [f"user:u{i}\tlike\titem:i{i}\n" for i in range(50)]
    test.write_text("".join(lines[:-1]) + lines[-1].rstrip("\n"))   # no final newline
    paths = {"train": "t", "valid": "v", "test": str(test)}
    sampled = sample_test_split(paths, 10)
    assert sampled["train"] == "t" and sampled["valid"] == "v"
    got = open(sampled["test"]).read().splitlines(keepends=True)
    assert len(got) == 10 and len(set(got)) == 10
    assert all(line.endswith("\n") for line in got)
    wanted = [line if line.endswith("\n") else line + "\n" for line in lines]
    positions = [wanted.index(line) for line in got]
    assert positions == sorted(positions)
    assert open(sample_test_split(paths, 10)["test"]).read() == "".join(got)
    assert sample_test_split(paths, 50) == paths
    assert sample_test_split(paths, 60) == paths
