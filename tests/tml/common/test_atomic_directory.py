"""`atomic_directory`: whole or nothing, the user's permissions, one-line errors."""

import os

import pytest

from tml.common.atomic_directory import atomic_directory, current_umask, refuse_non_empty
from tml.errors import DataError, TmlError


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_the_directory_gets_0777_less_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_directory(str(tmp_path / "out")) as tmp:
            assert os.stat(tmp).st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == mode


def test_a_failure_inside_leaves_the_previous_output_and_no_temporary(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("half")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(tmp_path / "out") == ["old.txt"]


def test_a_parent_that_is_a_file_is_one_line_of_the_callers_error(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "a" / "out"
    with pytest.raises(DataError) as error:
        with atomic_directory(str(out), DataError):
            pass
    assert str(error.value) == f"cannot write {out}: Not a directory"
    assert os.listdir(tmp_path) == ["file"]
    with pytest.raises(TmlError, match="Not a directory"):   # the default error class
        with atomic_directory(str(out)):
            pass


def test_refuse_non_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse_non_empty(str(tmp_path / "empty"), False)
    refuse_non_empty(str(tmp_path / "missing"), False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="exists and is not empty; pass --force"):
        refuse_non_empty(str(tmp_path / "f"), False, DataError)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(TmlError, match="exists and is not empty"):
        refuse_non_empty(str(tmp_path / "dangling"), False)
    refuse_non_empty(str(tmp_path / "f"), True)
