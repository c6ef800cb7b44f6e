"""tml.common.allocator: per-step buffers are reused from the heap, not fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from tml.common import allocator
    if sys.argv[1] == "tuned":
        assert allocator.tune_malloc_for_training()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():   # a step's buffers: allocated, written, all freed at the end of the step
        buffers = [np.empty(size << 20, np.uint8) for size in (40, 4)]
        for b in buffers:
            b.fill(1)
    for _ in range(3):                      # warm up: the heap grows once
        step()
    before = faults()
    for _ in range(50):
        step()
    print(faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_reuses_step_buffers_instead_of_faulting_fresh_pages() -> None:
    def faults(mode: str) -> int:
        # numpy asks for transparent huge pages on large arrays: a fresh 40 MiB mapping then
        # faults 20 times or 10240 times depending on how many free huge pages the host has
        # at that moment (seen: 1050 and 26600 faults for the same 50 steps). Off, the count
        # is in 4 KiB pages whatever the host's memory looks like.
        env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0")
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], check=True, env=env,
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    # default: glibc maps the 40 MiB buffer afresh and unmaps it at free, every step
    assert default > 5000, default
    assert tuned < default / 10, (tuned, default)   # tuned: the same heap pages every time


def test_tuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from tml.common import allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("TML_MALLOC_TUNING", "0")
    assert allocator.tune_malloc_for_training() is False
