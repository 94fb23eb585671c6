"""Architecture families: what differs between GPT-2, GPT-Neo, the Llama family and T5.

One small registered class per family says where the final norm lives, which config keys hold the
sizes, and the KV-cache layout. Adding a family means adding a class here (and a tiny-model test:
tests/models/test_families.py fails for a registered family without one).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from autocontrast.errors import UnsupportedArchitectureError

FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.name] = cls
    return cls


class Family:
    """Architecture specifics of one model family (all class-level, never instantiated)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF config.model_type values
    hidden_size_key: ClassVar[str] = "hidden_size"
    num_layers_key: ClassVar[str] = "num_hidden_layers"
    is_encoder_decoder: ClassVar[bool] = False
    # where the decoder stack and the final norm live on `model.base_model` (an early-exit graph
    # keeps only the first layers and leaves the final norm to the exit)
    layers_attr: ClassVar[str] = "layers"
    final_norm_attr: ClassVar[str] = "norm"

    @classmethod
    def normalize(cls, model: Any, hidden: torch.Tensor, *, is_last_layer: bool) -> torch.Tensor:
        """What the model applies to a layer's output before projecting it to the vocabulary.

        HF already applies the final norm to the top layer's recorded hidden state, so only
        intermediate layers get it here (exactly as the original library does).
        """
        return hidden if is_last_layer else cls.final_norm(model)(hidden)

    @staticmethod
    def final_norm(model: Any) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def num_layers(cls, config: Any) -> int:
        return int(getattr(config, cls.num_layers_key))

    @classmethod
    def hidden_size(cls, config: Any) -> int:
        return int(getattr(config, cls.hidden_size_key))

    @classmethod
    def num_kv_heads(cls, config: Any) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    @classmethod
    def head_dim(cls, config: Any) -> int:
        return int(getattr(config, "head_dim", None) or cls.hidden_size(config) // config.num_attention_heads)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


@register
class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    hidden_size_key = "n_embd"
    layers_attr = "h"
    final_norm_attr = "ln_f"

    @staticmethod
    def final_norm(model: Any) -> torch.nn.Module:
        return model.transformer.ln_f


@register
class GPTNeoFamily(GPT2Family):
    """Built like GPT-2 (final LayerNorm at `transformer.ln_f`); its config names the width differently."""

    name = "gpt_neo"
    model_types = ("gpt_neo",)
    hidden_size_key = "hidden_size"


@register
class LlamaFamily(Family):
    """Llama and the models built like it: final RMSNorm at `model.norm`, then `lm_head`."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    @staticmethod
    def final_norm(model: Any) -> torch.nn.Module:
        return model.model.norm


@register
class T5Family(Family):
    name = "t5"
    model_types = ("t5",)
    hidden_size_key = "d_model"
    num_layers_key = "num_decoder_layers"
    is_encoder_decoder = True

    @staticmethod
    def final_norm(model: Any) -> torch.nn.Module:
        return model.decoder.final_layer_norm

    @classmethod
    def normalize(cls, model: Any, hidden: torch.Tensor, *, is_last_layer: bool) -> torch.Tensor:
        if not is_last_layer:  # the top layer's norm and dropout are applied inside the T5 decoder
            hidden = model.decoder.dropout(model.decoder.final_layer_norm(hidden))
        if model.config.tie_word_embeddings:  # T5 rescales before a tied projection
            hidden = hidden * (model.model_dim ** -0.5)
        return hidden

    @classmethod
    def num_kv_heads(cls, config: Any) -> int:
        return int(config.num_heads)

    @classmethod
    def head_dim(cls, config: Any) -> int:
        return int(config.d_kv)

    @classmethod
    def max_positions(cls, config: Any) -> int:
        return int(getattr(config, "n_positions", 512) or 512)


def family_for(config: Any) -> type[Family]:
    """The family of an HF config, by `model_type`."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no multi-exit support; supported model types: {supported}")
