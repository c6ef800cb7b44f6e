"""Helpers for the fuzz tests of readers of user files.

A fuzz test starts from a valid file, applies random byte-level mutations (hypothesis
chooses them and shrinks a failure to a small one) and requires that the reader either
succeeds or raises a `TmlError` with a message of one line: the same thing the entry
points turn into `error: <line>` and exit 2. Anything else (another exception, a
multi-line message, a hang) fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tml.errors import TmlError

# Bounded: a fuzz test must stay well under a minute in CI on 2 cores.
FUZZ_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])

_SPECIAL = [b"\x00", b"\n", b"\r", b"\t", b",", b"\"", b"'", b":", b"/", b"..", b"\xff\xfe",
            b"\xc3", b"nan", b"-1", b"inf", b"1e309", b"${X}", b"#", b"!!python/object", b"x" * 5000]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` after 1-4 random edits: flip, insert, delete, duplicate or truncate."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            piece = draw(st.one_of(st.sampled_from(_SPECIAL), st.binary(min_size=1, max_size=8)))
            out[pos:pos] = piece
        elif kind == "delete" and out:
            out[pos:pos + draw(st.integers(1, 16))] = b""
        elif kind == "dup" and out:
            out[pos:pos] = out[pos:pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def outcome(call: Callable[[], Any]) -> str:
    """Run `call`; return "ok" or "error". Fails the test on anything but a one-line TmlError."""
    try:
        call()
    except TmlError as error:
        message = str(error)
        assert message and "\n" not in message, f"error message is not one line: {message!r}"
        return "error"
    return "ok"


def files_under(root: str | os.PathLike) -> set[str]:
    """Every file and directory below `root`, as paths relative to it."""
    found = set()
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(base, name), root))
    return found
