"""Warm start into grown tables (`load_checkpoint(grow_rows=True)`): saved rows bit for
bit, new rows keep their initialisation; any other shape change is still refused; TwHIN's
signature check accepts grown tables and appended relations on a warm start only."""

import pytest
import torch
from torch import nn

from projects.twhin.signature import signature_difference
from tml.common.checkpointing import load_checkpoint, save_checkpoint
from tml.errors import CheckpointError


class Tables(nn.Module):
    def __init__(self, rows: int, relations: int, dim: int = 4) -> None:
        super().__init__()
        self.user = nn.Parameter(torch.randn(rows, dim))
        self.relations = nn.Parameter(torch.randn(relations, dim))
        self.bias = nn.Parameter(torch.randn(dim))


def test_grown_tables_keep_saved_rows_bit_for_bit_and_new_rows_initialised(tmp_path):
    torch.manual_seed(0)
    day1 = Tables(6, 2)
    path = save_checkpoint(str(tmp_path), 5, {"model": day1})
    day2 = Tables(9, 3)
    fresh = {k: v.detach().clone() for k, v in day2.state_dict().items()}
    grown = load_checkpoint(path, {"model": day2}, grow_rows=True)
    assert grown == {"model.user": (6, 9), "model.relations": (2, 3)}
    for name, rows in (("user", 6), ("relations", 2)):
        now, saved = getattr(day2, name).detach(), getattr(day1, name).detach()
        assert torch.equal(now[:rows], saved)
        assert torch.equal(now[rows:], fresh[name][rows:])
    assert torch.equal(day2.bias.detach(), day1.bias.detach())


@pytest.mark.parametrize("model,grow", [(Tables(9, 2), False), (Tables(5, 2), True),
                                        (Tables(6, 2, dim=5), True)])
def test_other_shape_changes_and_resume_are_still_refused(tmp_path, model, grow):
    torch.manual_seed(0)
    path = save_checkpoint(str(tmp_path), 5, {"model": Tables(6, 2)})
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"^checkpoint .*: 'model\.user' has shape "
                       r"\[6, 4\] but this model needs \[\d+, \d+\] \(saved from a config "
                       r"with other table sizes\?\)$"):
        load_checkpoint(path, {"model": model}, grow_rows=grow)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _signature(rows, relations):
    return {"version": 1, "embedding_dim": 4, "tables": {"user": rows},
            "relations": [{"name": n, "lhs": "user", "rhs": "user", "operator": "diagonal"}
                          for n in relations]}


def test_signature_accepts_growth_on_warm_start_only():
    saved = _signature(6, ["a"])
    assert signature_difference(saved, _signature(9, ["a", "b"]), grown=True) is None
    assert signature_difference(saved, _signature(9, ["a", "b"])) is not None
    assert signature_difference(saved, _signature(5, ["a"]), grown=True) == \
        "table 'user' was trained with 6 rows, the config says num_embeddings 5"
    assert "relations" in signature_difference(saved, _signature(9, ["b", "a"]), grown=True)
