"""Export validation's PyTorch reference runs in float64 and leaves the model exactly as it was."""

from __future__ import annotations

import copy

import torch

from autocontrast.config import VocabularyProjectionMode
from autocontrast.export import memory, validation
from autocontrast.export.validation import float64_reference
from tests.tiny_models import multi_exit_model

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def test_the_reference_is_float64_inside_and_the_same_float32_model_after(tiny_checkpoint):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with float64_reference(model) as dtype:
        assert dtype == "float64"
        assert model.model.embed_tokens.weight.dtype == torch.float64
    assert all(torch.equal(p, before[name]) and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_each_layer_is_float64_only_while_it_runs_and_the_logits_equal_a_whole_float64_copy(tiny_checkpoint,
                                                                                            monkeypatch):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    monkeypatch.setattr(memory, "REFERENCE_WHOLE_LAYERS_BYTES", 0)  # layers too large to widen at once
    whole = copy.deepcopy(model).to(torch.float64)
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    seen = []
    hook = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with torch.no_grad(), float64_reference(model):
        assert {p.dtype for p in model.model.layers.parameters()} == {torch.float32}  # between runs
        ours = model(input_ids=ids).logits
    hook.remove()
    with torch.no_grad():
        theirs = whole(input_ids=ids).logits
    assert seen == [torch.float64] and ours.dtype == torch.float64
    assert torch.equal(ours, theirs)


def test_a_model_too_large_for_a_float64_copy_stays_float32(tiny_checkpoint, monkeypatch):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    monkeypatch.setattr(validation, "REFERENCE_MAX_PARAMETERS", 10)
    with float64_reference(model) as dtype:
        assert dtype == "float32"
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_layers_small_enough_are_float64_for_the_whole_block_with_the_same_logits(tiny_checkpoint):
    model = multi_exit_model(tiny_checkpoint("llama", DIRECT), DIRECT)
    whole = copy.deepcopy(model).to(torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    with torch.no_grad(), float64_reference(model):
        assert {p.dtype for p in model.model.layers.parameters()} == {torch.float64}  # between runs too
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(ours, whole(input_ids=ids).logits)
    assert all(torch.equal(p, before[name]) and p.dtype == torch.float32 for name, p in model.named_parameters())
