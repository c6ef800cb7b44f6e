"""Learning-rate schedules, and the combined optimizer on wrapped and unwrapped models."""

import pytest
import torch

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.models.config import TwhinModelConfig
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
from projects.twhin.optimizer import build_optimizer
from tml.common.machines import nproc_from_machines_file
from tml.errors import ConfigError
from tml.optimizers.config import LearningRate
from tml.optimizers.optimizer import compute_lr


def _lr(**kind):
    return LearningRate.model_validate(kind)


def test_constant_and_piecewise():
    assert compute_lr(_lr(constant=0.3), 1000) == 0.3
    pc = _lr(piecewise_constant={"learning_rate_boundaries": [10, 20],
                                 "learning_rate_values": [1.0, 0.5, 0.1]})
    assert [compute_lr(pc, s) for s in (0, 9, 10, 19, 20, 99)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def test_ramps():
    ramp = _lr(linear_ramp_to_constant={"learning_rate": 2.0, "num_ramp_steps": 4})
    assert [compute_lr(ramp, s) for s in (0, 1, 4, 100)] == [0.0, 0.5, 2.0, 2.0]
    cos = _lr(linear_ramp_to_cosine={"learning_rate": 1.0, "final_learning_rate": 0.1,
                                     "num_ramp_steps": 10, "final_num_steps": 110})
    assert compute_lr(cos, 5) == pytest.approx(0.5)
    assert compute_lr(cos, 10) == pytest.approx(1.0)
    assert compute_lr(cos, 60) == pytest.approx(0.55)
    assert compute_lr(cos, 500) == pytest.approx(0.1)


def test_piecewise_lengths_are_checked():
    with pytest.raises(ValueError, match="one more entry"):
        _lr(piecewise_constant={"learning_rate_boundaries": [10], "learning_rate_values": [1.0]})


def _model_config(table_optimizer):
    return TwhinModelConfig.model_validate({
        "embeddings": {"tables": [
            {"name": "user", "num_embeddings": 10, "embedding_dim": 4,
             "optimizer": table_optimizer}]},
        "relations": [{"name": "follows", "lhs": "user", "rhs": "user"}],
        "translation_optimizer": {"sgd": {"lr": 0.1}, "learning_rate": {
            "piecewise_constant": {"learning_rate_boundaries": [2],
                                   "learning_rate_values": [0.1, 0.01]}}},
    })


def test_unwrapped_model_gets_a_combined_optimizer_and_schedules():
    """The original built its optimizer from `model.fused_optimizer`, which only DMP has."""
    config = _model_config({"sgd": {"lr": 1.0}, "learning_rate": {
        "linear_ramp_to_constant": {"learning_rate": 1.0, "num_ramp_steps": 4}}})
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=2, in_batch_negatives=1)
    model = TwhinModel(config, data)
    model.large_embeddings.ebc = type(model.large_embeddings.ebc)(
        tables=model.large_embeddings.ebc.embedding_bag_configs(), device=torch.device("cpu"))
    apply_optimizers(model, config)
    optimizer, scheduler = build_optimizer(TwhinModelAndLoss(model), config)
    assert sorted(optimizer.params) == [
        "fused_opt.model.large_embeddings.ebc.embedding_bags.user.weight",
        "operator_opt.model.all_trans_embs"]
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs == [[0.0, 0.1], [0.25, 0.1], [0.5, 0.01], [0.75, 0.01]]


def test_sgd_momentum_on_a_table_is_refused():
    config = _model_config({"sgd": {"lr": 1.0, "momentum": 0.9}})
    data = TwhinDataConfig(data_root="x", per_replica_batch_size=2, in_batch_negatives=1)
    with pytest.raises(ConfigError, match="'user': sgd momentum is not supported"):
        apply_optimizers(TwhinModel(config, data), config)


def test_machines_file_sets_the_default_worker_count(tmp_path, monkeypatch):
    path = tmp_path / "machines.yaml"
    path.write_text("chief:\n  num_accelerators: 3\n")
    monkeypatch.setenv("TML_MACHINES_FILE", str(path))
    assert nproc_from_machines_file() == 3
    path.write_text("chief:\n  num_accelerators: many\n")
    with pytest.raises(ConfigError, match="chief.num_accelerators must be a positive integer"):
        nproc_from_machines_file()
    monkeypatch.setenv("TML_MACHINES_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        nproc_from_machines_file()


def test_gradient_accumulation_steps_every_n_batches_with_the_mean_gradient():
    from tml.core.custom_training_loop import _AccumulatingOptimizer

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = _AccumulatingOptimizer(torch.optim.SGD([weight], lr=1.0), 2)
    values = []
    for grad in (1.0, 3.0, 5.0, 7.0):  # the pipeline's order: zero_grad, backward, step
        optimizer.zero_grad()
        (weight * grad).sum().backward()
        optimizer.step()
        values.append(float(weight))
    assert values == [0.0, -2.0, -2.0, -8.0]
