"""Names and paths that come from data or from other people's files.

One rule decides whether a string taken from a file (an entity type in triples, a table
name, a workflow's artifact) may become part of a path; docs/security.md documents it.

- `check_name`: a *name* becomes one path component. It must match `NAME_PATTERN`
  (an ASCII letter or underscore, then letters, digits, `_` or `-`, at most 64 in all),
  so it can never be `..`, absolute, hidden, hold a separator or a control character,
  and it also works as a TorchRec table or feature name. Callers pass the names their
  own directory layout reserves (an importer's `relations`, say).
- `confine`: a *relative path* (a workflow artifact such as `model/ckpt`) is joined to a
  root only when it is relative, has no `..` component, and still lies inside the root
  once symbolic links are resolved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from tml.errors import TmlError

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: str, what: str, reserved: Iterable[str] = (),
               error: type[TmlError] = TmlError) -> str:
    """Return `name` if it may be used as one path component, else raise `error`.

    `what` says where the name came from ("file t.tsv line 3: entity type"), and is the
    start of the one-line message.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise error(f"{what} {name!r} is not a valid name: use 1-64 ASCII letters, digits, "
                    "'_' or '-', starting with a letter or '_'")
    lowered = {r.lower() for r in reserved}
    if name.lower() in lowered:
        raise error(f"{what} {name!r} is reserved (reserved names: "
                    f"{', '.join(sorted(lowered))})")
    return name


def is_inside(root: str, path: str) -> bool:
    """True if `path` is `root` or below it, after resolving symbolic links of both."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def check_relative(relative: str, what: str, root: str, error: type[TmlError] = TmlError) -> str:
    """The syntax half of `confine`, for paths whose root is not known yet (a workflow's
    artifacts before its run): non-empty, relative, no `..`, no control characters.

    `root` only names the root in the message ("working_dir").
    """
    if not isinstance(relative, str) or not relative.strip():
        raise error(f"{what}: an empty path is not allowed")
    if _CONTROL.search(relative):
        raise error(f"{what} {relative!r}: control characters are not allowed in a path")
    if os.path.isabs(relative) or relative.startswith("~"):
        raise error(f"{what} {relative!r}: must be a path relative to {root}")
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise error(f"{what} {relative!r}: '..' is not allowed; the path must stay inside "
                    f"{root}")
    return relative


def confine(root: str, relative: str, what: str, error: type[TmlError] = TmlError) -> str:
    """`root/relative`, refusing absolute paths, `..`, control characters and symlink escapes."""
    check_relative(relative, what, root, error)
    path = os.path.join(root, relative)
    if not is_inside(root, path):
        raise error(f"{what} {relative!r}: resolves outside {root} (through a symbolic link)")
    return path
