"""Compile a small C source shipped with the code into a shared library, once per machine,
and load it with ctypes.

Why: a few hot loops (a project's fused scores, say) are a hundred small torch ops a step in
eager mode and one pass in C. Plain C with no Python or torch headers compiles in well under
a second with the system's compiler, so there is no build step to install: the first process
that needs a library builds it into a cache and later ones load it. Without a compiler, with
`TML_NATIVE=0`, or when the build fails, `load_library` returns None and the caller keeps its
torch path (one warning says why, unless the kernels were turned off on purpose).

The cache (`TML_NATIVE_CACHE`, else `$XDG_CACHE_HOME/tml/native`, else `~/.cache/tml/native`)
holds libraries named by a hash of everything that decides their bytes: the source, the
compiler and its version, the flags, and this CPU's model and feature flags (the build uses
`-march=native`, so a home directory shared by different hosts keeps one library per CPU).
A shared library runs code when loaded, so the cache is trusted only when it is ours: the
directory and the library must belong to this user and be writable by no one else;
otherwise the library is built into a private temporary directory for this process instead.
Builds write a unique temporary file and rename it into place, so concurrent workers never
load half a library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading

from tml.common.atomic_file import replace_atomic
from tml.ml_logging import get_logger

logger = get_logger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11",
         "-fno-math-errno")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False when `TML_NATIVE` is `0` (or `false`/`no`/`off`): callers keep their torch path."""
    return os.environ.get("TML_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler: `$CC`, else `cc` or `gcc` on PATH; None if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def cache_dir() -> str:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("TML_NATIVE_CACHE"):
        return os.environ["TML_NATIVE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tml", "native")


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """This CPU's model name and feature flags (what `-march=native` compiles for)."""
    fields = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in fields:
                    fields.append(line)
                if not line.strip() and fields:
                    break                     # the first processor's entry is enough
    except OSError:
        pass
    return platform.machine() + "".join(fields)


@functools.lru_cache(maxsize=8)
def _compiler_version(cc: str) -> bytes:
    """`cc --version`, asked once per process and compiler (a subprocess: ~5 ms)."""
    return subprocess.run([cc, "--version"], capture_output=True, check=False,
                          timeout=60).stdout


def library_key(source: bytes, cc: str) -> str:
    """A hash of what decides the library's bytes: source, compiler, its version, flags, CPU."""
    version = _compiler_version(cc)
    digest = hashlib.sha256()
    for part in (source, os.path.realpath(cc).encode(), version, " ".join(FLAGS).encode(),
                 _cpu_identity().encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:24]


def is_private(path: str) -> bool:
    """True if `path` (not followed if a symlink) belongs to this user and is writable by
    no one else: the condition for loading code from it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _private_cache() -> str | None:
    """The cache directory, created 0700 if missing; None if it is not ours alone."""
    directory = cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return directory if is_private(directory) else None


def _build(cc: str, source_path: str, out_path: str) -> None:
    """Compile `source_path` to `out_path` through a unique temporary name and a rename."""
    def compile_to(tmp: str) -> None:
        result = subprocess.run([cc, *FLAGS, "-o", tmp, source_path], capture_output=True,
                                text=True, check=False, timeout=300)
        if result.returncode:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            raise RuntimeError(f"{os.path.basename(cc)} exited {result.returncode} on "
                               f"{source_path}: {lines[0]}")
        os.chmod(tmp, 0o700)

    replace_atomic(out_path, compile_to)


def _load(source_path: str) -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler (set CC, or install gcc): %s runs on torch ops instead",
                       os.path.basename(source_path))
        return None
    with open(source_path, "rb") as handle:
        source = handle.read()
    name = f"{os.path.splitext(os.path.basename(source_path))[0]}-{library_key(source, cc)}.so"
    directory = _private_cache()
    if directory is None:
        logger.warning("native cache %s is missing, unwritable or not private to this user: "
                       "building %s for this process only", cache_dir(), name)
        directory = tempfile.mkdtemp(prefix="tml-native-")
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        _build(cc, source_path, path)
    if not is_private(path):
        raise RuntimeError(f"{path} is not owned by this user alone (or is a symlink); "
                           "refusing to load it: remove it to rebuild")
    return ctypes.CDLL(path)


def load_library(source_path: str) -> ctypes.CDLL | None:
    """The shared library built from the C file `source_path` (an absolute path), loaded
    once per process; None when native kernels are off (`TML_NATIVE=0`) or cannot be built
    here (a warning says why)."""
    if not os.path.isabs(source_path):
        raise ValueError(f"load_library needs an absolute path, not {source_path!r}")
    if not enabled():
        return None
    if source_path in _loaded:              # the per-call path: kernels ask every step
        return _loaded[source_path]
    with _lock:
        if source_path not in _loaded:
            try:
                _loaded[source_path] = _load(source_path)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                logger.warning("could not build or load %s (%s): using torch ops instead",
                               os.path.basename(source_path), error)
                _loaded[source_path] = None
        return _loaded[source_path]


def load_functions(source_path: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """`load_library(source_path)` with each named function's ctypes argument types set,
    once per process; every exported function returns an `int64_t` (a count, or 0 / an
    error code). None as `load_library`."""
    library = load_library(source_path)
    if library is not None and not getattr(library, "tml_typed", False):
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int64
        library.tml_typed = True
    return library
