"""A worker's error file for torch elastic, written so that the agent never reads half of it.

torch elastic hands each worker a path in `TORCHELASTIC_ERROR_FILE`; when a worker fails, the
agent reads it as JSON to name the cause. torch's own `ErrorHandler.record_exception` (2.13)
opens the file for writing and then dumps the JSON into it. When one worker dies, the agent
stops the others with SIGTERM, and a surviving worker is often just then recording its "lost
the connection" error: a SIGTERM between the open and the dump leaves an empty file, and the
agent dies on `JSONDecodeError` in `ProcessFailure.__post_init__` instead of restarting the
group (seen in CI under load: `max_restarts` did not survive a killed worker).

Here the JSON goes to a temporary file beside it that is renamed into place, so the path holds
either nothing (the agent reports the worker's exit signal) or the whole record, in the format
torch's handler writes and its agent parses.
"""

from __future__ import annotations

import os
import time
import traceback

from tml.common.atomic_file import write_json_atomic

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def error_record(error: BaseException) -> dict:
    """The JSON torch elastic's error handler writes for `error` (its agent's format)."""
    return {"message": {"message": f"{type(error).__name__}: {error}",
                        "extraInfo": {"py_callstack": traceback.format_exc(),
                                      "timestamp": str(int(time.time()))}}}


def record_error(error: BaseException) -> None:
    """Write `error` to this worker's error file, atomically; nothing if it has none."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    write_json_atomic(path, error_record(error), sort_keys=False)
