"""The rule by which `twhin import` picks the training settings of the config it writes.

Checked on statistics alone (`choose_defaults`) and through real imports of small synthetic
triples: which settings are chosen, not how well they train (benchmarks/kg_compare.py
measures that).
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from projects.twhin.importer import (
    CHECKPOINT_EPOCHS,
    LARGE_EPOCHS,
    LARGE_MAX_EPOCHS,
    LARGE_RELATION_LR,
    LARGE_TABLE_LR,
    MAX_GLOBAL_NEGATIVES,
    MIN_CHECKPOINT_STEPS,
    MIN_STEPS,
    N3_WEIGHT,
    RELATION_VISITS,
    SHARED_NEGATIVES,
    SPARSE_ENDS_PER_ROW,
    SPARSE_N3_WEIGHT,
    VALID_SHARED_NEGATIVES,
    choose_defaults,
    import_triples,
)


def test_few_relations_per_batch_get_shared_negatives_softmax_n3_and_complex():
    # The built-in graph: 2M edges, 4 relations (50/15/20/15 %), 100k users, 20k tweets.
    # Issue 20: the earlier settings here (10 in-batch + 5 global negatives, translation,
    # relation SGD 0.05 = 1e-4 of the tables') ranked below the popularity baseline, and so
    # did BCE against 32 uniform negatives per positive.
    n = 1_960_000
    d = choose_defaults(n, [int(n * p) for p in (0.5, 0.15, 0.2, 0.15)], [100_000, 20_000], 32)
    assert (d.batch, d.in_batch_negatives, d.global_negatives) == (1000, 0, 0)
    assert (d.shared_negatives, d.loss, d.regularization) == (SHARED_NEGATIVES, "softmax",
                                                              N3_WEIGHT)
    assert (d.table_lr, d.relation_lr, d.operator, d.epochs) == (
        LARGE_TABLE_LR, LARGE_RELATION_LR, "complex_diagonal", LARGE_EPOCHS)
    assert d.relation_lr >= d.table_lr    # no longer 1e-4 of the tables'
    assert d.relation_optimizer == "adagrad"
    assert d.same_relation == pytest.approx(1000 * (0.25 + 0.0225 + 0.04 + 0.0225))
    # the reason names every setting and why
    for words in (f"{SHARED_NEGATIVES} uniform negatives per table shared by the batch",
                  "drawn by popularity", "loss softmax", f"N3 regularisation {N3_WEIGHT:g}",
                  "operator complex_diagonal", "query entity itself",
                  f"{LARGE_RELATION_LR:g} for the relation vectors", f"{LARGE_EPOCHS} epochs"):
        assert words in d.reason
    assert choose_defaults(n, [n], [100_000, 20_000], 31).operator == "diagonal"   # odd dim


def test_sparse_graphs_get_the_larger_n3_weight_and_the_reason_says_why():
    # Training edge ends per entity (2 x edges / rows of the used tables): the long-tail
    # generated graph has ~6.6, the patterns one ~14, the built-in graph ~33.
    per_relation = [6000, 2000, 1200, 800]                  # 10k edges, few relations
    sparse = choose_defaults(10_000, per_relation, [1600, 1600])          # 6.25 ends
    dense = choose_defaults(10_000, per_relation, [500, 500])             # 20 ends
    assert (sparse.regularization, dense.regularization) == (SPARSE_N3_WEIGHT, N3_WEIGHT)
    assert SPARSE_N3_WEIGHT > N3_WEIGHT
    assert "6.2 training edge ends per entity, below 10: sparse graphs overfit" in sparse.reason
    assert f"N3 regularisation {SPARSE_N3_WEIGHT:g} (" in sparse.reason
    # the weights measured on the long-tail tuning graph (sixth round), the chosen one best
    assert SPARSE_N3_WEIGHT == 0.05
    assert ("validation MRR was 0.169 with 0.03, 0.177 with 0.05, 0.163 with 0.1"
            in sparse.reason)
    assert f"N3 regularisation {N3_WEIGHT:g} (20.0 training edge ends" in dense.reason
    # the threshold: exactly SPARSE_ENDS_PER_ROW ends is not sparse
    rows = int(2 * 10_000 / SPARSE_ENDS_PER_ROW)
    assert choose_defaults(10_000, per_relation, [rows]).regularization == N3_WEIGHT
    assert choose_defaults(10_000, per_relation, [rows + 1]).regularization == \
        SPARSE_N3_WEIGHT
    # many relations per batch: no regularisation, whatever the sparsity
    assert choose_defaults(1592, [1592 // 55] * 55, [1000], 32).regularization == 0.0


def test_sparse_graphs_with_few_relations_get_an_entity_bias_and_the_reason_says_why(
        tmp_path):
    per_relation = [6000, 2000, 1200, 800]
    sparse = choose_defaults(10_000, per_relation, [1600, 1600])          # 6.25 ends
    assert sparse.entity_bias and "an entity bias (a sparse graph" in sparse.reason
    assert "0.146 against 0.093 without" in sparse.reason
    dense = choose_defaults(10_000, per_relation, [500, 500])             # 20 ends
    assert not dense.entity_bias and "entity bias" not in dense.reason
    # many relations per batch (the public graphs: no gain measured there) and a --dim
    # that leaves no room beside the bias: none
    assert not choose_defaults(1592, [1592 // 55] * 55, [1000], 32).entity_bias
    assert not choose_defaults(10_000, per_relation, [1600, 1600], 3).entity_bias
    # and the written config says it, and loads
    from projects.twhin.config import TwhinConfig
    from tml.core.config import load_config_from_yaml

    rng = np.random.default_rng(0)
    edges = {(f"user:u{rng.integers(1000)}", "likes", f"item:i{rng.integers(500)}")
             for _ in range(2000)}                      # ~2.7 ends per entity, one relation
    import_triples(_write(tmp_path / "sparse.tsv", sorted(edges)), str(tmp_path / "out"),
                   dim=8)
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["model"]["entity_bias"] is True
    assert load_config_from_yaml(TwhinConfig, str(tmp_path / "out" / "config.yaml")
                                 ).model.entity_bias


def test_many_relations_per_batch_switch_to_global_negatives_and_complex_diagonal():
    # Nations-like: 1592 edges over 55 relations, one table of 14 entities.
    counts = [1592 // 55] * 55
    d = choose_defaults(1592, counts, [14], 32)
    assert d.batch == 79 and d.same_relation < 5
    assert (d.in_batch_negatives, d.global_negatives) == (0, 13)   # the whole table
    assert (d.table_lr, d.relation_lr, d.operator) == (5.0, 50.0, "complex_diagonal")
    assert d.epochs == 200                                          # 20 steps per epoch
    assert (d.shared_negatives, d.loss, d.regularization) == (0, "bce", 0.0)
    assert "global negatives instead of in-batch" in d.reason
    assert choose_defaults(1592, counts, [14], 31).operator == "diagonal"   # odd dim
    # global negatives: capped for bigger tables, at least 1 for a 1-row table
    assert choose_defaults(1592, counts, [500, 14_000], 32).global_negatives == \
        MAX_GLOBAL_NEGATIVES
    assert choose_defaults(1592, counts, [1, 20], 32).global_negatives == 1


def test_threshold_and_epochs():
    # One relation: every edge of a batch shares it, so same_relation == batch size.
    below = choose_defaults(999, [999], [100], 8)             # batch 49 < 50
    at = choose_defaults(1000, [1000], [100], 8)              # batch 50
    assert (below.table_lr, at.table_lr) == (5.0, LARGE_TABLE_LR)
    # Epochs: LARGE_EPOCHS with few relations per batch; else at least 4000 steps, 10 to 200.
    assert choose_defaults(100_000, [100_000], [10], 8).epochs == LARGE_EPOCHS
    many = [1000] * 1000                                      # same_relation 1: many relations
    assert choose_defaults(1_000_000, many, [10], 8).epochs == 10     # 1000 steps/epoch
    assert choose_defaults(100_000, many[:100], [10], 8).epochs == 40   # 100 steps/epoch
    assert choose_defaults(40, [20, 20], [10], 8).epochs == 200


def test_many_relations_with_many_edges_each_train_fewer_epochs_and_say_why():
    # 20 steps per epoch on these small graphs, so MIN_STEPS alone gives 200 epochs; with
    # many edges per relation the relation visits bound it sooner (issue 20, sixth round).
    def rule(edges, relations, rows):
        return choose_defaults(edges, [edges // relations] * relations, [rows], 32,
                               validation=True)
    nations, umls, kinships = rule(1592, 55, 14), rule(5216, 46, 135), rule(8544, 25, 104)
    assert (nations.epochs, umls.epochs) == (200, 200)      # 29 and 113 edges per relation
    assert 200 * 341 > RELATION_VISITS                      # Kinships: 341 per relation
    assert kinships.epochs == -(-RELATION_VISITS // 341) == 118
    assert not kinships.early_stopping
    assert (f"118 epochs (enough for {MIN_STEPS} steps or for {RELATION_VISITS} edges per "
            f"relation, whichever is fewer, 10 to 200; 342 edges per relation per epoch"
            ) in kinships.reason
    # Relations without training edges do not count; the 10-epoch floor holds.
    padded = choose_defaults(8544, [8544 // 25] * 25 + [0] * 25, [104], 32)
    assert padded.epochs == kinships.epochs
    # 200 steps per epoch (20 epochs for MIN_STEPS), 5000 edges per relation (8 epochs)
    assert choose_defaults(200_000, [5000] * 40, [10_000], 32).epochs == 10
    # Large graphs: MIN_STEPS already gives fewer epochs, unchanged by the bound.
    assert choose_defaults(100_000, [1000] * 100, [10], 8).epochs == 40


def _write(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def test_import_writes_the_chosen_defaults_and_says_why(tmp_path):
    rng = np.random.default_rng(0)
    # Many relations, few edges each: the dense settings.
    dense = [(f"e{rng.integers(10)}", f"r{rng.integers(12)}", f"e{rng.integers(10)}")
             for _ in range(400)]
    result = import_triples(_write(tmp_path / "dense.tsv", dense), str(tmp_path / "dense"),
                            dim=8)
    text = (tmp_path / "dense" / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert "# Defaults chosen by the rule in docs/twhin_cli.md: only" in text
    assert result["defaults"] in text
    data = config["train_data"]
    assert (data["in_batch_negatives"], data["global_negatives"]) == (0, 9)   # 10 entities
    assert config["validation_data"]["global_negatives"] == 9
    assert {r["operator"] for r in config["model"]["relations"]} == {"complex_diagonal"}
    assert config["model"]["translation_optimizer"] == {"sgd": {"lr": 50.0}}
    assert config["model"]["embeddings"]["tables"][0]["optimizer"] == {
        "adagrad": {"lr": 5.0, "eps": 1e-8}}   # eps > 0: see tests/test_import_safety.py
    # the statistic is computed from the training split's edges per relation
    rels = pq.read_table(tmp_path / "dense" / "train").column("rel").to_numpy()
    p = np.bincount(rels) / len(rels)
    expected = data["per_replica_batch_size"] * float((p ** 2).sum())
    assert f"only {expected:.1f} edges of a relation per batch" in result["defaults"]
    # ~33 edges per relation: MIN_STEPS decides the written epochs (200 at 20 per epoch)
    assert config["training"]["num_epochs"] == 200
    assert f"or for {RELATION_VISITS} edges per relation" in text
    # 20 steps an epoch: ten epochs would be 200 steps; checkpoints come no more often than
    # every MIN_CHECKPOINT_STEPS (each costs ~60 ms of CPU however small the tables)
    steps_per_epoch = len(rels) // data["per_replica_batch_size"]
    assert CHECKPOINT_EPOCHS * steps_per_epoch < MIN_CHECKPOINT_STEPS
    assert config["training"]["checkpoint_every_n"] == MIN_CHECKPOINT_STEPS

    # Many edges per relation (8 relations of ~500 edges over 30 entities, batch 200, 25
    # edges of a relation per batch): fewer epochs, written with the reason.
    dense = [(f"e{rng.integers(30)}", f"r{rng.integers(8)}", f"e{rng.integers(30)}")
             for _ in range(4000)]
    result = import_triples(_write(tmp_path / "many.tsv", dense), str(tmp_path / "many"),
                            dim=8, split="1,0,0")
    config = yaml.safe_load((tmp_path / "many" / "config.yaml").read_text())
    rels = pq.read_table(tmp_path / "many" / "train").column("rel").to_numpy()
    per_relation = len(rels) / len(np.unique(rels))
    assert "only" in result["defaults"]               # the many-relations settings
    assert config["training"]["num_epochs"] == -(-RELATION_VISITS // int(per_relation)) < 200

    # One relation, a batch of 65 edges: the few-relations settings.
    sparse = [(f"user:u{i % 300}", "likes", f"item:i{(7 * i) % 97}") for i in range(1300)]
    result = import_triples(_write(tmp_path / "sparse.tsv", sparse), str(tmp_path / "sparse"),
                            valid=_write(tmp_path / "v.tsv", sparse[:20]), dim=8)
    text = (tmp_path / "sparse" / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert result["defaults"] in text and "shared by the batch" in text
    assert config["train_data"]["per_replica_batch_size"] == 65
    assert (config["train_data"]["in_batch_negatives"], config["train_data"]["global_negatives"],
            config["train_data"]["shared_negatives"]) == (0, 0, SHARED_NEGATIVES)
    # Validation batches only feed the logged held-out AUC and loss (early stopping ranks
    # against every entity): a few shared negatives keep each evaluation cheap.
    assert config["validation_data"]["shared_negatives"] == VALID_SHARED_NEGATIVES
    assert f"{VALID_SHARED_NEGATIVES} shared negatives in validation batches" in text
    # 2 x 1300 edge ends over 300 + 97 rows: 6.5 per entity, a sparse graph
    assert (config["model"]["loss"], config["model"]["regularization"]) == (
        "softmax", SPARSE_N3_WEIGHT)
    assert "6.5 training edge ends per entity" in text
    assert config["model"]["relations"][0]["operator"] == "complex_diagonal"
    assert config["model"]["translation_optimizer"] == {
        "adagrad": {"lr": LARGE_RELATION_LR, "eps": 1e-8}}
    assert config["training"]["num_epochs"] == LARGE_MAX_EPOCHS   # with a validation split
