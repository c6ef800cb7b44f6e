"""The files a data path names: a glob, a directory (its *.parquet) or one file, on any
fsspec filesystem. Shared by every project's reader; each words its own "no files" error."""

from __future__ import annotations

import fsspec

GLOB_CHARS = ("*", "?", "[")


def resolve_parquet_files(root: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and the sorted files `root` names (empty when it names none)."""
    fs, path = fsspec.core.url_to_fs(root)
    if any(char in path for char in GLOB_CHARS):
        found = fs.glob(path, detail=True)
        paths = [name for name, info in found.items() if info.get("type") == "file"]
    elif fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.parquet", detail=True)
        paths = [name for name, info in found.items() if info.get("type") == "file"]
    elif fs.isfile(path):
        paths = [path]
    else:
        paths = []
    return fs, sorted(paths)
