"""tml: train large-embedding recommender models with TorchRec.

Importing `tml` installs the logging set-up of `tml.ml_logging` before anything imports
fbgemm_gpu (which configures the root logger as a side effect of its import).
"""

from tml.ml_logging import setup_logging

setup_logging()

__all__ = ["setup_logging"]
