"""Export validation's PyTorch reference runs in float64 and leaves the model exactly as it was."""

from __future__ import annotations

import torch

from autocontrast.config import VocabularyProjectionMode
from autocontrast.export import validation
from autocontrast.export.validation import float64_reference
from tests.tiny_models import multi_exit_model

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def test_the_reference_is_float64_inside_and_the_same_float32_model_after(tiny_checkpoint):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with float64_reference(model) as dtype:
        assert dtype == "float64"
        assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(torch.equal(p, before[name]) and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_a_model_too_large_for_a_float64_copy_stays_float32(tiny_checkpoint, monkeypatch):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    monkeypatch.setattr(validation, "REFERENCE_MAX_PARAMETERS", 10)
    with float64_reference(model) as dtype:
        assert dtype == "float32"
        assert {p.dtype for p in model.parameters()} == {torch.float32}
