"""A one-line answer, before anything starts, when torchrec or fbgemm is not installed.

Neither is a plain dependency of the tml wheel: torchrec's metadata requires the 465 MB
CUDA build of fbgemm-gpu (also on CPU hosts) and an old torchmetrics, so it is installed
with `--no-deps`, and fbgemm comes from the extra that fits the host (`tml[cpu]`,
`tml[cuda]`); see docs/install.md. A user who skipped a step would otherwise get a
traceback from deep inside a worker; the commands that train or load models call
`require_torchrec` first. Commands that need neither (`twhin import`, `twhin neighbors`,
`tml --version`) never import them.
"""

from __future__ import annotations

import importlib.util

from tml.errors import TmlError

TORCHREC_REQUIREMENT = "torchrec==1.8.0"


class StackError(TmlError):
    """torchrec or fbgemm-gpu is missing from this Python environment."""


def require_torchrec(what: str) -> None:
    """Raise StackError naming the install command when torchrec or fbgemm is missing."""
    if importlib.util.find_spec("fbgemm_gpu") is None:
        raise StackError(f"{what} needs fbgemm-gpu, which is not installed: pip install "
                         "'tml[cpu]' (or 'tml[cuda]' on a CUDA host), then pip install "
                         f"--no-deps {TORCHREC_REQUIREMENT} (docs/install.md)")
    if importlib.util.find_spec("torchrec") is None:
        raise StackError(f"{what} needs torchrec, which is not installed: pip install "
                         f"--no-deps {TORCHREC_REQUIREMENT} (--no-deps: its metadata would "
                         "pull the CUDA build of fbgemm-gpu; docs/install.md)")
