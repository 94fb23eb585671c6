"""The tracing patches are undone on exit, also when the export fails inside them."""

from __future__ import annotations

import pytest
import transformers.masking_utils as masking
from transformers.cache_utils import DynamicLayer

from autocontrast.config import VocabularyProjectionMode
from autocontrast.export.patcher import export_patches
from tests.tiny_models import make_tiny_model


def _state(model):
    registry = masking.ALL_MASK_ATTENTION_FUNCTIONS
    return (registry["sdpa"], registry["eager"], masking.find_packed_sequence_indices, DynamicLayer.update,
            model.config._attn_implementation)


def test_every_patch_is_undone_after_the_block():
    model = make_tiny_model("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    before = _state(model)
    with export_patches(model):
        assert _state(model) != before
        assert model.config._attn_implementation == "eager"
    assert _state(model) == before


def test_patches_are_undone_when_the_block_raises():
    model = make_tiny_model("gpt2", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    before = _state(model)
    with pytest.raises(RuntimeError), export_patches(model):
        raise RuntimeError("tracing failed")
    assert _state(model) == before
