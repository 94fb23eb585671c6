"""Greedy tokens of the runtime equal the PyTorch multi-exit model's `generate()` tokens, for tiny
models of every registered decoder-only architecture (tests/tiny_models.py export_cases), in every
decoding mode, with the graph's fused contrast and with the NumPy contrast; and with the original
head they equal transformers' own greedy tokens for that architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.runtime import Generator
from tests.runtime.conftest import CONTRAST
from tests.tiny_models import DECODER_ONLY, VOCAB, export_cases

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea, there lived")
NEW_TOKENS = 12
MODES = {
    "original": dict(),
    "exit": dict(use_original_head=False, output_layer_index=2),
    "contrast": dict(use_original_head=False, contrast_layer_indices=CONTRAST),
    "contrast_alpha_k": dict(use_original_head=False, contrast_layer_indices=CONTRAST, alpha=0.4, minimum_candidates=5),
    "contrast_alpha0": dict(use_original_head=False, contrast_layer_indices=CONTRAST, alpha=0.0),
}
# DoLa's mature layer is the model's own head: one graph returns it beside the exits where the top exit is the
# own head and exported (the direct projection); the other tiny bundles keep it in a graph of its own
WITH_OWN_HEAD = {"dola": dict(use_original_head=False, dola_layers=(1, 2), relative_top=0.05),
                 "dola_fixed": dict(use_original_head=False, dola_layers=(CONTRAST[1],))}
SHARED_ONLY = {"contrast_original_upper": dict(use_original_head=False, contrast_layer_indices=("original", 2))}
BUNDLES = export_cases()


def _torch_tokens(checkpoint, projection, fields: dict, prompt_ids: list[int]) -> list[int]:
    config = MultiExitConfiguration(vocab_projection_mode=projection, **fields)
    model = AutoMultiExitModel.from_pretrained(str(checkpoint), config)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=2, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch,projection", BUNDLES, ids=lambda v: getattr(v, "name", v).lower())
def test_greedy_tokens_equal_pytorch_in_every_mode(arch, projection, tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle(arch, projection, fuse_contrast=CONTRAST)
    checkpoint = tiny_checkpoint(arch, projection)
    generator = Generator(bundle)
    modes = dict(MODES)
    if projection == VocabularyProjectionMode.SHARED_PROJECTION_DIRECT:  # 'original' and exit 2 share a graph
        modes.update(SHARED_ONLY | WITH_OWN_HEAD)
    mismatches = []
    for name, fields in modes.items():
        config = MultiExitConfiguration(**fields)
        for prompt in PROMPTS:
            ids = generator.encode(prompt)
            want = _torch_tokens(checkpoint, projection, fields, ids)
            for fused in ((True, False) if name.startswith("contrast") else (True,)):
                got = generator.generate(ids, multi_exit=config, max_new_tokens=NEW_TOKENS,
                                         fused_contrast=fused).token_ids[0]
                if got != want:
                    mismatches.append(f"{name} fused={fused} {prompt[:12]!r}: runtime {got} != torch {want}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_original_head_greedy_tokens_equal_transformers_own_greedy(arch, tiny_bundle, tiny_checkpoint):
    projection = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
    generator = Generator(tiny_bundle(arch, projection, fuse_contrast=CONTRAST))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint(arch, projection))).eval()
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        prompt_ids = torch.tensor([ids])
        with torch.no_grad():
            want = plain.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
        assert generator.generate(ids, max_new_tokens=NEW_TOKENS).token_ids[0] == want, prompt


def test_fused_contrast_is_used_when_it_matches(llama_generator):
    fused = llama_generator.mode(MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST))
    other = llama_generator.mode(MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST,
                                                        alpha=0.3))
    numpy_ = llama_generator.mode(MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST),
                                  fused=False)
    assert fused.fused and not other.fused and not numpy_.fused


def test_custom_contrast_function_gets_upper_and_lower_logits(llama_generator):
    calls = []

    def lower_only(upper, lower):  # (batch, vocab) each
        calls.append((upper.shape, lower.shape))
        return lower

    custom = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST,
                                    contrast_function=lower_only)
    exit_1 = MultiExitConfiguration(use_original_head=False, output_layer_index=CONTRAST[1])
    got = llama_generator.generate("Hello there", multi_exit=custom, max_new_tokens=6).token_ids
    assert got == llama_generator.generate("Hello there", multi_exit=exit_1, max_new_tokens=6).token_ids
    assert calls and calls[0] == ((1, VOCAB), (1, VOCAB))
