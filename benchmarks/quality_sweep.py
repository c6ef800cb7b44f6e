"""In-process sweep of training settings on an imported graph (issue 20, second round).

`benchmarks.quality` runs every candidate through the CLI (`twhin train` + `twhin evaluate`:
~30 s of launcher and planner per run on the shared 2-core machine); this trains the same
model, loss, dataset and optimizers in one process, unsharded on CPU, one thread, and ranks
with the same `link_prediction` functions (validation and test MRR, popularity baseline).
Checked against the CLI: the same settings gave test MRR 0.0673 both ways.

    .venv/bin/python -m benchmarks.quality_sweep DATA_DIR 'NAME={"model.loss": "softmax",
        "DATA.shared_negatives": 256, "OPS": "complex_diagonal", "EVAL_EVERY": 10}' ...

DATA_DIR is a `twhin import` output. Keys: dotted config paths; `OPS` sets every relation's
operator, `.*.` every table, `DATA.x` every split's data section, `EVAL_EVERY` N records the
validation MRR every N epochs (`curve`: epoch, validation MRR, training seconds so far),
`STOP` [patience, min_delta] with `EVAL_EVERY` stops as the CLI's early stopping on the
validation MRR does (`tml.core.early_stopping`) and reports the best evaluation's weights
(`best_epoch`, `stop_epoch`; `secs` is then the training time until the stop).
"""
import copy
import json
import os
import sys
import time

import torch
import yaml

from projects.twhin import link_prediction as lp
from projects.twhin.config import TwhinConfig
from projects.twhin.data.data import create_dataset
from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
from projects.twhin.optimizer import build_optimizer
from tml.common.modules.embedding.embedding import LargeEmbeddings
from tml.core.config.config_load import parse_config
from tml.core.config.training import EarlyStoppingConfig
from tml.core.early_stopping import EarlyStopping


def _set(d: dict, key: str, value: object) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d[int(part)] if isinstance(d, list) else d[part]
    d[parts[-1]] = value


def load(data_dir: str, overrides: dict) -> TwhinConfig:
    """The imported config of `data_dir` with `overrides` (see module doc)."""
    with open(os.path.join(data_dir, "config.yaml")) as f:
        raw = yaml.safe_load(f.read().replace("${CONFIG_DIR}", data_dir))
    for key, value in overrides.items():
        if key == "OPS":
            for relation in raw["model"]["relations"]:
                relation["operator"] = value
        elif ".*." in key:
            for i in range(len(raw["model"]["embeddings"]["tables"])):
                _set(raw, key.replace(".*.", f".{i}."), value)
        elif key.startswith("DATA."):
            for split in ("train_data", "validation_data", "test_data"):
                if split in raw:
                    _set(raw, split + "." + key[5:], value)
        else:
            _set(raw, key, value)
    return parse_config(TwhinConfig, raw)


_PREPARED: dict[tuple[str, str], tuple] = {}


def mrr(config: TwhinConfig, model: TwhinModel, split: str,
        popularity: bool = True) -> tuple[dict, dict]:
    """(model metrics, popularity metrics) of `split`, as `twhin evaluate` computes them."""
    tables = {n: model.large_embeddings.ebc.embedding_bags[n].weight.detach()
              for n in model.table_names}
    key = (config.train_data.data_root, split)
    if key not in _PREPARED:
        _PREPARED[key] = lp.prepare(config, split)
    edges, known, _, train = _PREPARED[key]
    sums = lp.rank_sums(tables, model.all_trans_embs.detach(), config.model.relations, edges,
                        known, entity_bias=config.model.entity_bias)
    if not popularity:
        return lp._metrics(sums), {}
    sizes = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    pop = lp.popularity_rank_sums(train, config.model.relations, sizes, edges, known)
    return lp._metrics(sums), lp._metrics(pop)


def train(data_dir: str, overrides: dict, seed: int = 0, eval_every: int = 0,
          stop: tuple[int, float] | None = None) -> dict:
    """Train with the imported config plus `overrides`; test / validation MRR, seconds."""
    config = load(data_dir, overrides)
    torch.manual_seed(seed)
    model = TwhinModel(config.model, config.train_data)
    model.large_embeddings = LargeEmbeddings(config.model.embeddings, device="cpu")
    model.reset_parameters()
    apply_optimizers(model, config.model)
    model_and_loss = TwhinModelAndLoss(model)
    optimizer, scheduler = build_optimizer(model_and_loss, config.model)
    dataset = create_dataset(config.train_data, config.model,
                             num_epochs=config.training.num_epochs)
    rule = EarlyStopping(EarlyStoppingConfig(metric="mrr", mode="max", patience=stop[0],
                                             min_delta=stop[1])) if stop else None
    best_state, best_epoch, stop_epoch = None, None, None
    step, curve, seconds = 0, [], 0.0
    start = time.time()
    for batch in dataset:
        optimizer.zero_grad()
        loss, _ = model_and_loss(batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if eval_every and step % (eval_every * len(dataset)) == 0:
            seconds += time.time() - start
            epoch = step // len(dataset)
            value = mrr(config, model, "validation", popularity=False)[0]["mrr"]
            curve.append((epoch, round(value, 4), round(seconds, 1)))
            if rule is not None:
                improved, done = rule.update(step, {"mrr": value})
                if improved:
                    best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
                if done:
                    stop_epoch = epoch
                    break
            start = time.time()
    else:
        seconds += time.time() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    valid, _ = mrr(config, model, "validation")
    test, popularity = mrr(config, model, "test")
    return {"valid_mrr": valid["mrr"], "mrr": test["mrr"], "h10": test["hits_at_10"],
            "pop": popularity["mrr"], "secs": round(seconds, 1), "steps": step,
            "best_epoch": best_epoch, "stop_epoch": stop_epoch, "curve": curve}


if __name__ == "__main__":
    # One thread, as the CLI runs compare at; set here, not at import, so that a test
    # importing `train` leaves its process's thread count alone.
    torch.set_num_threads(1)
    for spec in sys.argv[2:]:
        name, text = spec.split("=", 1)
        overrides = json.loads(text)
        every = overrides.pop("EVAL_EVERY", 0)
        stop = overrides.pop("STOP", None)
        result = train(sys.argv[1], overrides, eval_every=every,
                       stop=tuple(stop) if stop else None)
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                for k, v in result.items()}), flush=True)
