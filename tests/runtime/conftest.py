"""Runtime fixtures: a tiny Llama bundle (shared direct exits 1..4 + original, contrast 3 vs 1 fused)
and one Generator over it, shared by the tests of a session."""

from __future__ import annotations

import pytest

CONTRAST = (3, 1)  # the tiny bundles' fused contrast (the export tests' choice, so caches are shared)


@pytest.fixture(scope="session")
def llama_bundle(tiny_bundle):
    return tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=CONTRAST)


@pytest.fixture(scope="session")
def llama_generator(llama_bundle):
    from autocontrast.runtime import Generator

    return Generator(llama_bundle)
