"""The one rule for names and paths taken from data (tml/common/safe_paths.py)."""

import os

import pytest

from tml.common.safe_paths import check_name, confine, is_inside
from tml.errors import TmlError


@pytest.mark.parametrize("name", ["user", "tweet", "_x", "a-b_c9", "A" * 64])
def test_valid_names_pass(name):
    assert check_name(name, "entity type") == name


@pytest.mark.parametrize("name", ["", "..", ".", "../x", "/abs", "a/b", "a\\b", "a b", "a\nb",
                                  "9lives", "-x", "é", "a" * 65, ".hidden", "a:b", "a\x00"])
def test_invalid_names_fail_with_one_line(name):
    with pytest.raises(TmlError) as info:
        check_name(name, "file t.tsv line 3: entity type")
    assert "\n" not in str(info.value) and "line 3" in str(info.value)


def test_reserved_names_are_refused_whatever_the_case():
    with pytest.raises(TmlError, match="reserved"):
        check_name("Relations", "entity type", reserved=["relations"])


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "~/x", "", "a\nb", "..\\x"])
def test_confine_refuses_escapes(tmp_path, rel):
    with pytest.raises(TmlError):
        confine(str(tmp_path), rel, "artifact")


def test_confine_refuses_a_symlink_out_and_accepts_a_nested_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(TmlError, match="symbolic link"):
        confine(str(root), "link/x", "artifact")
    assert confine(str(root), "model/ckpt", "artifact") == os.path.join(root, "model/ckpt")
    assert is_inside(str(root), str(root)) and not is_inside(str(root), str(tmp_path))
