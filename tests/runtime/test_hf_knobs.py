"""`min_new_tokens` and `logits_processors` against transformers' own `generate()` on the same tiny
model: the PyTorch multi-exit model with HF's MinNewTokensLengthLogitsProcessor and a user
LogitsProcessor, and the runtime with the same settings, give the same greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel
from tests.runtime.conftest import CONTRAST

PROMPT = "Once upon a time, in a small village by the sea, there lived"
NEW = 12
MODES = {"original": MultiExitConfiguration(),
         "contrast": MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)}


class Banned:
    """The user's processor, written once: forbid some tokens (a row's ids, its scores) -> scores."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, token_ids, scores):
        scores = scores.copy()
        scores[self.tokens] = -np.inf
        return scores


class AsHF(LogitsProcessor):
    """The same function as a transformers LogitsProcessor, row by row."""

    def __init__(self, function):
        self.function = function

    def __call__(self, input_ids, scores):
        rows = [self.function(i.numpy(), s.numpy()) for i, s in zip(input_ids, scores, strict=True)]
        return torch.from_numpy(np.stack(rows)).to(scores.dtype)


def _torch(checkpoint, config, prompt_ids, *, eos, **generate_fields):
    model = AutoMultiExitModel.from_pretrained(
        str(checkpoint), config.replace(vocab_projection_mode=VocabularyProjectionMode.SHARED_PROJECTION_DIRECT))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos, **generate_fields)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_min_new_tokens_matches_transformers(llama_generator, checkpoint, mode):
    config = MODES[mode]
    prompt = llama_generator.encode(PROMPT)
    free = llama_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW, ignore_eos=True).token_ids[0]
    eos = free[0]  # the model's first choice: as end-of-sequence it stops the row at once
    early = llama_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW, ignore_eos=True,
                                     stop_token_ids=(eos,))
    assert early.token_ids[0] == [eos]
    ours = llama_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW, ignore_eos=True,
                                    stop_token_ids=(eos,), min_new_tokens=6).token_ids[0]
    theirs = _torch(checkpoint, config, prompt, eos=eos, min_new_tokens=6)
    assert ours == theirs
    assert len(ours) >= 6 and eos not in ours[:6]


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_logits_processors_match_transformers(llama_generator, checkpoint, mode):
    config = MODES[mode]
    prompt = llama_generator.encode(PROMPT)
    free = llama_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW, ignore_eos=True).token_ids[0]
    banned = Banned({free[0], free[3]})
    ours = llama_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW, ignore_eos=True,
                                    logits_processors=(banned,)).token_ids[0]
    theirs = _torch(checkpoint, config, prompt, eos=-1 % llama_generator.manifest.vocab_size,
                    logits_processor=LogitsProcessorList([AsHF(banned)]))
    assert ours == theirs
    assert ours != free and not set(banned.tokens) & set(ours)
