"""Shared fixtures: the real SmolLM2 model (converted once, cached) and tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from autocontrast.models.smollm2 import smollm2_path as path

    return path()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_path):
    """Factory: tiny_checkpoint(arch, mode) -> folder with a saved tiny multi-exit checkpoint (cached per session)."""
    from tests.tiny_models import save_tiny_checkpoint

    made: dict = {}

    def make(arch: str, mode) -> Path:
        key = (arch, mode.name)
        if key not in made:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}-{mode.name.lower()}")
            made[key] = save_tiny_checkpoint(arch, mode, directory, tokenizer_dir=smollm2_path)
        return made[key]

    return make
