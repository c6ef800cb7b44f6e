"""Models built on tml, one package per project."""

import tml  # noqa: F401  (logging set-up before any project module imports torchrec)
