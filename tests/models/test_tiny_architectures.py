"""Every architecture x every projection mode, on tiny random checkpoints in the original format.

References are computed independently: the plain Hugging Face model (loaded from the same folder,
which ignores the exit weights) gives `output_hidden_states`; the test applies the final norm by
hand (intermediate layers only), T5's rescale when the head is tied, Granite's `logits_scaling`,
and the exit weights read straight from the saved safetensors file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel
from tests.tiny_models import ARCHITECTURES, NUM_LAYERS, exits_for, make_tiny_model

MODES = tuple(VocabularyProjectionMode)
CASES = [(arch, mode) for arch in ARCHITECTURES for mode in MODES]
IDS = [f"{arch}-{mode.name.lower()}" for arch, mode in CASES]
L = NUM_LAYERS


def _inputs(arch: str) -> dict:
    ids = torch.tensor([[5, 17, 423, 411, 88, 500, 7], [31, 2, 340, 9, 77, 300, 41]])
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.tensor([[0, 44, 9, 310], [0, 12, 12, 5]])}
    return {"input_ids": ids}


def _plain(arch: str, path):
    cls = T5ForConditionalGeneration if arch == "t5" else AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


def _final_norm(arch: str, plain):
    if arch in ("gpt2", "gpt_neo"):
        return plain.transformer.ln_f
    if arch == "t5":
        return plain.decoder.final_layer_norm
    return plain.model.norm


def _reference_exit_logits(arch, mode, plain, weights, inputs, exit_: int, labels=None) -> torch.Tensor:
    """Exit logits from the plain model's hidden states: (batch, seq, vocab)."""
    with torch.no_grad():
        out = plain(**inputs, labels=labels, output_hidden_states=True)
    hidden = (out.decoder_hidden_states if arch == "t5" else out.hidden_states)[exit_]
    if mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS and exit_ == L:
        return out.logits  # the top layer is the model's own output in cast mode
    with torch.no_grad():
        if exit_ != L:
            hidden = _final_norm(arch, plain)(hidden)
        if arch == "t5" and plain.config.tie_word_embeddings:
            hidden = hidden * plain.config.d_model ** -0.5
        if mode == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            head = weights[f"name_to_lm_exit_head.lm_head_{exit_}.weight"]
        else:
            head = plain.get_output_embeddings().weight
            if mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
                hidden = hidden @ weights[f"name_to_conv_matrix.{exit_}_to_{L}.weight"].T
        # Granite's head divides its logits by logits_scaling; an exit read through a head does too
        return hidden @ head.T / getattr(plain.config, "logits_scaling", 1.0)


def _exit_model_logits(model, inputs, exit_) -> torch.Tensor:
    model.multi_exit_config = model.multi_exit_config.replace(use_original_head=False, output_layer_index=exit_)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_checkpoint_uses_the_original_key_names(arch, mode, tiny_checkpoint):
    path = tiny_checkpoint(arch, mode)
    keys = set(load_file(path / "model.safetensors"))
    assert json.loads((path / "config.json").read_text())["lm_head_layer_indices"] == list(exits_for(mode))
    heads = {f"name_to_lm_exit_head.lm_head_{k}.weight" for k in exits_for(mode)}
    casts = {f"name_to_conv_matrix.{k}_to_{L}.weight" for k in exits_for(mode) if k != L}
    extra = {k for k in keys if k.startswith(("name_to_lm_exit_head", "name_to_conv_matrix"))}
    if mode == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
        assert extra == heads
    elif mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
        assert extra == casts
    else:
        assert extra == set()


@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_saved_checkpoint_reloads_with_identical_logits(arch, mode, tiny_checkpoint):
    path = tiny_checkpoint(arch, mode)
    saved = make_tiny_model(arch, mode)  # the same seed: the model that was saved
    loaded = AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=mode))
    inputs = _inputs(arch)
    for exit_ in loaded.available_exits:
        if exit_ == "original":
            continue
        torch.testing.assert_close(_exit_model_logits(loaded, inputs, exit_), _exit_model_logits(saved, inputs, exit_),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_exit_logits_equal_an_independent_computation_from_hidden_states(arch, mode, tiny_checkpoint):
    path = tiny_checkpoint(arch, mode)
    model = AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=mode))
    plain, weights, inputs = _plain(arch, path), load_file(path / "model.safetensors"), _inputs(arch)
    exits = sorted(set(exits_for(mode)) | {L})
    assert set(model.available_exits) == set(exits) | {"original"}
    for exit_ in exits:
        want = _reference_exit_logits(arch, mode, plain, weights, inputs, exit_)
        torch.testing.assert_close(_exit_model_logits(model, inputs, exit_), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_original_head_gives_the_plain_models_logits(arch, mode, tiny_checkpoint):
    path = tiny_checkpoint(arch, mode)
    model = AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=mode))
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(arch)).logits, _plain(arch, path)(**_inputs(arch)).logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_training_step_with_frozen_base_changes_only_exit_heads(arch):
    model = make_tiny_model(arch, VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION, freeze_parameters=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"name_to_lm_exit_head.lm_head_{k}.weight" for k in exits_for(
        VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    inputs = _inputs(arch)
    labels = inputs["input_ids"] if arch != "t5" else inputs.pop("decoder_input_ids")
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("mode", [VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS,
                                  VocabularyProjectionMode.SHARED_PROJECTION_DIRECT])
def test_shared_modes_with_frozen_base_have_nothing_to_train(mode):
    model = make_tiny_model("llama", mode, freeze_parameters=True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_loss_is_the_sum_of_every_exit_heads_cross_entropy(arch, mode, tiny_checkpoint):
    path = tiny_checkpoint(arch, mode)
    model = AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=mode))
    plain, weights, inputs = _plain(arch, path), load_file(path / "model.safetensors"), _inputs(arch)
    if arch == "t5":
        labels = inputs.pop("decoder_input_ids")
    else:
        labels = inputs["input_ids"].clone()
        labels[1, :2] = -100  # ignored positions stay ignored
    want = 0.0
    for exit_ in exits_for(mode):
        logits = _reference_exit_logits(arch, mode, plain, weights, inputs, exit_, labels=labels)
        targets = labels
        if arch != "t5":
            logits, targets = logits[:, :-1], labels[:, 1:]
        want += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                  ignore_index=-100)
    with torch.no_grad():
        got = model(**inputs, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
