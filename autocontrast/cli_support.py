"""Shared behaviour of every `acd-*` command: a user's mistake prints its message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from autocontrast.errors import AutocontrastError

USAGE_ERROR = 2


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; an `AutocontrastError` becomes `error: <message>` and exit code 2."""
    try:
        code = main(argv)
    except AutocontrastError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
