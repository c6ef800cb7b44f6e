"""The lookup KJT for the original's documented example (tables f0..f2, five edges)."""

import torch

from projects.twhin.data.edges import edges_to_kjt, relation_tables
from projects.twhin.models.config import Relation


def test_documented_example():
    tables = ["f0", "f1", "f2"]
    pairs = [("f0", "f1"), ("f1", "f2"), ("f1", "f0"), ("f2", "f1"), ("f0", "f2")]
    relations = [Relation(name=f"r{i}", lhs=a, rhs=b) for i, (a, b) in enumerate(pairs)]
    kjt = edges_to_kjt(torch.tensor([1, 6, 3, 1, 8]), torch.tensor([6, 3, 4, 4, 9]),
                       torch.tensor([0, 2, 1, 3, 4]), relation_tables(relations, tables), tables)
    assert kjt.keys() == tables
    assert kjt.values().tolist() == [1, 3, 8, 6, 6, 3, 4, 4, 1, 9]
    assert kjt.lengths().tolist() == [
        1, 0, 0, 1, 0, 0, 0, 0, 1, 0,
        0, 1, 1, 0, 1, 0, 0, 1, 0, 0,
        0, 0, 0, 0, 0, 1, 1, 0, 0, 1,
    ]
    per_key = kjt.to_dict()
    assert per_key["f0"].values().tolist() == [1, 3, 8]
    assert per_key["f1"].values().tolist() == [6, 6, 3, 4]
    assert per_key["f2"].values().tolist() == [4, 1, 9]
    assert int(kjt.lengths().sum()) == len(kjt.values()) == 10
