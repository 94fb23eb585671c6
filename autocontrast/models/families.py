"""The architecture registry: everything that differs between the supported model families.

One registered class per family is the only place an architecture is declared. It says which HF
`model_type`s it covers and their `transformers` classes (the multi-exit classes are built from
these, see `autocontrast.models.multi_exit.model_class`), where the final norm lives, which config
keys hold the sizes (and so the KV-cache layout), how the model's own head scales its logits, and
which graph fusions its exported graphs get (`fusions`: by default, or with `acd-export --optimize`).
The exporter's messages and the tests' parametrisation (tests/tiny_models.py) read this registry too.

How to add an architecture (DESIGN): if it is built like one already here, add its model type to
that family's `models`; otherwise declare a class below with `@register`. Then give it a tiny
config in tests/tiny_models.py `TINY_CONFIGS`; tests/models/test_families.py fails for a
registered model type without one, and every tiny-model test (PyTorch exits, export parity,
runtime tokens, transformers' own greedy) runs over it. Faithfulness rule: an exit at layer k
applies the final norm to `hidden_states[k]` and projects through its head exactly as the model's
own head does, so that the top exit equals the original head.

Torch-free at import (CLIs read it for their messages); the hooks take a loaded model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from autocontrast.bundle import BUFFER_LAYOUT, CONCAT_LAYOUT
from autocontrast.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

FAMILIES: dict[str, type[Family]] = {}


def sliding_window(config: Any) -> int | None:
    """The attention window of a model's layers (None: every layer attends to the whole context)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:  # Qwen2/3 carry an unused window
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


class HFModel(NamedTuple):
    """One HF model type a family covers."""

    model_type: str  # config.model_type
    hf_class: str  # the `transformers` class the multi-exit class extends
    label: str  # how messages name it


def register(cls: type[Family]) -> type[Family]:
    """Add a family to the registry (a class decorator); a model type may belong to one family only."""
    taken = {t for f in FAMILIES.values() for t in f.model_types if f.name != cls.name}
    clash = taken & {m.model_type for m in cls.models}
    if clash:
        raise ValueError(f"model type(s) {sorted(clash)} are already registered")
    cls.model_types = tuple(m.model_type for m in cls.models)
    FAMILIES[cls.name] = cls
    return cls


class Family:
    """Architecture specifics of one model family (all class-level, never instantiated)."""

    name: ClassVar[str]  # the manifest's `architecture`
    models: ClassVar[tuple[HFModel, ...]]
    model_types: ClassVar[tuple[str, ...]]  # set by `register` from `models`
    hidden_size_key: ClassVar[str] = "hidden_size"
    num_layers_key: ClassVar[str] = "num_hidden_layers"
    is_encoder_decoder: ClassVar[bool] = False
    # where the decoder stack and the final norm live on `model.base_model` (an early-exit graph
    # keeps only the first layers and leaves the final norm to the exit)
    layers_attr: ClassVar[str] = "layers"
    final_norm_attr: ClassVar[str] = "norm"
    # config key of a number the model's own head divides its logits by (Granite); every exit's
    # projection is divided by it too, so the top exit equals the original head
    logits_divisor_key: ClassVar[str | None] = None
    # graph fusions (names in `autocontrast.export.fusions.FUSIONS`), run in this order; () offers none
    fusions: ClassVar[tuple[str, ...]] = ()
    # whether an export runs `fusions` without being asked (`--optimize`): only where they were
    # validated against PyTorch and measured to help
    fuses_by_default: ClassVar[bool] = False
    # decode graphs attend through ORT's GroupQueryAttention over an in-place KV buffer (the
    # family's attention goes through transformers' attention interface with (batch, heads, seq,
    # head_dim) rotated queries and keys); False: the traced attention with a concatenated cache
    group_query_attention: ClassVar[bool] = False

    @classmethod
    def kv_layout(cls, config: Any) -> str:
        """The KV cache layout of this model's decode graphs (`autocontrast.bundle.KV_LAYOUTS`).

        A sliding attention window keeps the concatenated cache: GroupQueryAttention's window
        differs from transformers' by one token, and its CPU kernel's windowed cache is a ring.
        """
        if not cls.group_query_attention or sliding_window(config) is not None:
            return CONCAT_LAYOUT
        return BUFFER_LAYOUT

    @classmethod
    def final_norm(cls, model: Any) -> torch.nn.Module:
        return getattr(model.base_model, cls.final_norm_attr)

    @classmethod
    def normalize(cls, model: Any, hidden: torch.Tensor, *, is_last_layer: bool) -> torch.Tensor:
        """What the model applies to a layer's output before projecting it to the vocabulary.

        HF already applies the final norm to the top layer's recorded hidden state, so only
        intermediate layers get it here (exactly as the original library does).
        """
        return hidden if is_last_layer else cls.final_norm(model)(hidden)

    @classmethod
    def scale_logits(cls, config: Any, logits: torch.Tensor) -> torch.Tensor:
        """A projection's output as the model's own head returns it: (..., vocab) -> (..., vocab)."""
        return logits if cls.logits_divisor_key is None else logits / getattr(config, cls.logits_divisor_key)

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
    models = (HFModel("gpt2", "GPT2LMHeadModel", "GPT-2"),)
    hidden_size_key = "n_embd"
    layers_attr = "h"
    final_norm_attr = "ln_f"
    fusions = ("gpt2_optimizer",)


@register
class GPTNeoFamily(GPT2Family):
    """Built like GPT-2 (final LayerNorm at `transformer.ln_f`); its config names the width differently."""

    name = "gpt_neo"
    models = (HFModel("gpt_neo", "GPTNeoForCausalLM", "GPT-Neo"),)
    hidden_size_key = "hidden_size"
    fusions = ("gpt2_optimizer",)  # ORT has no GPT-Neo optimizer; GPT-2's fusions (LayerNorm, GELU) match its blocks


@register
class LlamaFamily(Family):
    """Llama and the models built like it: final RMSNorm at `model.norm`, then `lm_head`.

    Mistral, Qwen2 and Qwen3 differ only inside the layers (sliding window, qkv bias, q/k norms);
    exits see none of it.
    """

    name = "llama"
    models = (HFModel("llama", "LlamaForCausalLM", "Llama"), HFModel("mistral", "MistralForCausalLM", "Mistral"),
              HFModel("qwen2", "Qwen2ForCausalLM", "Qwen2"), HFModel("qwen3", "Qwen3ForCausalLM", "Qwen3"))
    group_query_attention = True
    # ORT's optimizer has no Llama class (its Llama path is the model builder), so the fusions are
    # named one by one (`autocontrast.export.fusions`). Merged q/k/v and gate/up MatMuls: exact, and
    # faster (SmolLM2 int8 3-4 %). The traced Reshapes' run-time shape arithmetic becomes constants
    # and GroupQueryAttention reads the merged q/k/v MatMul packed: exact, ~25 fewer kernels per
    # layer. Then ORT's RMSNorm and skip-RMSNorm fusions (the residual Add inside the norm's kernel):
    # a small gain once the shape arithmetic is gone (lost in it before; an ad-hoc timing only).
    fusions = ("shared_input_matmuls", "static_reshapes", "packed_qkv", "simplified_layer_norm",
               "skip_simplified_layer_norm")
    fuses_by_default = True


@register
class Phi3Family(LlamaFamily):
    """Phi-3: the Llama layout with fused `qkv_proj` and `gate_up_proj` inside the layers (exits see neither)."""

    name = "phi3"
    models = (HFModel("phi3", "Phi3ForCausalLM", "Phi-3"),)
    # q/k/v and gate/up are already one matrix each (nothing to merge); ORT's "phi" optimizer is for
    # Phi-2's dynamo export. Its q/k/v are Slices of one projection, not a Split: no packed_qkv.
    fusions = ("static_reshapes", "simplified_layer_norm", "skip_simplified_layer_norm")


@register
class GemmaFamily(LlamaFamily):
    """Gemma: embeddings scaled by sqrt(hidden) and an RMSNorm of (1 + weight), both inside HF's modules.

    `hidden_states[0]` is the scaled embedding and `model.norm` is Gemma's own norm, so exits need
    nothing beyond the Llama rule.
    """

    name = "gemma"
    models = (HFModel("gemma", "GemmaForCausalLM", "Gemma"),)


@register
class GraniteFamily(LlamaFamily):
    """Granite: embedding, residual and attention multipliers act inside the model; its head divides
    the logits by `logits_scaling`, and so does every exit's projection."""

    name = "granite"
    models = (HFModel("granite", "GraniteForCausalLM", "Granite"),)
    logits_divisor_key = "logits_scaling"


@register
class T5Family(Family):
    name = "t5"
    models = (HFModel("t5", "T5ForConditionalGeneration", "T5"),)
    hidden_size_key = "d_model"
    num_layers_key = "num_decoder_layers"
    is_encoder_decoder = True

    @classmethod
    def final_norm(cls, model: Any) -> torch.nn.Module:
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


def family_of_type(model_type: str | None) -> type[Family]:
    """The family registered for an HF `model_type`; raises `UnsupportedArchitectureError`."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no multi-exit support; supported model types: {', '.join(model_types())}")


def family_for(config: Any) -> type[Family]:
    """The family of an HF config, by `model_type`."""
    return family_of_type(getattr(config, "model_type", None))


def model_types(*, decoder_only: bool = False) -> tuple[str, ...]:
    """Every registered model type (`decoder_only`: without the encoder-decoder ones)."""
    return tuple(m.model_type for f in FAMILIES.values() if not (decoder_only and f.is_encoder_decoder)
                 for m in f.models)


def labels(*, decoder_only: bool = False) -> str:
    """The registered architectures as messages name them: 'GPT-2, GPT-Neo, Llama, ...'."""
    return ", ".join(m.label for f in FAMILIES.values() if not (decoder_only and f.is_encoder_decoder)
                     for m in f.models)


def hf_model(model_type: str) -> HFModel:
    family = family_of_type(model_type)
    return next(m for m in family.models if m.model_type == model_type)
