"""Tiny random models of every supported architecture, for fast unit tests (never for claims).

They use a tiny byte-level BPE tokenizer (vocab 2048) trained in a fixture on WikiText-2 lines
(`save_tiny_tokenizer`), with ChatML special tokens and chat template, so bundles made from them
are complete and text round-trips without the real model; everything else is a few layers of 32
hidden units. Tests about the real model use SmolLM2 and its own tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GemmaConfig,
    GPT2Config,
    GPTNeoConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.models.families import FAMILIES, model_types

VOCAB = 2048  # the smallest whose tied head (vocab x 32) export/tied_head.py stores once (>= 2**16 values)
NUM_LAYERS = 4
MAX_POSITIONS = 1024  # room for long generations: a tiny model is fast, tests that need one running use many tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# ids 0, 1, 2: the tiny configs' pad, bos and eos (SmolLM2's ids for the same tokens)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENIZER_TRAINING_LINES = 2000


def save_tiny_tokenizer(directory: Path, lines: Iterable[str]) -> Path:
    """Train a byte-level BPE tokenizer of `VOCAB` ids on `lines` and save it as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    pad, bos, eos = SPECIAL_TOKENS
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_POSITIONS, "chat_template": CHAT_TEMPLATE,
              **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return directory

# Every registered architecture; tests/models/test_families.py checks each has a tiny config below.
ARCHITECTURES = model_types()
DECODER_ONLY = model_types(decoder_only=True)



def export_cases() -> list[tuple[str, VocabularyProjectionMode]]:
    """(model type, projection mode) of the export and runtime parity tests, from the registry.

    Each family's first model type runs every projection mode (a family is one code path for
    exits: its norm, its head scaling); its other model types differ only inside the layers and
    run the shared direct mode.
    """
    cases = []
    for family in FAMILIES.values():
        if family.is_encoder_decoder:
            continue
        first, *others = family.model_types
        cases += [(first, mode) for mode in VocabularyProjectionMode]
        cases += [(arch, VocabularyProjectionMode.SHARED_PROJECTION_DIRECT) for arch in others]
    return cases


_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# grouped-query attention (4 query heads, 2 KV heads), tied head; heads of 16, the smallest that
# GroupQueryAttention rotates itself (Qwen3 and Gemma keep heads of 8: the model's own rotation runs)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
                   tie_word_embeddings=True, **_COMMON)
TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=MAX_POSITIONS, **_COMMON),
    "gpt_neo": lambda: GPTNeoConfig(hidden_size=32, num_layers=NUM_LAYERS, num_heads=4, max_position_embeddings=MAX_POSITIONS,
                                    attention_types=[[["global", "local"], NUM_LAYERS // 2]], window_size=16,
                                    **_COMMON),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: Qwen3Config(**{**_LLAMA_LIKE, "head_dim": 8}),  # its default head_dim is 128
    # untied head: Phi-3's checkpoints have their own lm_head
    "phi3": lambda: Phi3Config(**{**_LLAMA_LIKE, "tie_word_embeddings": False}),
    "gemma": lambda: GemmaConfig(**{**_LLAMA_LIKE, "head_dim": 8}),  # sqrt(hidden) embedding scale, (1+w) norm
    # every multiplier away from 1, so a missed one shows
    "granite": lambda: GraniteConfig(**_LLAMA_LIKE, embedding_multiplier=3.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2, logits_scaling=4.0),
    "t5": lambda: T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=NUM_LAYERS, num_heads=4,
                           decoder_start_token_id=0, vocab_size=VOCAB, eos_token_id=2, pad_token_id=0),
}


def tiny_config(arch: str):
    try:
        return TINY_CONFIGS[arch]()
    except KeyError:
        raise ValueError(f"no tiny config for {arch}; add one to tests/tiny_models.py TINY_CONFIGS") from None


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
    """Save a tiny multi-exit checkpoint (original library format) plus the tokenizer in `tokenizer_dir`."""
    model = make_tiny_model(arch, mode, seed=seed)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def left_padded_prompts(lengths: list[int], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random prompt ids (from 3 up, clear of the special ids) of the given lengths, left-padded to the
    first: ids (batch, lengths[0]) int64 and mask (batch, lengths[0]) int64."""
    rng = np.random.default_rng(seed)
    width = lengths[0]
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(3, VOCAB, n)
        mask[row, width - n:] = 1
    return ids, mask


def multi_exit_model(checkpoint: Path, mode: VocabularyProjectionMode):
    """The PyTorch multi-exit model of a saved tiny checkpoint in `mode` (the parity tests' reference)."""
    return AutoMultiExitModel.from_pretrained(str(checkpoint), MultiExitConfiguration(vocab_projection_mode=mode))
