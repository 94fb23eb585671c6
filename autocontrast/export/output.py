"""The output directory of an export: checked before any work, built beside it, renamed into place.

An export writes into `.NAME.partial-HOST-PID-XXXXXXXX` next to `NAME` and renames it into place
only when validated; a replaced bundle first moves to `.NAME.old-HOST-PID-XXXXXXXX`. The host and
process id in the name let a later export to the same output remove what a killed export (SIGKILL,
a power cut) left, and only that: a directory whose process still runs, or that another host
made, is left alone. Ctrl-C, SIGTERM and SIGHUP (what `timeout`, `docker stop`, systemd and a
closed terminal send) remove the partial directory first; then Ctrl-C raises `KeyboardInterrupt`
and the others end the process by that signal.

`--force` replaces only a bundle of this format (`autocontrast.bundle.is_bundle`); anything else at
the output path is refused and left untouched.

>>> output = check_output("bundles/smollm2-acd", force=False)  # doctest: +SKIP
>>> remove_stale_work(output, log=print)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from autocontrast.bundle import MANIFEST_FILE, is_bundle
from autocontrast.errors import ExportError

PARTIAL, OLD = "partial", "old"
# Signals whose default action would end the export with its temporary directory left behind.
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

_ours: set[Path] = set()  # work directories of exports running in this process


def check_output(output: str | os.PathLike, *, force: bool) -> Path:
    """The output path, checked before any work: named, not taken (unless a bundle and `force`), writable.

    Raises `ExportError` saying what to do; the path is never touched.
    """
    text = os.fspath(output)
    path = Path(text)
    if not text.strip() or path.name in ("", ".", ".."):
        raise ExportError(f"OUTPUT {text!r} does not name a directory to create; give a new directory "
                          "name such as smollm2-acd")
    if os.path.lexists(path):
        if not force:
            raise ExportError(f"{path} already exists; pass --force (force=True) to replace it")
        if path.is_symlink() or not is_bundle(path):
            raise ExportError(f"{path} is not an autocontrast bundle (no {MANIFEST_FILE} of this format), so "
                              "--force does not replace it and left it untouched; choose another OUTPUT, "
                              "or move or remove it yourself")
    _check_writable(path.absolute().parent)
    return path


def _check_writable(parent: Path) -> None:
    existing = parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"{existing} is a file, not a directory, so no bundle can be made under it; "
                          "choose an OUTPUT inside a directory")
    try:  # a real attempt: permissions, read-only filesystems, ACLs and root all answer truthfully
        Path(tempfile.mkdtemp(prefix=".acd-export-write-test-", dir=existing)).rmdir()
    except OSError as err:
        raise ExportError(f"cannot write in {existing} ({err.strerror}); choose an OUTPUT in a directory "
                          "you can write to") from None


def missing_parents(path: Path) -> list[Path]:
    """Ancestors of `path` that do not exist yet, nearest first (an export removes them if it fails)."""
    missing, parent = [], path.parent.absolute()
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _prefix(output: Path, kind: str) -> str:
    return f".{output.name}.{kind}-{_host()}-{os.getpid()}-"


def make_work_dir(output: Path) -> Path:
    """A new empty `.NAME.partial-HOST-PID-XXXXXXXX` beside `output` (its parent must exist)."""
    work = Path(tempfile.mkdtemp(prefix=_prefix(output, PARTIAL), dir=output.parent))
    _ours.add(work.absolute())
    return work


def discard_work_dir(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    _ours.discard(work.absolute())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_work(output: Path, *, log: Callable[[str], None]) -> None:
    """Remove the temporary directories that killed exports to `output` left beside it, one line each.

    Only directories this host made, whose process is gone (or is this process but not one of its
    running exports), are removed; another host's are named and left alone.
    """
    parent = output.absolute().parent
    if not parent.is_dir():
        return
    name = re.escape(output.name)
    pattern = re.compile(rf"^\.{name}\.({PARTIAL}|{OLD})-(.+)-(\d+)-[^-]+$")
    unowned = re.compile(rf"^\.{name}\.({PARTIAL}|{OLD})-[a-z0-9_]{{8}}$")  # acd-export before host-pid names
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if not entry.is_dir() or entry.is_symlink():
            continue
        if not match:
            if unowned.match(entry.name):
                log(f"left {entry} alone: an older acd-export made it and did not record its process "
                    "(remove it yourself if no export to this output is running)")
            continue
        host, pid = match.group(2), int(match.group(3))
        if host != _host():
            log(f"left {entry} alone: an export on host {host} made it (remove it yourself if it is stale)")
            continue
        running = entry.absolute() in _ours if pid == os.getpid() else _alive(pid)
        if running:
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        log(f"removed {entry}: left by an interrupted export (process {pid}, no longer running), {size / 1e6:.1f} MB")


def replace_output(work: Path, output: Path, *, force: bool) -> None:
    """Rename the finished `work` directory to `output`, moving a bundle that is there aside first."""
    if os.path.lexists(output):
        if not force:  # appeared while we exported (a concurrent export)
            raise ExportError(f"{output} appeared during the export; pass --force to replace it")
        if output.is_symlink() or not is_bundle(output):
            raise ExportError(f"{output} changed during the export and is not an autocontrast bundle, so it "
                              "was left untouched and the export discarded; choose another OUTPUT")
        old = Path(tempfile.mkdtemp(prefix=_prefix(output, OLD), dir=output.parent))
        output.rename(old / "bundle")
        try:
            work.rename(output)
        except OSError:
            (old / "bundle").rename(output)  # put the old bundle back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(output)
    _ours.discard(work.absolute())


class TerminationGuard:
    """Within: SIGINT, SIGTERM and SIGHUP first call `on_signal(signum)` (remove the partial export),
    then end as they would have: SIGINT raises `KeyboardInterrupt`, the others end the process by
    that signal (its default action, minus the leftovers).

    The cleanup runs inside the handler, before any exception unwinds the export: an exception
    raised at an arbitrary bytecode can land inside a C extension's import or callback and crash
    the interpreter (seen: a SIGSEGV when one hit onnx's import during the build), and then no
    `except` clause would run. `hold()` defers the signals across a step that must not stop
    halfway (the renames into place). Only signals at their default action are taken, and only in
    the main thread: an application's own handlers are its own.

    >>> with TerminationGuard(lambda signum: shutil.rmtree(work)) as guard:  # doctest: +SKIP
    ...     build(work)
    ...     with guard.hold():
    ...         work.rename(output)
    """

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.on_signal = on_signal
        self.taken: dict[int, Any] = {}  # signal -> the handler to restore
        self.held = False
        self.pending: int | None = None

    def __enter__(self) -> TerminationGuard:
        if threading.current_thread() is threading.main_thread():
            defaults = {s: signal.SIG_DFL for s in CLEANUP_SIGNALS}
            defaults[signal.SIGINT] = signal.default_int_handler
            self.taken = {s: d for s, d in defaults.items() if signal.getsignal(s) is d}
        for s in self.taken:
            signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.held = True
        try:
            yield
        finally:
            self.held = False
            if self.pending is not None:
                self._end(self.pending)

    def _restore(self) -> None:
        for s, default in self.taken.items():
            signal.signal(s, default)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.held:
            self.pending = signum
        else:
            self._end(signum)

    def _end(self, signum: int) -> None:
        for s in self.taken:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        try:
            self.on_signal(signum)
        finally:
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # the default action: end as killed by this signal
