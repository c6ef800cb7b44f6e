"""Entry-point helper: user errors as one line and a non-zero exit, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tml.errors import TmlError

logger = logging.getLogger(__name__)

USER_ERROR_EXIT_CODE = 2


def run_cli(main: Callable[[], Any]) -> None:
    """Run `main()`; on a `TmlError` print `error: <message>` and exit 2.

    Set `TML_DEBUG=1` to get the traceback instead.
    """
    try:
        main()
    except TmlError as error:
        if os.environ.get("TML_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
