"""User-facing errors.

Anything a user can fix (a config field, a data file, a launch option) raises a `TmlError`
subclass with one line that names the field, file or row. Entry points print that line and
exit non-zero (`tml.common.cli.run_cli`); the traceback is shown only with `TML_DEBUG=1`.
"""


class TmlError(Exception):
    """Base class of errors whose message is meant for the user, not the developer."""


class ConfigError(TmlError):
    """A configuration file is missing, unreadable or invalid."""


class DataError(TmlError):
    """An input data file is missing, malformed or holds out-of-range ids."""


class CheckpointError(TmlError):
    """A checkpoint cannot be written or read."""


class TrainingFailedError(TmlError):
    """A worker process of a distributed run failed.

    Attributes:
      rank: global rank of the first worker that failed (None if unknown).
      exitcode: its exit code.
      worker_message: the worker's own error message, as recorded by the worker.
    """

    def __init__(self, message: str, rank: int | None = None, exitcode: int | None = None,
                 worker_message: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.worker_message = worker_message


def error_line(error: BaseException, limit: int = 300) -> str:
    """An exception's text as one line of at most `limit` characters.

    For wrapping a library's error (pyarrow's messages can run over several lines) into a
    user error, which is printed as one line.
    """
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
