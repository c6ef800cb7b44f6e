"""The Heavy Ranker's config: the original local_prod.yaml loads (anchors, `<<:` merges,
${HOME}/${TML_BASE}); unsupported or inconsistent options are one-line errors naming the
field."""

import os

import pytest
import yaml

from projects.home.recap.config import RecapConfig
from projects.home.recap.model.config import MultiTaskType
from tests.twhin_setup import REPO
from tml.core.config import load_config_from_yaml
from tml.errors import ConfigError

ORIGINAL = os.path.join(REPO, "tests", "data", "original_recap_local_prod.yaml")
SHIPPED = os.path.join(REPO, "projects", "home", "recap", "config", "local_prod.yaml")
FAV = "recap.engagement.is_favorited"


def test_original_config_loads_as_written(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setenv("TML_BASE", "/src/tml")
    config = load_config_from_yaml(RecapConfig, ORIGINAL)
    assert config.train_data.inputs == "/home/u/tmp/recap_local_random_data/*.gz"
    assert config.train_data.seg_dense_schema.schema_path.startswith("/src/tml/projects/")
    masknet = config.model.backbone.mask_net_config
    assert masknet.use_parallel and len(masknet.mask_blocks) == 4
    assert [b.aggregation_size for b in masknet.mask_blocks] == [1024] * 4
    assert masknet.mlp.layer_sizes == [2048]
    assert config.model.multi_task_type is MultiTaskType.SHARE_ALL
    assert len(config.model.tasks) == 10 and len(config.train_data.tasks) == 13
    assert config.model.tasks["recap.engagement.is_report_tweet_clicked"].mlp_config \
        .dropout.rate == 0.2
    # the `<<: *data_tasks` merge keeps the other tasks and overrides one
    fav_set = config.validation_data[FAV]
    assert len(fav_set.tasks) == 13 and fav_set.tasks[FAV].neg_downsampling_rate == 0.01
    assert fav_set.evaluation_tasks == [FAV]
    assert config.optimizer.multi_task_learning_rates.tower_learning_rates[FAV] \
        .linear_ramp_to_constant.learning_rate == 0.0008
    assert config.training.num_train_steps == 10


def test_shipped_config_differs_only_in_data_paths(monkeypatch):
    monkeypatch.delenv("RECAP_DATA", raising=False)
    shipped = load_config_from_yaml(RecapConfig, SHIPPED)
    monkeypatch.setenv("TML_BASE", "/src")
    original = load_config_from_yaml(RecapConfig, ORIGINAL)
    assert shipped.train_data.inputs == "data/recap/*.parquet"
    assert os.path.isfile(shipped.train_data.seg_dense_schema.schema_path)
    for config in (shipped, original):
        for data in [config.train_data, *config.validation_data.values()]:
            data.inputs = "X"
            data.seg_dense_schema.schema_path = "S"
        config.training.save_dir = None
    assert shipped == original


def _edited(tmp_path, edit):
    data = yaml.safe_load(open(SHIPPED).read().replace("${CONFIG_DIR}", "/x")
                          .replace("${RECAP_DATA:-data/recap}", "/d"))
    edit(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["backbone"].update(dcn_config={"poly_degree": 2}),
     r"c.yaml: model.backbone.dcn_config: dcn_config is not supported by tml's recap \(leave "
     r"it null\)$"),
    (lambda d: d["model"]["featurization_config"].update(
        double_norm_log_config=None, z_score_log_config={"analysis_path": "/a"}),
     r"model.featurization_config.z_score_log_config: z_score_log_config is not supported"),
    (lambda d: d["train_data"].update(data_service_dispatcher="grpc://x"),
     r"train_data.data_service_dispatcher: data_service_dispatcher is not supported"),
    (lambda d: d["model"].update(stratifiers=[{"name": "a", "index": 0, "value": 1}]),
     r"model.stratifiers: stratifiers is not supported"),
    (lambda d: d["model"]["backbone"]["mask_net_config"].update(use_paralel=True),
     r"model.backbone.mask_net_config.use_paralel: unknown field"),
    (lambda d: d["model"].update(multi_task_type="share_none"),
     r"model: multi_task_type share_none takes no backbone"),
    (lambda d: d["train_data"]["tasks"].pop(FAV),
     r"train_data.tasks lacks the model's task 'recap.engagement.is_favorited'"),
    (lambda d: d["optimizer"]["multi_task_learning_rates"]["tower_learning_rates"].pop(FAV),
     r"tower_learning_rates lacks task 'recap.engagement.is_favorited'"),
    (lambda d: d["model"]["featurization_config"]["double_norm_log_config"]
     ["layer_norm_config"].update(axis=0),
     r"layer_norm_config.axis: only -1 \(normalise over the features\) is supported"),
])
def test_unsupported_or_inconsistent_options_are_named(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load_config_from_yaml(RecapConfig, _edited(tmp_path, edit))
    assert "\n" not in str(raised.value)


def test_workflow_loads_and_names_main():
    from tml.launch import load_workflow

    workflow = load_workflow(os.path.join(REPO, "projects", "home", "recap", "workflows",
                                          "recap-local.yaml"))
    assert workflow.file == "projects/home/recap/main.py"
    assert os.path.isfile(os.path.join(workflow.working_path(), workflow.file))
    assert workflow.environment["RECAP_DATA"] == "data/recap"


def test_configuration_reference_is_current():
    """The recap configuration page is generated from the code; regenerate it (and the other
    projects' pages) when configs change: make config-docs"""
    from tml.core.config.reference import render

    with open(os.path.join(REPO, "docs", "projects", "recap", "configuration.md")) as handle:
        assert handle.read() == render(RecapConfig)
