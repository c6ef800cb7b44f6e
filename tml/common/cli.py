"""Entry-point helpers: user errors as one line and a non-zero exit, not a traceback;
an argument parser that refuses unknown flags."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tml.errors import ConfigError, TmlError

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


class StrictArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose mistakes are one-line `ConfigError`s.

    An unknown flag is refused, naming it and the closest known flag (`--save-dir` ->
    `--save_dir`), instead of being ignored: an ignored `--save-dir=X` used to train into
    the default save_dir. Abbreviations are off (`--save` is unknown, not `--save_dir`).
    Subparsers made by `add_subparsers().add_parser` are strict too. `--help` still prints
    the usage and exits 0.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            parsed, unknown = self.parse_known_args(argv, namespace)
        except ConfigError:
            # A misspelt flag often also leaves a required one missing: name the cause.
            message = self._unknown_flag(argv)
            if message is None:
                raise
            raise ConfigError(message) from None
        if unknown:
            raise ConfigError(self._unknown_flag(argv) or unknown_flag_message(
                unknown[0], self._flags(argv)))
        return parsed

    def _flags(self, argv: Sequence[str]) -> list[str]:
        """The flags of this parser and of the subcommand named in `argv`."""
        flags = [s for a in self._actions for s in a.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((a for a in argv if a in action.choices), None)
                if chosen is not None:
                    sub = action.choices[chosen]
                    flags += [s for a in sub._actions for s in a.option_strings]
        return flags

    def _unknown_flag(self, argv: Sequence[str]) -> str | None:
        flags = self._flags(argv)
        for arg in argv:
            if arg == "--":
                break
            if arg.startswith("-") and not _is_number(arg) and arg.split("=", 1)[0] not in flags:
                return unknown_flag_message(arg, flags)
        return None

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def split_dotted_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without them, overrides): torchtitan-style `--a.b=c` or `--a.b c` flags.

    A flag whose name holds a dot names a config key; it becomes the override `a.b=c`
    (the same as `--set a.b=c`), validated with the config like the YAML. Arguments after
    `--` are left alone.
    """
    rest: list[str] = []
    overrides: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            rest += argv[index:]
            break
        key, sep, value = arg[2:].partition("=")
        if arg.startswith("--") and "." in key:
            if not sep:
                if index + 1 >= len(argv):
                    raise ConfigError(f"{arg}: expected a value ({arg}=VALUE)")
                index += 1
                value = argv[index]
            overrides.append(f"{key}={value}")
        else:
            rest.append(arg)
        index += 1
    return rest, overrides


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unknown_flag_message(arg: str, known: Sequence[str]) -> str:
    """`unknown flag --save-dir (did you mean --save_dir?)`; `arg` may carry `=value`."""
    flag = arg.split("=", 1)[0]
    if not flag.startswith("-"):
        return f"unexpected argument {arg!r}"
    normal = {k.replace("-", "_").lower(): k for k in known}
    key = flag.lstrip("-").replace("-", "_").lower()
    match = normal.get("--" + key) or normal.get("-" + key)
    if match is None:
        close = difflib.get_close_matches(flag, list(known), n=1, cutoff=0.6)
        match = close[0] if close else None
    hint = f" (did you mean {match}?)" if match else ""
    return f"unknown flag {flag}{hint}"
