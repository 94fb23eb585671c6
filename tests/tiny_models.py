"""Tiny random models of every supported architecture, for fast unit tests (never for claims).

They use the real SmolLM2 tokenizer (vocab 49152), so bundles made from them are complete and
text round-trips; everything else is a few layers of 32 hidden units.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPTNeoConfig, LlamaConfig, MistralConfig, Qwen2Config, T5Config

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel

VOCAB = 49152
NUM_LAYERS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Every architecture with a multi-exit class; tests/models/test_families.py checks this covers them all.
ARCHITECTURES = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2", "t5")
DECODER_ONLY = ("gpt2", "gpt_neo", "llama", "mistral", "qwen2")


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=256, **common)
    if arch == "gpt_neo":
        return GPTNeoConfig(hidden_size=32, num_layers=NUM_LAYERS, num_heads=4, max_position_embeddings=256,
                            attention_types=[[["global", "local"], NUM_LAYERS // 2]], window_size=16, **common)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "mistral":
        return MistralConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "t5":
        return T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=NUM_LAYERS, num_heads=4,
                        decoder_start_token_id=0, vocab_size=VOCAB, eos_token_id=2, pad_token_id=0)
    raise ValueError(f"no tiny config for {arch}")


def exits_for(mode: VocabularyProjectionMode) -> tuple:
    """The exits a tiny checkpoint gets in each mode (every intermediate layer, and the top)."""
    if mode == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
        return (1, 2, 3, 4)
    if mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
        return (1, 2, 3)
    return (1, 2, 3, 4)


def make_tiny_model(arch: str, mode: VocabularyProjectionMode, *, seed: int = 0, **mec_fields):
    """A random multi-exit model with random exit weights (heads and cast matrices included)."""
    torch.manual_seed(seed)
    mec = MultiExitConfiguration(vocab_projection_mode=mode, lm_head_layer_indices=exits_for(mode), **mec_fields)
    model = AutoMultiExitModel.from_config(tiny_config(arch), mec)
    with torch.no_grad():  # exit weights at a scale that makes exits disagree (a meaningful contrast)
        for name, param in model.named_parameters():
            if name.startswith(("name_to_lm_exit_head", "name_to_conv_matrix")):
                param.normal_(0.0, 0.3)
    return model.eval()


def save_tiny_checkpoint(arch: str, mode: VocabularyProjectionMode, directory: Path, *, tokenizer_dir: Path,
                         seed: int = 0) -> Path:
    """Save a tiny multi-exit checkpoint (original library format) plus the SmolLM2 tokenizer."""
    model = make_tiny_model(arch, mode, seed=seed)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory
