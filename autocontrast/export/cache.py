"""Exports cached on disk, keyed by the code and options that produce them (tests, benchmarks).

`cached_bundle` returns `<cache>/exports/<key>` and exports there only when it is missing; the key
hashes the exporter's and models' sources, the bundle format module, the options and the model's
identity, so any change to any of them makes a fresh export.

>>> from autocontrast.export.cache import cached_bundle
>>> path = cached_bundle(smollm2_path(), ExportOptions(exits=(30, 15)), identity="smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import shutil
import sys
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
    if (target / MANIFEST_FILE).is_file():
        return target
    _prune(slug, code)
    if callable(model):
        model = model()
    try:
        export_bundle(model, target, options=options, log=log or (lambda m: print(m, file=sys.stderr)))
    except (OSError, ExportError):
        if not (target / MANIFEST_FILE).is_file():  # not a concurrent export that won the race
            raise
    return target


def _prune(slug: str, code: str) -> None:
    """Remove this model's exports made by other code: stale, and a SmolLM2 bundle is ~0.5 GB."""
    root = exports_dir()
    if not root.is_dir():
        return
    for entry in root.glob(f"{slug}-*"):
        parts = entry.name[len(slug) + 1:].split("-")
        if len(parts) == 2 and parts[0] != code and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
