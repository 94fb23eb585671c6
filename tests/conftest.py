"""Shared fixtures: the real SmolLM2 model (converted once, cached), a tiny tokenizer and tiny checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autocontrast.data import wikitext_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from autocontrast.models.smollm2 import smollm2_path as path

    return path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A folder with a tiny byte-level BPE tokenizer (tests/tiny_models.py) trained on WikiText-2 lines."""
    from tests.tiny_models import TOKENIZER_TRAINING_LINES, save_tiny_tokenizer

    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:TOKENIZER_TRAINING_LINES]
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"), lines)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """Factory: tiny_checkpoint(arch, mode) -> folder with a saved tiny multi-exit checkpoint (cached per session)."""
    from tests.tiny_models import save_tiny_checkpoint

    made: dict = {}

    def make(arch: str, mode) -> Path:
        key = (arch, mode.name)
        if key not in made:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}-{mode.name.lower()}")
            made[key] = save_tiny_checkpoint(arch, mode, directory, tokenizer_dir=tiny_tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint):
    """Factory: tiny_bundle(arch, mode, *, fuse_contrast=None, early_exits=None, kv_layout=None, alpha=None,
    fuse_dola=None, relative_top=None, mixed_step=None) -> Path of an exported, validated tiny bundle.

    Exits are the tiny checkpoint's (tests/tiny_models.py exits_for) plus 'original'; cached on disk
    under <cache>/exports keyed by the exporter's sources and the options.
    """
    import hashlib

    from autocontrast.config import VocabularyProjectionMode
    from autocontrast.export.cache import cached_bundle
    from autocontrast.export.exporter import ExportOptions

    tiny_source = hashlib.sha256((Path(__file__).parent / "tiny_models.py").read_bytes()).hexdigest()[:12]

    def make(arch: str, mode, *, fuse_contrast=None, early_exits=None, kv_layout=None, alpha=None, fuse_dola=None,
             relative_top=None, mixed_step=None) -> Path:
        mode = VocabularyProjectionMode.parse(mode)
        given = {"alpha": alpha, "fuse_dola": tuple(fuse_dola) if fuse_dola else None, "relative_top": relative_top,
                 "mixed_step": mixed_step}
        options = ExportOptions(projection=mode.name, fuse_contrast=tuple(fuse_contrast) if fuse_contrast else None,
                                early_exits=early_exits, kv_layout=kv_layout,
                                **{k: v for k, v in given.items() if v is not None})
        return cached_bundle(lambda: tiny_checkpoint(arch, mode), options,
                             identity=f"tiny-{arch}-{mode.name.lower()}-{tiny_source}")

    return make


SMOLLM2_EXPORT = dict(projection="SHARED_PROJECTION_DIRECT", exits=(30, 20, 15, 10), fuse_contrast=(30, 15),
                      alpha=0.1, minimum_candidates=1)


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_path) -> Path:
    """The SmolLM2 fp32 bundle: shared direct, exits 30, 20, 15, 10 and original, contrast 30 vs 15 fused
    (alpha 0.1, k 1). Exported once (~1-2 min) and cached on disk under <cache>/exports."""
    from autocontrast.export.cache import cached_bundle
    from autocontrast.export.exporter import ExportOptions

    return cached_bundle(smollm2_path, ExportOptions(**SMOLLM2_EXPORT), identity="smollm2-135m-instruct")


WIKITEXT_VALID = wikitext_path("valid")  # the package carries it (autocontrast/data)


@pytest.fixture(scope="session")
def wikitext_sample(tmp_path_factory):
    """Factory: wikitext_sample(chars) -> a file holding the first `chars` characters of WikiText-2 validation."""

    def make(chars: int) -> Path:
        path = tmp_path_factory.mktemp("data") / f"valid-head-{chars}.txt"
        path.write_text(WIKITEXT_VALID.read_text(encoding="utf-8")[:chars], encoding="utf-8")
        return path

    return make


@pytest.fixture(scope="session")
def plain_llama(tiny_checkpoint) -> Path:
    """A tiny Llama checkpoint with no exit weights (shared direct mode, tied head)."""
    from autocontrast.config import VocabularyProjectionMode

    return tiny_checkpoint("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)


@pytest.fixture(scope="session")
def llama_bundle(tiny_bundle):
    """The tiny Llama bundle: shared direct exits 1..4 + original, contrast 3 vs 1 fused, and the mixed-step graph
    (runtime and server tests)."""
    from tests.runtime.conftest import CONTRAST

    return tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=CONTRAST, mixed_step=True)


@pytest.fixture(scope="session")
def llama_generator(llama_bundle):
    """One Generator over `llama_bundle`, shared by the tests of a session."""
    from autocontrast.runtime import Generator

    return Generator(llama_bundle)


READ_GUARD = None


def pytest_configure(config):
    """Refuse (and count) every read beside the checkout: see tests/read_guard.py."""
    global READ_GUARD
    from tests.read_guard import ReadGuard, forbidden_siblings

    if READ_GUARD is None:
        READ_GUARD = ReadGuard(forbidden_siblings())
        READ_GUARD.install()


def pytest_sessionfinish(session, exitstatus):
    if READ_GUARD is not None and READ_GUARD.violations:
        print("\nread outside the checkout:\n  " + "\n  ".join(sorted(set(READ_GUARD.violations))), file=sys.stderr)
        session.exitstatus = 1
