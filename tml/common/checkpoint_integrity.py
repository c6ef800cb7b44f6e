"""Checksums of a checkpoint's files: recorded at save, verified before anything is read.

Why: a checkpoint whose bytes changed (a bad disk, a copy cut short, an edited file) used
to load silently, or fail deep inside torch. Now every file of a checkpoint has its sha256
recorded in `checksums.json`, written into the temporary directory before the rename that
completes the checkpoint, so a complete checkpoint always has them:

1. Each rank, in its writer (`write_data`, which runs in the background thread of an
   asynchronous save), hashes the `.distcp` files it has just written and records them in
   `__<rank>_checksums.json` (written to a temporary name, then renamed).
2. Rank 0, after DCP's collective finish (every rank's files and `.metadata` written),
   merges those into `checksums.json` with the hashes of `.metadata` and `extra.json`,
   again via a temporary name, and only then renames the checkpoint into place.

Readers verify the files they read (`verify_file`): the whole file is hashed in blocks
(memory stays bounded), once per process while its size, mtime and inode are unchanged
(files modified in the last 2 s are hashed again each time: see `file_sha256`).
A mismatch raises CheckpointError naming the damaged file. Checkpoints written before
checksums existed have no `checksums.json`: they still load, with a warning, and only the
presence and size of their files can be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

from tml.common.atomic_file import write_json_atomic
from tml.common.safe_paths import is_inside
from tml.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "sha256"
_RANK_FILE = re.compile(r"^__\d+_checksums\.json$")
_BLOCK = 4 << 20
_RACY_NS = 2_000_000_000
# (realpath, inode, size, mtime_ns) -> sha256 of files hashed by this process.
_digests: dict[tuple[str, int, int, int], str] = {}
_warned_unverified: set[str] = set()


def file_sha256(path: str) -> str:
    """sha256 of the file at `path`, read in blocks (cached while the file is unchanged).

    The cache is keyed by (path, inode, size, mtime) and, as git does against "racily
    clean" files, only holds files last modified well before they were hashed: a change
    within the file system's timestamp granularity of the hashing could otherwise keep the
    same mtime and reuse a stale digest.
    """
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _digests:
        return _digests[key]
    started = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    if stat.st_mtime_ns < started - _RACY_NS:
        _digests[key] = digest.hexdigest()
    return digest.hexdigest()


def _write_json(path: str, data: Any) -> None:
    write_json_atomic(path, data, indent=1, newline=True, fsync=True)


def _entry(path: str) -> dict[str, Any]:
    return {"bytes": os.path.getsize(path), ALGORITHM: file_sha256(path)}


def record_rank_checksums(directory: str, prefix: str, names: Iterable[str]) -> None:
    """Record the checksums of the files `names` (written by one rank) in `directory`."""
    files = {name: _entry(os.path.join(directory, name)) for name in sorted(set(names))}
    _write_json(os.path.join(directory, f"{prefix}checksums.json"), {"files": files})


def finalize_checksums(directory: str, also: Iterable[str] = (".metadata",)) -> None:
    """Merge the ranks' records and add the files in `also` (rank 0, before the rename)."""
    files: dict[str, Any] = {}
    for name in sorted(os.listdir(directory)):
        if _RANK_FILE.match(name):
            with open(os.path.join(directory, name)) as handle:
                files.update(json.load(handle)["files"])
    for name in also:
        if os.path.isfile(os.path.join(directory, name)):
            files[name] = _entry(os.path.join(directory, name))
    _write_json(os.path.join(directory, CHECKSUMS_FILE), {"algorithm": ALGORITHM,
                                                          "files": files})
    for name in os.listdir(directory):
        if _RANK_FILE.match(name):
            os.remove(os.path.join(directory, name))


def read_checksums(checkpoint: str) -> dict[str, dict[str, Any]] | None:
    """File name -> {"bytes", "sha256"} of a checkpoint; None if it predates checksums."""
    path = os.path.join(checkpoint, CHECKSUMS_FILE)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {checkpoint}: {path} is damaged "
                              f"({type(error).__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("algorithm") != ALGORITHM or not all(
            isinstance(name, str) and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int) and isinstance(entry.get(ALGORITHM), str)
            for name, entry in files.items()):
        raise CheckpointError(f"checkpoint {checkpoint}: {path} is damaged (not a checksum "
                              "record)")
    return files


def warn_unverified(checkpoint: str) -> None:
    """Say once per process that an old checkpoint's files cannot be verified."""
    if checkpoint not in _warned_unverified:
        _warned_unverified.add(checkpoint)
        logger.warning("checkpoint %s has no %s (written before checksums were recorded): "
                       "its files cannot be verified", checkpoint, CHECKSUMS_FILE)


def verify_file(checkpoint: str, name: str, checksums: dict[str, dict[str, Any]] | None,
                min_bytes: int = 0) -> None:
    """Check the file `name` of `checkpoint` against its recorded checksum.

    Without checksums (an old checkpoint) only its presence and a size of at least
    `min_bytes` are checked. Raises CheckpointError naming the file.
    """
    path = os.path.join(checkpoint, name)
    if os.path.lexists(path) and not is_inside(checkpoint, path):
        raise CheckpointError(f"checkpoint {checkpoint}: {path} is a symbolic link to a file "
                              "outside the checkpoint")
    if checksums is not None and name not in checksums:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {path} has no recorded "
                              f"checksum in {CHECKSUMS_FILE}")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {path} is missing") \
            from None
    if checksums is None:
        if size < min_bytes:
            raise CheckpointError(f"checkpoint {checkpoint} is damaged: {path} is truncated "
                                  f"({size} bytes, at least {min_bytes} expected)")
        return
    expected = checksums[name]
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {path} has {size} bytes, "
                              f"{expected['bytes']} were saved")
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read {path} "
                              f"({error.strerror or error})") from None
    if digest != expected[ALGORITHM]:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {path} does not match the "
                              f"{ALGORITHM} recorded when it was saved")
