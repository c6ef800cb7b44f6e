"""tml: train large-embedding recommender models with TorchRec.

Importing `tml` installs the logging set-up of `tml.ml_logging` before anything imports
fbgemm_gpu (which configures the root logger as a side effect of its import).
"""

from importlib import metadata

from tml.ml_logging import setup_logging

setup_logging()

try:
    __version__ = metadata.version("tml")
except metadata.PackageNotFoundError:   # run from a checkout that was not installed
    __version__ = "0.1.0"

__all__ = ["__version__", "setup_logging"]
