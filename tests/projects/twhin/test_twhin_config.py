"""TwHIN configuration: the original YAML loads; bad relations and tables are named."""

import os

import pytest
import yaml

from projects.twhin.config import TwhinConfig
from tests.twhin_setup import REPO
from tml.core.config import load_config_from_yaml
from tml.errors import ConfigError

ORIGINAL = os.path.join(REPO, "tests", "data", "original_twhin_local.yaml")
LOCAL = os.path.join(REPO, "projects", "twhin", "config", "local.yaml")


def test_original_config_loads_unchanged_apart_from_data_root(monkeypatch):
    monkeypatch.setenv("TWHIN_TEST_DATA", "/data/edges/*")
    config = load_config_from_yaml(TwhinConfig, ORIGINAL)
    assert [t.num_embeddings for t in config.model.embeddings.tables] == [424_241, 72_543]
    assert [r.name for r in config.model.relations] == ["fav", "reply", "retweet", "magic_recs"]
    assert config.model.translation_optimizer.sgd.lr == 0.05
    assert config.training.num_epochs == 5 and config.training.train_log_every_n == 10
    assert config.train_data.limit == 9990 and config.validation_data.offset == 9990
    assert config.train_data.data_root == "/data/edges/*"


def test_shipped_config_loads_with_data_beside_the_repo():
    config = load_config_from_yaml(TwhinConfig, LOCAL)
    root = os.path.normpath(config.train_data.data_root)
    assert root == os.path.join(REPO, "data", "twhin", "train")


def _modified(tmp_path, edit):
    data = yaml.safe_load(open(LOCAL).read().replace("${CONFIG_DIR}", "/x"))
    edit(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_relation_naming_an_unknown_table(tmp_path):
    path = _modified(tmp_path, lambda d: d["model"]["relations"][1].update(rhs="video"))
    with pytest.raises(ConfigError, match=r"model: relations\[1\] \('reply'\): rhs names "
                                          r"unknown table 'video' \(tables: user, tweet\)"):
        load_config_from_yaml(TwhinConfig, path)


def test_tables_with_unequal_dims(tmp_path):
    path = _modified(tmp_path,
                     lambda d: d["model"]["embeddings"]["tables"][1].update(embedding_dim=8))
    with pytest.raises(ConfigError, match=r"model.embeddings.tables: all tables must have the "
                                          r"same embedding_dim: table 'user' has 4, table "
                                          r"'tweet' has 8"):
        load_config_from_yaml(TwhinConfig, path)


def test_mistyped_field_is_named(tmp_path):
    def edit(d):
        d["training"]["num_train_step"] = d["training"].pop("num_train_steps")
    with pytest.raises(ConfigError, match=r"c.yaml: training.num_train_step: unknown field"):
        load_config_from_yaml(TwhinConfig, _modified(tmp_path, edit))


def test_wrong_type_is_named(tmp_path):
    path = _modified(tmp_path, lambda d: d["train_data"].update(per_replica_batch_size="many"))
    with pytest.raises(ConfigError, match=r"train_data.per_replica_batch_size: Input should "
                                          r"be a valid integer"):
        load_config_from_yaml(TwhinConfig, path)


def test_sharding_type_is_checked(tmp_path):
    path = _modified(tmp_path, lambda d: d["model"]["embeddings"]["tables"][0].update(
        sharding_type="diagonal"))
    with pytest.raises(ConfigError, match=r"tables.0.sharding_type: Input should be "
                                          r"'table_wise', 'row_wise' or 'column_wise'"):
        load_config_from_yaml(TwhinConfig, path)
