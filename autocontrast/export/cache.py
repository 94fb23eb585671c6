"""Exports cached on disk, keyed by the code and options that produce them (tests, benchmarks).

`cached_bundle` returns `<cache>/exports/<key>` and exports there only when it is missing; the key
hashes the exporter's and models' sources, the bundle format module, the options and the model's
identity, so any change to any of them makes a fresh export.

Several processes (two checkouts, two test runs) may share one cache. Each process holds a shared
lock on every bundle it was handed until it exits, and stamps the bundle's last use; exports of the
same model made by other code are pruned only when unused for `PRUNE_AFTER_S` (a day), under the
cache's prune lock, and never while any process holds them.

>>> from autocontrast.export.cache import cached_bundle
>>> path = cached_bundle(smollm2_path(), ExportOptions(exits=(30, 15)), identity="smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from autocontrast.bundle import MANIFEST_FILE
from autocontrast.errors import ExportError
from autocontrast.export.exporter import ExportOptions, export_bundle

_PACKAGE = Path(__file__).resolve().parents[1]
# everything that shapes a bundle or its validation report (validation runs the runtime's decode loop)
SOURCES = ("export/*.py", "bundle.py", "config.py", "models/contrast.py", "models/multi_exit.py",
           "models/families.py", "models/auto.py", "runtime/decode_state.py", "runtime/session.py",
           "runtime/kv_cache.py", "runtime/kv_buffer.py", "runtime/inplace_state.py", "runtime/encoder*.py")


def source_hash() -> str:
    digest = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def bundle_key(options: ExportOptions, identity: str) -> str:
    """The cache key of an export: code, options and model identity."""
    text = f"{source_hash()}|{options!r}|{identity}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def exports_dir() -> Path:
    from autocontrast.models.smollm2 import cache_dir

    return cache_dir() / "exports"


def cached_bundle(model: str | Path | Callable[[], Path], options: ExportOptions, *, identity: str | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """The bundle of `model` exported with `options`, exporting it only if the cache lacks it.

    `identity` names the model in the key (default: its path); pass a stable name when the path
    is temporary (a test's tiny checkpoint) and what the path holds is fixed by that name.
    `model` may be a function returning the path, called only when an export is needed.
    """
    if callable(model) and identity is None:
        raise ValueError("a model given as a function needs an identity")
    slug = (identity or str(model)).replace("/", "_").replace(":", "_").strip("._")[:40]
    code = source_hash()[:8]
    target = exports_dir() / f"{slug}-{code}-{bundle_key(options, identity or str(model))}"
    hold(target)  # before looking: a prune cannot take it between the look and the use
    if (target / MANIFEST_FILE).is_file():
        return target
    prune(slug, code)
    if callable(model):
        model = model()
    try:
        export_bundle(model, target, options=options, log=log or (lambda m: print(m, file=sys.stderr)))
    except (OSError, ExportError):
        if not (target / MANIFEST_FILE).is_file():  # not a concurrent export that won the race
            raise
    return target


PRUNE_AFTER_S = 24 * 3600  # an export of other code unused this long is stale
_HELD: dict[Path, int] = {}  # bundle -> descriptor of its lock file, shared-locked until this process exits


def _lock_file(entry: Path) -> Path:
    return entry.parent / ".locks" / f"{entry.name}.lock"


def hold(entry: Path) -> None:
    """Take a shared lock on `entry` for this process's lifetime and stamp its last use (the lock file's mtime)."""
    lock = _lock_file(entry)
    if entry not in _HELD:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a prune is deleting this very entry
        _HELD[entry] = fd
    os.utime(lock)


def last_used(entry: Path) -> float:
    """When `entry` was last handed to a process (or made), as a time stamp."""
    lock = _lock_file(entry)
    return max(entry.stat().st_mtime, lock.stat().st_mtime if lock.exists() else 0.0)


def prune(slug: str, code: str, *, older_than_s: float = PRUNE_AFTER_S) -> list[Path]:
    """Remove this model's exports made by other code (a SmolLM2 bundle is ~0.5 GB) that no process
    holds and none used for `older_than_s`. Returns what was removed."""
    root = exports_dir()
    if not root.is_dir():
        return []
    removed = []
    (root / ".locks").mkdir(exist_ok=True)
    with open(root / ".locks" / ".prune", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one pruner at a time
        for entry in sorted(root.glob(f"{slug}-*")):
            parts = entry.name[len(slug) + 1:].split("-")
            if len(parts) != 2 or parts[0] == code or not entry.is_dir() or entry in _HELD:
                continue
            if time.time() - last_used(entry) < older_than_s:
                continue
            fd = os.open(_lock_file(entry), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a process holds it
                os.close(fd)
                continue
            try:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            finally:
                os.close(fd)
    return removed
