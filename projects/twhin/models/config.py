"""The TwHIN model: embedding tables (one per entity type) and relations between them."""

from __future__ import annotations

import enum

import pydantic

from tml.common.modules.embedding.config import LargeEmbeddingsConfig
from tml.core.config.base_config import BaseConfig, Field
from tml.optimizers.config import OptimizerConfig


class TwhinEmbeddingsConfig(LargeEmbeddingsConfig):
    """The tables; TwHIN needs one embedding_dim and one data_type across them."""

    @pydantic.field_validator("tables")
    @classmethod
    def _dims_and_types_match(cls, tables):  # noqa: ANN001, ANN206
        if not tables:
            raise ValueError("at least one table is required")
        first = tables[0]
        for table in tables[1:]:
            if table.embedding_dim != first.embedding_dim:
                raise ValueError(f"all tables must have the same embedding_dim: table "
                                 f"'{first.name}' has {first.embedding_dim}, table "
                                 f"'{table.name}' has {table.embedding_dim}")
            if table.data_type != first.data_type:
                raise ValueError(f"all tables must have the same data_type: table "
                                 f"'{first.name}' is {first.data_type.value}, table "
                                 f"'{table.name}' is {table.data_type.value}")
        return tables


class Operator(str, enum.Enum):
    """How a relation's vector r combines an edge's lhs and rhs into a score.

    translation: dot(lhs, rhs + r); identity: dot(lhs, rhs) (r unused); diagonal (DistMult):
    sum(lhs * r * rhs); complex_diagonal (ComplEx): Re(sum(lhs * r * conj(rhs))) with the
    first half of each vector the real part and the second half the imaginary part.
    """

    TRANSLATION = "translation"
    IDENTITY = "identity"
    DIAGONAL = "diagonal"
    COMPLEX_DIAGONAL = "complex_diagonal"


class Loss(str, enum.Enum):
    """How a positive's score is compared with its negatives' (see `models.TwhinModelAndLoss`).

    bce: binary cross-entropy, positives labelled 1 (weighted by the edge weight), negatives
    0, weighted so that all negatives together weigh as much as the positives. softmax:
    per positive and side, cross-entropy of the positive against its negatives (tail side:
    candidates for rhs; head side: for lhs), weighted by the edge weight; in-batch negatives,
    drawn by popularity, get the logQ correction (their logit minus the log of the
    probability that they were drawn).
    """

    BCE = "bce"
    SOFTMAX = "softmax"


class Regularizer(str, enum.Enum):
    """Penalty on the positives' vectors: n3 sum |x|^3 (complex modulus for
    complex_diagonal; Lacroix et al. 2018), l2 sum x^2."""

    N3 = "n3"
    L2 = "l2"


class Relation(BaseConfig):
    """An edge type: `lhs` and `rhs` name tables; `operator` says how it scores an edge."""

    name: str = Field(..., description="Relation name.")
    lhs: str = Field(..., description="Table of the left-hand entity.")
    rhs: str = Field(..., description="Table of the right-hand entity.")
    operator: Operator = Field(Operator.TRANSLATION, description="Scoring: translation "
                               "dot(lhs, rhs + r), identity dot(lhs, rhs), diagonal "
                               "sum(lhs * r * rhs) (DistMult), complex_diagonal "
                               "Re(sum(lhs * r * conj(rhs))) (ComplEx; even embedding_dim, "
                               "real half then imaginary half).")


class TwhinModelConfig(BaseConfig):
    """Entity tables, the relations between them, and the translations' optimizer."""

    embeddings: TwhinEmbeddingsConfig = Field(..., description="One table per entity type.")
    relations: list[Relation] = Field(..., min_length=1, description="Edge types; the "
                                      "relation index in the data is the position here.")
    translation_optimizer: OptimizerConfig = Field(..., description="Optimizer of the "
                                                   "per-relation translation vectors.")
    loss: Loss = Field(Loss.BCE, description="bce: binary cross-entropy of positives (1) "
                       "against negatives (0), negatives weighted to weigh B together. softmax: "
                       "per positive and side, cross-entropy of the positive against its "
                       "negatives, in-batch negatives with the logQ correction. Both weight a "
                       "positive by its edge weight.")
    regularizer: Regularizer = Field(Regularizer.N3, description="n3: sum of |x|^3 (the "
                                     "modulus for complex_diagonal); l2: sum of x^2.")
    regularization: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Weight of `regularizer` on each positive's lhs, rhs and relation "
        "vectors, added to the loss per positive (mean over the batch); 0 turns it off.")
    reciprocal: bool = Field(
        False, description="Give every relation a second vector, its inverse, used to "
        "predict heads: the head of (?, r, t) is scored as the tail of (t, r^-1, ?) "
        "(Lacroix et al. 2018). The relation vectors are then 2R rows: r's at row i, its "
        "inverse's at row R + i. Needs loss softmax (each side's positive against its own "
        "side's negatives).")

    entity_bias: bool = Field(
        False, description="Give every entity a learned bias, added to every score it takes "
        "part in: score = f(lhs, r, rhs) + bias(lhs) + bias(rhs). The bias is the last "
        "coordinate of the entity's embedding; the operators act on the first "
        "embedding_dim - 2 (one coordinate stays unused so that complex_diagonal keeps an "
        "even count), and the regularizer leaves both out. On long-tail graphs it holds "
        "how often an entity is a positive, which the vectors otherwise learn slowly "
        "(docs/twhin_cli.md, twelfth round).")

    @pydantic.model_validator(mode="after")
    def _relations_name_tables(self) -> TwhinModelConfig:
        names = [table.name for table in self.embeddings.tables]
        for index, relation in enumerate(self.relations):
            for side in ("lhs", "rhs"):
                table = getattr(relation, side)
                if table not in names:
                    raise ValueError(f"relations[{index}] ('{relation.name}'): {side} names "
                                     f"unknown table '{table}' (tables: {', '.join(names)})")
        dim = self.embeddings.tables[0].embedding_dim
        for index, relation in enumerate(self.relations):
            if relation.operator == Operator.COMPLEX_DIAGONAL and dim % 2:
                raise ValueError(f"relations[{index}] ('{relation.name}'): operator "
                                 f"complex_diagonal needs an even embedding_dim, got {dim}")
        if self.entity_bias and dim < 4:
            raise ValueError(f"entity_bias: true needs embedding_dim >= 4 (the operators use "
                             f"embedding_dim - 2 coordinates), got {dim}")
        if self.reciprocal and self.loss != Loss.SOFTMAX:
            raise ValueError("reciprocal: true needs loss: softmax (with bce an edge has one "
                             "score, not one per direction)")
        seen = set()
        for relation in self.relations:
            if relation.name in seen:
                raise ValueError(f"relation name '{relation.name}' is used twice")
            seen.add(relation.name)
        return self
