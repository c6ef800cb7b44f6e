"""A small Heavy Ranker set-up for tests: a tiny segdense schema, planted data, a config."""

from __future__ import annotations

import copy
import json
import os

import yaml

TASKS = ["recap.engagement.is_favorited", "recap.engagement.is_replied",
         "recap.engagement.is_retweeted"]

SCHEMA = {"schema": [
    {"dtype": "int64_list", "feature_name": "home_recap_2022_discrete__segdense_vals",
     "length": 8},
    {"dtype": "float_list", "feature_name": "home_recap_2022_cont__segdense_vals", "length": 24},
    {"dtype": "int64_list", "feature_name": "home_recap_2022_binary__segdense_vals",
     "length": 16},
    *({"dtype": "int64_list", "feature_name": t, "length": 1} for t in TASKS),
    {"dtype": "int64_list", "feature_name": "recap.engagement.is_shared", "length": 1},
    {"dtype": "int64_list", "feature_name": "meta.user_id", "length": 1},
    {"dtype": "int64_list", "feature_name": "meta.author_id", "length": 1},
    {"dtype": "int64_list", "feature_name": "meta.tweet_id", "length": 1},
    {"dtype": "float_list", "feature_name": "user.twhin_user_follow_embeddings", "length": 8},
]}

RENAMED = {"continuous": "home_recap_2022_cont__segdense_vals",
           "binary": "home_recap_2022_binary__segdense_vals",
           "discrete": "home_recap_2022_discrete__segdense_vals",
           "user_embedding": "user.twhin_user_follow_embeddings",
           "meta__user_id": "meta.user_id", "meta__author_id": "meta.author_id"}


def write_schema(directory: str) -> str:
    path = os.path.join(directory, "segdense.json")
    with open(path, "w") as handle:
        json.dump(SCHEMA, handle)
    return path


def config_dict(schema_path: str, train: str, valid: str | None = None,
                batch: int = 64) -> dict:
    """A small share_all parallel-MaskNet config over the test schema."""
    data = {"inputs": train, "global_batch_size": batch,
            "seg_dense_schema": {"schema_path": schema_path, "renamed_features": RENAMED},
            "tasks": {t: {} for t in [*TASKS, "recap.engagement.is_shared"]},
            "preprocess": {"truncate_and_slice": {"continuous_feature_truncation": 20}}}
    tower = {"mlp_config": {"layer_sizes": [16, 1], "batch_norm": {"affine": False,
                                                                    "momentum": 0.1}}}
    return {
        "training": {"num_train_steps": 60, "checkpoint_every_n": 30, "train_log_every_n": 20,
                     "eval_log_every_n": 1000, "num_eval_steps": -1},
        "model": {
            "backbone": {"mask_net_config": {
                "mask_blocks": [{"aggregation_size": 32, "input_layer_norm": False,
                                 "output_size": 32}] * 2,
                "mlp": {"layer_sizes": [32], "final_layer_activation": True},
                "use_parallel": True}},
            "featurization_config": {"double_norm_log_config": {
                "batch_norm_config": {"affine": True, "momentum": 0.01}, "clip_magnitude": 5.0,
                "layer_norm_config": {"axis": -1, "center": True, "epsilon": 0.0,
                                      "scale": True}}},
            "multi_task_type": "share_all",
            "tasks": {t: copy.deepcopy(tower) for t in TASKS},
        },
        "train_data": data,
        "validation_data": {"validation": {**copy.deepcopy(data), "inputs": valid or train}},
        "optimizer": {"adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
                      "single_task_learning_rate": {"constant": 0.003}},
    }


def write_config(path: str, config: dict) -> str:
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path
