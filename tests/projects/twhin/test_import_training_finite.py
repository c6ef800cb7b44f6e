"""The Adagrad settings `twhin import` writes keep the loss finite.

Cause of the NaN this guards against: with eps 0, Adagrad's update of an embedding row is
lr * g / (sqrt(sum g^2) + 0), so a row whose first gradient is exactly zero gets 0 / 0 =
NaN. Rows looked up only as global negatives (ids met only in the validation or test file:
a table with many more rows than training uses) get exactly-zero gradients once their
logits saturate the sigmoid; the NaN row then poisons every score it takes part in.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from projects.twhin.importer import ADAGRAD_EPS, import_triples
from tests.twhin_setup import REPO, launcher_env
from tml.core.config import load_config_from_yaml
from tml.errors import ConfigError
from tml.optimizers.config import AdagradConfig


def _fused_adagrad_row_after_a_zero_gradient(eps: float) -> torch.Tensor:
    """Row 1 of a 2-row fbgemm table (the kernel TorchRec fuses Adagrad into) after a step
    in which it was looked up but got a gradient of exactly zero."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    table = SplitTableBatchedEmbeddingBagsCodegen(
        [(2, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ADAGRAD, learning_rate=5.0, eps=eps)
    pooled = table(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    (pooled[0].sum() + 0 * pooled[1].sum()).backward()
    return table.split_embedding_weights()[0][1]


def test_zero_gradient_on_a_fresh_row_is_nan_with_eps_0_and_finite_with_the_default():
    assert torch.isnan(_fused_adagrad_row_after_a_zero_gradient(0.0)).all()   # the cause
    default = AdagradConfig(lr=5.0).eps
    assert default == ADAGRAD_EPS > 0
    assert torch.isfinite(_fused_adagrad_row_after_a_zero_gradient(default)).all()


def test_eps_0_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="greater than 0"):
        AdagradConfig(lr=1.0, eps=0.0)


def _sparse_graph(tmp_path):
    """Training touches 20 entities; the test file brings 6000 more rows into the table."""
    rng = np.random.default_rng(0)
    train = [(f"u{rng.integers(20)}", f"r{rng.integers(3)}", f"u{rng.integers(20)}")
             for _ in range(2000)]
    test = [(f"u{1000 + i}", "r0", f"u{4000 + i}") for i in range(3000)]
    paths = []
    for name, rows in (("train.tsv", train), ("test.tsv", test)):
        (tmp_path / name).write_text("".join("\t".join(r) + "\n" for r in rows))
        paths.append(str(tmp_path / name))
    return paths


def test_import_writes_adagrad_eps_for_every_table(tmp_path):
    from projects.twhin.config import TwhinConfig

    train, test = _sparse_graph(tmp_path)
    import_triples(train, str(tmp_path / "out"), test=test, dim=8)
    config = load_config_from_yaml(TwhinConfig, str(tmp_path / "out" / "config.yaml"))
    assert [t.optimizer.adagrad.eps for t in config.model.embeddings.tables] == [ADAGRAD_EPS]
    table = config.model.embeddings.tables[0]
    assert table.num_embeddings == 6020 and config.train_data.global_negatives == 32


_TRAIN = """
import json, sys
import yaml
from projects.twhin.config import TwhinConfig
from projects.twhin.run import run
from tml.core.config import load_config_from_yaml
config = load_config_from_yaml(TwhinConfig, sys.argv[1])
result = run(config, save_dir=sys.argv[2])
print(json.dumps({"final_step": result.final_step, "loss": result.last_loss}))
"""


@pytest.mark.slow
def test_a_config_written_by_import_trains_with_finite_loss(tmp_path):
    """Before the fix this graph's loss was NaN from step 7 on (lr 5, 32 global negatives
    over 6020 rows of which training uses 20). One worker, 40 steps."""
    train, test = _sparse_graph(tmp_path)
    out = tmp_path / "out"
    import_triples(train, str(out), test=test, dim=8)
    data = yaml.safe_load((out / "config.yaml").read_text())
    assert data["model"]["embeddings"]["tables"][0]["optimizer"]["adagrad"]["lr"] == 5.0
    data["training"].update(num_train_steps=40, train_log_every_n=1, checkpoint_every_n=1000)
    (out / "config.yaml").write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-c", _TRAIN, str(out / "config.yaml"),
                             str(tmp_path / "save")], capture_output=True, text=True,
                            cwd=REPO, env=launcher_env(OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 40
    assert summary["loss"] is not None and np.isfinite(summary["loss"])
    losses = [float(line.split("loss ")[1].split(",")[0])
              for line in result.stderr.splitlines() if ": loss " in line]
    assert len(losses) == 40 and all(np.isfinite(losses)), losses


def test_config_error_names_eps_in_a_yaml_file(tmp_path):
    from projects.twhin.config import TwhinConfig

    train, test = _sparse_graph(tmp_path)
    import_triples(train, str(tmp_path / "out"), test=test, dim=8)
    path = tmp_path / "out" / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"]["embeddings"]["tables"][0]["optimizer"]["adagrad"]["eps"] = 0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        load_config_from_yaml(TwhinConfig, str(path))
    assert "eps" in str(error.value) and "greater than 0" in str(error.value)
    assert "\n" not in str(error.value)
