"""Day 1 then day 2 of a growing graph, in one worker process (started by
tests/test_retrain_day2.py): import, train, export; import day 2 with `--vocab` of day 1,
then train day 2 warm started from day 1's checkpoint with the item table frozen (and
started from day 1's export) and the user table trainable at its own learning rate."""

from __future__ import annotations

import json
import os
import sys

import yaml

DAY_STEPS = 4


def _config(path: str, edit: object) -> str:
    with open(path) as handle:
        data = yaml.safe_load(handle)
    data["training"].update(num_train_steps=DAY_STEPS, checkpoint_every_n=DAY_STEPS,
                            eval_log_every_n=1000, num_eval_steps=1)
    data.pop("validation_data", None)
    data.pop("test_data", None)
    edit(data)  # type: ignore[operator]
    out = os.path.join(os.path.dirname(path), "run.yaml")
    with open(out, "w") as handle:
        yaml.safe_dump(data, handle)
    return out


def two_days(root: str, day1_tsv: str, day2_tsv: str) -> dict:
    from projects.twhin.config import TwhinConfig
    from projects.twhin.export import export_embeddings
    from projects.twhin.importer import import_triples
    from projects.twhin.run import run
    from tml.core.config import load_config_from_yaml

    day1, day2 = os.path.join(root, "day1"), os.path.join(root, "day2")
    import_triples(day1_tsv, day1, split="1,0,0", dim=8)
    path1 = _config(os.path.join(day1, "config.yaml"), lambda data: None)
    config1 = load_config_from_yaml(TwhinConfig, path1)
    first = run(config1, os.path.join(root, "save1"))
    export_embeddings(config1, path1, first.checkpoint, os.path.join(root, "export1"))

    import_triples(day2_tsv, day2, split="1,0,0", dim=8, vocab=os.path.join(day1, "vocab"))

    def edit(data: dict) -> None:
        data["training"]["initial_checkpoint_dir"] = first.checkpoint
        for table in data["model"]["embeddings"]["tables"]:
            if table["name"] == "item":
                table["frozen"] = True
                table["init_from_export"] = {   # placed by id through day 2's vocab
                    "path": os.path.join(root, "export1", "item.parquet"),
                    "vocab": os.path.join(day2, "vocab", "tables", "item.parquet")}
            else:   # per-table learning rate: the user table continues more gently
                table["optimizer"] = {"adagrad": {"lr": 0.05}}

    config2 = load_config_from_yaml(TwhinConfig, _config(os.path.join(day2, "config.yaml"),
                                                         edit))
    second = run(config2, os.path.join(root, "save2"))
    return {"day1": first.checkpoint, "day2": second.checkpoint}


GROWN_ROWS, GROWN_DIM = 13, 8
SHARDING_TYPES = ("row_wise", "column_wise")   # table_wise: test_day2_... (1 worker)


def grown_sharded(checkpoint: str, vectors_file: str) -> dict[str, object]:
    """In each of 2 workers, per sharding type: a table of GROWN_ROWS rows warm started from
    `checkpoint` (fewer rows), then from `vectors_file` (fewer rows); this worker's shards
    before, after the warm start and after the vectors, as (row, column, values) lists."""
    import torch

    from tml.common.checkpointing import load_checkpoint
    from tml.common.device import setup_and_get_device
    from tml.common.modules.embedding.config import LargeEmbeddingsConfig
    from tml.common.modules.embedding.embedding import LargeEmbeddings
    from tml.common.modules.embedding.vectors import load_table_vectors, local_shards
    from tml.common.sharding import shard_model
    from tml.trainer.fused_tables import apply_table_optimizers

    device = setup_and_get_device()
    config = LargeEmbeddingsConfig.model_validate({"tables": [{
        "name": "user", "num_embeddings": GROWN_ROWS, "embedding_dim": GROWN_DIM,
        "optimizer": {"sgd": {"lr": 0.1}}, "init_from_export": {"path": vectors_file}}]})

    def shards(model: torch.nn.Module) -> list:
        weight = model.state_dict()["ebc.embedding_bags.user.weight"]
        return [(row, column, shard.detach().clone().tolist())
                for shard, (row, column) in local_shards(weight)]

    results: dict[str, object] = {}
    for sharding_type in SHARDING_TYPES:
        torch.manual_seed(0)
        model = apply_table_optimizers(LargeEmbeddings(config), config.tables)
        sharded = shard_model(model, device, {"user": sharding_type},
                              output_dtensor=True)
        before = shards(sharded)
        grown = load_checkpoint(checkpoint, {"model": sharded}, grow_rows=True)
        warm = shards(sharded)
        load_table_vectors(sharded, config.tables)
        results[sharding_type] = {"grown": grown, "before": before, "warm": warm,
                                  "vectors": shards(sharded)}
    return results


if __name__ == "__main__":
    print(json.dumps(two_days(*sys.argv[1:4])))
