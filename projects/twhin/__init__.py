"""TwHIN: heterogeneous-graph entity embeddings (El-Kishky et al., KDD 2022) on TorchRec.

`projects.twhin.fit` trains from Python (`projects.twhin.api`); importing this package
stays light (nothing of torch is imported until `fit` runs).
"""

from __future__ import annotations

from typing import Any

__all__ = ["fit", "evaluate", "export", "FitResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'projects.twhin' has no attribute {name!r}")
