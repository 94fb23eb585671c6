"""Multi-exit models: a Hugging Face LM plus exit heads, with the original library's behaviour.

`MultiExitMixin` is combined with the HF class the architecture registry names
(`autocontrast.models.families`): `model_class("gpt2")` is `MultiExitGPT2(MultiExitMixin, GPT2LMHeadModel)`,
so weights keep their HF names and the extra modules keep the original library's names:
`name_to_lm_exit_head.lm_head_<layer>.weight` (layer-specific heads) and
`name_to_conv_matrix.<layer>_to_<L>.weight` (cast matrices). `save_pretrained` therefore writes the
original checkpoint format and `from_pretrained` reads it unchanged.

The forward keeps the HF signature (so `generate()` works: greedy, sampling, beam search) and
replaces `logits` by the configured mode's: the original head, one exit, or the contrast.
With `labels`, the loss is the sum of every exit head's cross-entropy, as in the original.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn

from autocontrast.config import (
    ORIGINAL,
    Exit,
    MultiExitConfiguration,
    VocabularyProjectionMode,
    is_original_logits,
)
from autocontrast.models.contrast import calculate_contrasted_logits, dola_scores
from autocontrast.models.families import Family, family_of_type, hf_model, model_types

LM_HEAD_PREFIX = "lm_head_"
HEADS = "name_to_lm_exit_head"
CASTS = "name_to_conv_matrix"


def cast_matrix_name(layer: int, num_layers: int) -> str:
    return f"{layer}_to_{num_layers}"


def default_exit_indices(mode: VocabularyProjectionMode, num_layers: int) -> list[int]:
    """Exits of a checkpoint that names none: every layer where the shared head applies directly,
    none where exits need weights the checkpoint does not have."""
    return list(range(1, num_layers + 1)) if mode == VocabularyProjectionMode.SHARED_PROJECTION_DIRECT else []


class MultiExitMixin:
    """Adds exits to an HF language model. Subclasses set `family`."""

    family: type[Family]
    accepts_loss_kwargs = False  # our loss is a mean per head; let the Trainer scale it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base_forward = next(k.forward for k in cls.__mro__[1:]
                            if "forward" in k.__dict__ and not issubclass(k, MultiExitMixin))

        # Keep the HF forward's signature: transformers inspects it (generate, Trainer).
        @functools.wraps(base_forward)
        def forward(self: MultiExitMixin, *args: Any, **kw: Any) -> Any:
            return self._multi_exit_forward(base_forward, *args, **kw)

        cls.forward = forward

    def __init__(self, config: Any, multi_exit_config: MultiExitConfiguration | None = None) -> None:
        super().__init__(config)
        mec = multi_exit_config or MultiExitConfiguration()
        self.multi_exit_config = mec
        self.vocab_projection_mode = mec.vocab_projection_mode
        self.num_layers = self.family.num_layers(config)
        self.output_size = self.family.hidden_size(config)
        if getattr(config, "lm_head_layer_indices", None) is None:
            config.lm_head_layer_indices = default_exit_indices(mec.vocab_projection_mode, self.num_layers)
        self.exit_indices: tuple[Exit, ...] = tuple(config.lm_head_layer_indices)

        if mec.freeze_parameters:
            for param in self.parameters():
                param.requires_grad = False  # base model frozen; exit heads created below stay trainable
        mode = self.vocab_projection_mode
        if mode == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            self.name_to_lm_exit_head = nn.ModuleDict({
                LM_HEAD_PREFIX + str(layer): self.lm_head if layer == ORIGINAL
                else nn.Linear(self.output_size, config.vocab_size, bias=False)
                for layer in self.exit_indices})
        elif mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
            self.name_to_conv_matrix = nn.ModuleDict({
                cast_matrix_name(layer, self.num_layers): nn.Linear(self.output_size, self.output_size, bias=False)
                for layer in self.exit_indices if layer not in (self.num_layers, ORIGINAL)})
            for matrix in self.name_to_conv_matrix.values():
                matrix.weight.requires_grad = False  # fitted separately (acd-fit-cast), never by backprop

    # -- exits --------------------------------------------------------------------------------

    @property
    def available_exits(self) -> tuple[Exit, ...]:
        """Exits this model can produce logits for ('original' always)."""
        exits = tuple(e for e in self.exit_indices if e != ORIGINAL)
        if self.vocab_projection_mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
            exits = tuple(sorted(set(exits) | {self.num_layers}))
        return exits + (ORIGINAL,)

    def exit_head(self, exit_: int) -> nn.Linear:
        """The vocabulary projection an (integer) exit uses."""
        if self.vocab_projection_mode == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION:
            return self.name_to_lm_exit_head[LM_HEAD_PREFIX + str(exit_)]
        return self.lm_head

    def exit_hidden(self, exit_: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `exit_`'s hidden state made ready for `exit_head(exit_)`: norm, and cast if any.

        hidden: (..., hidden) recorded output of that layer -> (..., hidden)
        """
        mode = self.vocab_projection_mode
        if mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
            hidden = self.family.normalize(self, hidden, is_last_layer=False)
            return self.name_to_conv_matrix[cast_matrix_name(exit_, self.num_layers)](hidden)
        return self.family.normalize(self, hidden, is_last_layer=exit_ == self.num_layers)

    def uses_original_logits(self, exit_: Exit) -> bool:
        """Whether an exit's logits are the model's own output (no extra projection)."""
        return is_original_logits(self.vocab_projection_mode, exit_, num_layers=self.num_layers)

    def project(self, exit_: Exit, prepared: torch.Tensor) -> torch.Tensor:
        """An exit's logits from its prepared hidden state, scaled as the model's own head scales.

        prepared: (..., hidden) from `exit_hidden` -> (..., vocab)
        """
        head = self.exit_head(exit_)
        return self.family.scale_logits(self.config, head(prepared.to(head.weight.dtype)))

    def exit_logits(self, exits: tuple[Exit, ...], original_logits: torch.Tensor,
                    hidden_states: tuple[torch.Tensor, ...] | None) -> dict[Exit, torch.Tensor]:
        """Logits of each exit; hidden states sliced to the positions `original_logits` covers.

        original_logits: (batch, seq', vocab); hidden_states[i]: (batch, seq, hidden)
        """
        keep = original_logits.shape[-2]
        result: dict[Exit, torch.Tensor] = {}
        for exit_ in exits:
            if self.uses_original_logits(exit_):
                result[exit_] = original_logits
            else:
                hidden = hidden_states[exit_][..., -keep:, :]
                result[exit_] = self.project(exit_, self.exit_hidden(exit_, hidden))
        return result

    def combine(self, by_exit: dict[Exit, torch.Tensor]) -> torch.Tensor:
        """The generation logits of the configured mode from the exits' logits."""
        mec = self.multi_exit_config
        if mec.use_original_head:
            return by_exit[ORIGINAL]
        if mec.dola_layers is not None:
            return dola_scores(by_exit[ORIGINAL], torch.stack([by_exit[e] for e in mec.dola_layers]),
                               relative_top=mec.relative_top)
        if mec.contrast_layer_indices is None:
            return by_exit[mec.output_layer_index]
        upper, lower = (by_exit[e] for e in mec.contrast_layer_indices)
        if mec.contrast_function is not None:
            return mec.contrast_function(upper, lower)
        return calculate_contrasted_logits(upper, lower, minimum_candidates=mec.minimum_candidates, alpha=mec.alpha)

    # -- forward ------------------------------------------------------------------------------

    def _multi_exit_forward(self, base_forward: Any, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.pop("labels", None)
        kwargs.pop("num_items_in_batch", None)
        if labels is not None and self.family.is_encoder_decoder and kwargs.get("decoder_input_ids") is None \
                and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = self._shift_right(labels)
        exits = self.multi_exit_config.required_exits
        if labels is not None:  # every head is trained: the loss sums them all
            exits = tuple(dict.fromkeys(exits + self.exit_indices))
        if any(not self.uses_original_logits(e) for e in exits):
            kwargs["output_hidden_states"] = True
        kwargs["return_dict"] = True
        outputs = base_forward(self, *args, **kwargs)
        hidden = outputs.decoder_hidden_states if self.family.is_encoder_decoder else outputs.hidden_states
        by_exit = self.exit_logits(exits, outputs.logits, hidden)
        if labels is not None:
            # item assignment, not attribute: a ModelOutput built with loss=None has no 'loss' key, and
            # the Trainer reads outputs["loss"]
            outputs["loss"] = sum(self._head_loss(by_exit[e], labels) for e in self.exit_indices)
        outputs.logits = self.combine(by_exit)
        return outputs

    def _head_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.family.is_encoder_decoder:  # causal LM: tokens < n predict n
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                           labels.reshape(-1).to(logits.device), ignore_index=-100)


_CLASSES: dict[str, type[MultiExitMixin]] = {}
_SUFFIXES = ("ForConditionalGeneration", "ForCausalLM", "LMHeadModel")


def class_name(model_type: str) -> str:
    """'MultiExitLlama' for 'llama': the HF class's name without its head suffix."""
    name = hf_model(model_type).hf_class
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return f"MultiExit{name}"


def model_class(model_type: str) -> type[MultiExitMixin]:
    """The multi-exit class of a registered model type, built once from the registry's HF class.

    >>> model_class("llama").__name__
    'MultiExitLlama'
    """
    if model_type not in _CLASSES:
        family = family_of_type(model_type)  # raises the clear error for an unknown architecture
        base = getattr(transformers, hf_model(model_type).hf_class)
        name = class_name(model_type)
        _CLASSES[model_type] = type(name, (MultiExitMixin, base), {
            "family": family, "__module__": __name__, "__qualname__": name,
            "__doc__": f"{base.__name__} with exits ({family.__name__})."})
    return _CLASSES[model_type]


def __getattr__(name: str) -> type[MultiExitMixin]:
    """`multi_exit.MultiExitLlama` and friends by name (imports, pickling)."""
    for model_type in model_types():
        if class_name(model_type) == name:
            return model_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
