"""Shared behaviour of every `acd-*` command: `--version`, and a user's mistake prints its message, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from autocontrast import __version__
from autocontrast.errors import AutocontrastError

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, as `yes | head` reports a reader that left


def command_parser(*, prog: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` for an `acd-*` command, with `--version` (`prog 0.1.0`)."""
    parser = argparse.ArgumentParser(prog=prog, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; an `AutocontrastError` becomes `error: <message>` and exit code 2.

    Ctrl-C prints one line and exits 130; a reader that closes the pipe (`| head`) ends the
    command quietly with 141, as other Unix tools do.
    """
    try:
        code = main(argv)
    except AutocontrastError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # nobody reads stdout any more: point it at /dev/null so the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    return int(code or 0)
