"""The scoring signature of a TwHIN model, saved with every checkpoint and checked on load.

Why: a checkpoint holds tensors only, and the tensors of a model trained with
`operator: diagonal` have exactly the shapes of one trained with `translation`. Loading it
with a config that says another operator (or lists the relations in another order, or
swaps a relation's tables) would score every edge with the wrong formula and nothing would
fail: silently wrong metrics, embeddings and resumed training. So training saves the
signature (per relation: name, lhs, rhs, operator; the embedding dim; table names and
sizes) into the checkpoint (`Checkpointer.save(extra=...)`, file `extra.json`), and every
loader calls `check_checkpoint_matches(config, checkpoint)` first, which fails with one
line naming the first difference, e.g.

    checkpoint runs/x/30: relation 'fav' was trained with operator 'diagonal', the config
    says 'translation'

Checkpoints written before signatures existed have no `extra.json`: they load, with a
warning, as before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tml.common.checkpointing import latest_checkpoint, read_extra
from tml.errors import CheckpointError

from .config import TwhinConfig
from .models.config import Operator, TwhinModelConfig

logger = logging.getLogger(__name__)

# The key of the signature inside the checkpoint's `extra` document.
SIGNATURE_KEY = "twhin_model_signature"
SIGNATURE_VERSION = 1


def _model(config: TwhinConfig | TwhinModelConfig) -> TwhinModelConfig:
    return config.model if isinstance(config, TwhinConfig) else config


def model_signature(config: TwhinConfig | TwhinModelConfig) -> dict[str, Any]:
    """What decides how a checkpoint's tensors are read and scored, as plain JSON data.

    Relations are listed in config order: a relation's index in the data (and its row of
    the relation vectors) is its position, so the order is part of the signature.
    """
    model = _model(config)
    tables = model.embeddings.tables
    signature = {
        "version": SIGNATURE_VERSION,
        "embedding_dim": tables[0].embedding_dim,
        "tables": {table.name: table.num_embeddings for table in tables},
        "relations": [{"name": r.name, "lhs": r.lhs, "rhs": r.rhs,
                       "operator": Operator(r.operator).value} for r in model.relations],
    }
    # Only when on: checkpoints from before the option have no key and no bias.
    if model.entity_bias:
        signature["entity_bias"] = True
    return signature


def checkpoint_extra(config: TwhinConfig | TwhinModelConfig) -> dict[str, Any]:
    """The `extra` document that training saves with each checkpoint."""
    return {SIGNATURE_KEY: model_signature(config)}


def _resolve(path: str) -> str:
    """`path` itself when it is a checkpoint, else the newest checkpoint of a save_dir."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    return latest_checkpoint(path) or path


def signature_difference(saved: dict[str, Any], wanted: dict[str, Any],
                         grown: bool = False) -> str | None:
    """The first difference between a saved and a wanted signature, as a sentence; or None.

    `grown`: `wanted` may extend `saved`: more rows in a table, relations appended after
    the saved ones (a warm start after `twhin import --vocab`).

    Operators are compared first: a different operator is the mismatch that nothing else
    catches (shapes agree), so it is the one to name when several things differ.
    """
    saved_relations = saved.get("relations", [])
    wanted_relations = wanted["relations"]
    by_name = {r.get("name"): r for r in saved_relations}
    for relation in wanted_relations:
        old = by_name.get(relation["name"])
        if old is not None and old.get("operator") != relation["operator"]:
            return (f"relation '{relation['name']}' was trained with operator "
                    f"'{old.get('operator')}', the config says '{relation['operator']}'")
    saved_bias, wanted_bias = (bool(saved.get("entity_bias", False)),
                               bool(wanted.get("entity_bias", False)))
    if saved_bias != wanted_bias:   # same shapes, another scoring
        return (f"it was trained with entity_bias {str(saved_bias).lower()}, the config says "
                f"{str(wanted_bias).lower()}")
    saved_names = [r.get("name") for r in saved_relations]
    wanted_names = [r["name"] for r in wanted_relations]
    if grown and len(wanted_names) > len(saved_names):
        wanted_names = wanted_names[:len(saved_names)]
    if saved_names != wanted_names:
        if sorted(map(str, saved_names)) == sorted(wanted_names):
            return (f"the relations are in another order: the checkpoint has "
                    f"{', '.join(map(str, saved_names))}; the config has "
                    f"{', '.join(wanted_names)} (a relation's index is its position)")
        return (f"it was trained with relations {', '.join(map(str, saved_names))}; the "
                f"config has {', '.join(wanted_names)}")
    for old, new in zip(saved_relations, wanted_relations):
        for side in ("lhs", "rhs"):
            if old.get(side) != new[side]:
                return (f"relation '{new['name']}' was trained with {side} table "
                        f"'{old.get(side)}', the config says '{new[side]}'")
    if saved.get("embedding_dim") != wanted["embedding_dim"]:
        return (f"it was trained with embedding_dim {saved.get('embedding_dim')}, the "
                f"config says {wanted['embedding_dim']}")
    saved_tables, wanted_tables = saved.get("tables", {}), wanted["tables"]
    if sorted(saved_tables) != sorted(wanted_tables):
        return (f"it was trained with tables {', '.join(sorted(saved_tables))}; the config "
                f"has {', '.join(sorted(wanted_tables))}")
    for name, rows in wanted_tables.items():
        if grown and isinstance(saved_tables[name], int) and saved_tables[name] < rows:
            continue
        if saved_tables[name] != rows:
            return (f"table '{name}' was trained with {saved_tables[name]} rows, the config "
                    f"says num_embeddings {rows}")
    return None


def check_checkpoint_matches(config: TwhinConfig | TwhinModelConfig,
                             checkpoint_dir: str, grown: bool = False) -> None:
    """Raise CheckpointError (one line) when the checkpoint was trained as another model.

    `checkpoint_dir`: a checkpoint, or a save_dir (its newest checkpoint is checked).
    `grown` (a warm start): the config may have more rows per table and more relations
    after the saved ones (`twhin import --vocab` appends both).
    A checkpoint without a saved signature (written before signatures existed) passes with
    a logged warning.
    """
    path = _resolve(checkpoint_dir)
    extra = read_extra(path)
    saved = None if extra is None else extra.get(SIGNATURE_KEY)
    if saved is None:
        logger.warning("checkpoint %s records no model signature (written by an older "
                       "version?): cannot check that its operators and tables match the "
                       "config", path)
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: its model signature is not a mapping")
    difference = signature_difference(saved, model_signature(config), grown)
    if difference is not None:
        raise CheckpointError(f"checkpoint {path}: {difference}")
