"""Write a small file so that its path holds the old content or the whole new one, never half.

Why one helper: run records, best-checkpoint markers, checksums, port files, effective
configs and error files are all read by another process (a resumed run, the elastic agent,
a trainer waiting for a reader) that may look at any moment, or after a crash or a SIGTERM in
the middle of a write. Each is written to a temporary file in the same directory (so the
rename stays in one filesystem and is atomic) and renamed over the path.

The temporary name is unique (pid and random suffix) and created exclusively (`"x"`), so two
writers of one path never write into each other's file and a planted symlink at the
temporary name is refused rather than followed; the file gets the umask's permissions, like
a plain `open`. On any failure, interruption included, the temporary file is removed and the
path is left as it was.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from typing import IO, Any


def replace_atomic(path: str, produce: Callable[[str], Any]) -> None:
    """Create `path` (or replace it) with the file that `produce(tmp)` leaves at `tmp`, a
    unique temporary path beside it that exists, empty and created exclusively, when
    `produce` is called (a writer of our own, or another program such as a compiler)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}."
                                  f"{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x"):
            pass
        produce(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomic(path: str, write: Callable[[IO[str]], Any], fsync: bool = False) -> None:
    """Create `path` (or replace it) with what `write(handle)` writes to a text handle.

    `fsync`: flush the data to disk before the rename (for files that must survive a power
    loss together with what they describe, e.g. checkpoint checksums).
    """
    def produce(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())

    replace_atomic(path, produce)


def write_text_atomic(path: str, text: str, fsync: bool = False) -> None:
    """`text` to `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(text), fsync=fsync)


def write_json_atomic(path: str, data: Any, indent: int | None = None,
                      sort_keys: bool = True, newline: bool = False,
                      fsync: bool = False) -> None:
    """`data` as JSON to `path`, atomically (`write_atomic`); `newline` ends the file with one."""
    def dump(handle: IO[str]) -> None:
        json.dump(data, handle, indent=indent, sort_keys=sort_keys)
        if newline:
            handle.write("\n")

    write_atomic(path, dump, fsync=fsync)
