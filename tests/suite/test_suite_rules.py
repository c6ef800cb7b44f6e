"""The suite's own rules (tests/conftest.py): CPU workers on any host, and prerequisites
that skip locally but fail under CI, so a feature cannot go silently untested there."""

from __future__ import annotations

import os

import pytest

from tests.conftest import in_ci, require
from tests.twhin_setup import launcher_env


def test_workers_are_cpu_workers_on_any_host() -> None:
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert launcher_env()["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_a_missing_prerequisite_skips_outside_ci(monkeypatch: pytest.MonkeyPatch,
                                                  value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="no slurmctld"):
        require(False, "no slurmctld")
    require(True, "present")  # nothing happens


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_a_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch,
                                               value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception,
                       match=r"prerequisite missing under CI \(CI=true must not skip\): no bazel"):
        require(None, "no bazel")
    require("yes", "present")
