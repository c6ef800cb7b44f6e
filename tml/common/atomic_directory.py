"""Write a directory so that it appears whole or not at all.

Commands that write a directory of outputs (an import, an export) build it under a
temporary sibling name and rename it into place at the end; a failure removes the
temporary directory and leaves any previous output untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from tml.errors import TmlError


def refuse_non_empty(out: str, force: bool, error: type[TmlError] = TmlError) -> None:
    """Raise `error` if `out` exists and is not an empty directory, unless `force`."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise error(f"{out} exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_directory(out: str) -> Iterator[str]:
    """Yield a temporary directory beside `out`; on success it replaces `out`."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
