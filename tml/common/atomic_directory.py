"""Write a directory so that it appears whole or not at all.

Commands that write a directory of outputs (an import, an export) build it under a
temporary sibling name and rename it into place at the end; a failure removes the
temporary directory and leaves any previous output untouched.

The finished directory gets the permissions of any directory the user creates
(0777 less the umask), not the private 0700 that `tempfile.mkdtemp` gives the
temporary one. A destination that cannot be written (its parent is a file, a
read-only file system, no permission, a full disk) is one line naming it, raised as
the caller's error class, not an `OSError` traceback.
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
    if force or not os.path.lexists(out):
        return
    try:
        empty_directory = os.path.isdir(out) and not os.listdir(out)
    except OSError as failure:
        raise error(f"cannot read {out}: {failure.strerror or failure}") from None
    if not empty_directory:
        raise error(f"{out} exists and is not empty; pass --force to replace it")


def current_umask() -> int:
    """This process's umask (read from /proc where possible: setting it is process-wide)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cannot_write(path: str, error: OSError) -> str:
    """One line for an `OSError` met while writing `path`."""
    text = str(error).strip()
    reason = error.strerror or (text.splitlines()[0] if text else type(error).__name__)
    return f"cannot write {path}: {reason}"


@contextmanager
def atomic_directory(out: str, error: type[TmlError] = TmlError) -> Iterator[str]:
    """Yield a temporary directory beside `out`; on success it replaces `out`.

    An `OSError` from creating or renaming the directory becomes `error` with one line
    naming `out` (the caller's own writes inside it are the caller's to report: only it
    knows whether an `OSError` came from reading an input or writing the output). The
    temporary directory is removed on any failure.
    """
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    except OSError as failure:
        raise error(cannot_write(out, failure)) from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp's is private (0700)
    except OSError as failure:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(cannot_write(out, failure)) from None
    try:
        yield tmp
        try:
            if os.path.lexists(out):
                if os.path.isdir(out) and not os.path.islink(out):
                    shutil.rmtree(out)
                else:
                    os.remove(out)
            os.rename(tmp, out)
        except OSError as failure:
            raise error(cannot_write(out, failure)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
