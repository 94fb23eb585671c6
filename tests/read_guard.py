"""A guard that the test session reads nothing beside the checkout (a user's clone has nothing there).

An audit hook (PEP 578) sees every `open()` of the process; a path under the checkout's parent
folder but outside the checkout (a data folder beside it, a sibling clone) is refused with PermissionError and
recorded, and conftest fails the session when anything was recorded, even if the caller swallowed
the error. Hidden siblings (`~/.cache` when the clone sits in the home folder) and pytest's own
temporary folders stay allowed: they are the cache and scratch space, not project input.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def forbidden_siblings(repository: Path = REPOSITORY) -> frozenset[Path]:
    """The folders beside the checkout that a test must not read (as they are when the session starts)."""
    parent = repository.parent
    temp = Path(tempfile.gettempdir()).resolve()
    out = set()
    for entry in parent.iterdir():
        name = entry.name
        if entry.resolve() == repository or name.startswith(".") or name.startswith("pytest-of-"):
            continue
        if entry.resolve() == temp or temp.is_relative_to(entry.resolve()):
            continue
        out.add(entry.resolve())
    return frozenset(out)


def reads_outside(path: str | bytes | os.PathLike, forbidden: frozenset[Path]) -> bool:
    """True when `path` lies in one of the `forbidden` folders (symlinks resolved)."""
    try:
        resolved = Path(os.fsdecode(path)).resolve()
    except (OSError, ValueError, TypeError):
        return False
    return any(resolved == f or resolved.is_relative_to(f) for f in forbidden)


class ReadGuard:
    """Installs the audit hook once; `violations` lists the refused paths."""

    def __init__(self, forbidden: frozenset[Path]) -> None:
        self.forbidden = forbidden
        self.violations: list[str] = []

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event != "open" or not self.forbidden or isinstance(args[0], int) or args[0] is None:
            return
        if reads_outside(args[0], self.forbidden):
            path = os.fsdecode(args[0])
            self.violations.append(path)
            raise PermissionError(f"tests read {path}, outside the checkout {REPOSITORY}: "
                                  "a fresh clone has nothing there; carry the file in the project")
