"""`tml.common.native`: a C source built once into a private cache and loaded with ctypes;
torch's path (None) whenever it cannot or must not be loaded."""

import logging
import os
import shutil

import pytest

from tests.conftest import require
from tml.common import native

SOURCE = "int tml_test_add(int a, int b) { return a + b + %d; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("TML_NATIVE_CACHE", str(directory))
    monkeypatch.delenv("TML_NATIVE", raising=False)
    return directory


def _source(tmp_path, name: str = "adder", extra: int = 0) -> str:
    path = tmp_path / f"{name}.c"
    path.write_text(SOURCE % extra)
    return str(path)


def test_a_source_is_built_once_into_the_private_cache_and_loaded(tmp_path, cache):
    require(native.compiler(), "a C compiler")
    library = native.load_library(_source(tmp_path))
    assert library.tml_test_add(2, 3) == 5
    assert native.load_library(str(tmp_path / "adder.c")) is library       # once per process
    built = os.listdir(cache)
    assert len(built) == 1 and built[0].startswith("adder-") and built[0].endswith(".so")
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    assert native.is_private(str(cache / built[0]))
    # Another process (here: a fresh load of the same file) finds it and does not rebuild.
    mtime = os.stat(cache / built[0]).st_mtime_ns
    native._loaded.clear()
    assert native.load_library(str(tmp_path / "adder.c")).tml_test_add(1, 1) == 2
    assert os.stat(cache / built[0]).st_mtime_ns == mtime
    # A changed source is another library; the old one is not loaded for it.
    native._loaded.clear()
    assert native.load_library(_source(tmp_path, extra=10)).tml_test_add(1, 1) == 12
    assert len(os.listdir(cache)) == 2


def test_off_or_without_a_compiler_or_when_the_build_fails_torch_s_path_is_kept(
        tmp_path, cache, monkeypatch, caplog):
    monkeypatch.setenv("TML_NATIVE", "0")
    assert native.load_library(_source(tmp_path, "off")) is None
    monkeypatch.setenv("TML_NATIVE", "1")

    empty = tmp_path / "empty_bin"
    empty.mkdir()
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setenv("PATH", str(empty))
        patch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert native.compiler() is None
        assert native.load_library(_source(tmp_path, "nocc")) is None
    assert "no C compiler" in caplog.text

    require(native.compiler(), "a C compiler")
    broken = tmp_path / "broken.c"
    broken.write_text("int tml_test_add(int a, int b) { return a + ; }\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert native.load_library(str(broken)) is None
    assert "broken.c" in caplog.text and "exited" in caplog.text
    assert os.listdir(cache) == []                 # no temporary left behind


def test_a_cache_others_can_write_is_not_used(tmp_path, cache, caplog):
    require(native.compiler(), "a C compiler")
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o777)                      # another user could plant a library here
    with caplog.at_level(logging.WARNING):
        library = native.load_library(_source(tmp_path, "shared"))
    assert library.tml_test_add(1, 2) == 3      # built for this process only
    assert os.listdir(cache) == []
    assert "not private" in caplog.text


def test_a_planted_library_is_refused(tmp_path, cache, caplog):
    require(native.compiler(), "a C compiler")
    source = _source(tmp_path, "planted")
    assert native.load_library(source) is not None
    (built,) = os.listdir(cache)
    native._loaded.clear()
    # Replaced by a symlink to a library someone else wrote: not loaded.
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(cache / built, elsewhere)
    os.unlink(cache / built)
    os.symlink(elsewhere, cache / built)
    with caplog.at_level(logging.WARNING):
        assert native.load_library(source) is None
    assert "refusing to load" in caplog.text
    # Writable by the group: not loaded either.
    os.unlink(cache / built)
    shutil.copy(elsewhere, cache / built)
    os.chmod(cache / built, 0o775)
    native._loaded.clear()
    assert native.load_library(source) is None


def test_the_key_follows_the_source_flags_and_cpu(monkeypatch):
    require(native.compiler(), "a C compiler")
    cc = native.compiler()
    key = native.library_key(b"int x;", cc)
    assert key == native.library_key(b"int x;", cc)
    assert key != native.library_key(b"int y;", cc)
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DX"))
    assert key != native.library_key(b"int x;", cc)
    monkeypatch.setattr(native, "FLAGS", native.FLAGS[:-1])
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
    assert key != native.library_key(b"int x;", cc)

