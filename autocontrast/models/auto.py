"""`AutoMultiExitModel`: load any supported checkpoint as a multi-exit model.

>>> from autocontrast.config import MultiExitConfiguration
>>> from autocontrast.models.auto import AutoMultiExitModel
>>> cfg = MultiExitConfiguration(vocab_projection_mode="SHARED_PROJECTION_DIRECT",
...                              use_original_head=False, contrast_layer_indices="30;15")
>>> model = AutoMultiExitModel.from_pretrained(path, multi_exit_config=cfg)  # doctest: +SKIP
>>> model.generate(**tokenizer("The", return_tensors="pt"), max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from autocontrast.config import (
    ORIGINAL,
    MultiExitConfiguration,
    VocabularyProjectionMode,
    check_exit_in_range,
)
from autocontrast.errors import MissingExitWeightsError
from autocontrast.models.families import family_for
from autocontrast.models.multi_exit import CASTS, HEADS, MultiExitMixin, default_exit_indices, model_class


def _model_class(config: Any) -> type[MultiExitMixin]:
    return model_class(getattr(config, "model_type", None))


def prepare_config(config: Any, mec: MultiExitConfiguration) -> Any:
    """Set the exits on an HF config and check `mec` against it (raises `ConfigurationError`s)."""
    family = family_for(config)
    num_layers = family.num_layers(config)
    if mec.lm_head_layer_indices is not None:
        # Choosing exits for a plain checkpoint (or a subset of an existing multi-exit one) to train.
        config.lm_head_layer_indices = list(mec.lm_head_layer_indices)
    elif getattr(config, "lm_head_layer_indices", None) is None:
        config.lm_head_layer_indices = default_exit_indices(mec.vocab_projection_mode, num_layers)
    for exit_ in config.lm_head_layer_indices:
        check_exit_in_range(exit_, num_layers)
    available = set(config.lm_head_layer_indices)
    if mec.vocab_projection_mode == VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS:
        available.add(num_layers)
    mec.validate_exits(num_layers=num_layers, available=available)
    return config


class AutoMultiExitModel:
    """Picks the multi-exit class for a checkpoint's architecture (any in `autocontrast.models.families`)."""

    @staticmethod
    def from_pretrained(model_name_or_path: str, multi_exit_config: MultiExitConfiguration | None = None, *,
                        allow_missing_exit_weights: bool = False, **hf_kwargs: Any) -> MultiExitMixin:
        """Load a checkpoint (local folder or hub id) with the given multi-exit configuration.

        Checkpoints in the original library's format load unchanged. Exit weights that the
        projection mode needs but the checkpoint lacks are an error, unless
        `allow_missing_exit_weights=True` (training new heads or fitting cast matrices).
        """
        mec = multi_exit_config or MultiExitConfiguration()
        config_kwargs = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir")
                         if k in hf_kwargs}
        config = prepare_config(AutoConfig.from_pretrained(model_name_or_path, **config_kwargs), mec)
        model_class = _model_class(config)
        model, info = model_class.from_pretrained(model_name_or_path, config=config, multi_exit_config=mec,
                                                  output_loading_info=True, **hf_kwargs)
        missing = [k for k in info.get("missing_keys", ()) if k.startswith((HEADS, CASTS))
                   and not k.startswith(f"{HEADS}.lm_head_{ORIGINAL}")]
        if missing and not allow_missing_exit_weights:
            raise MissingExitWeightsError(
                f"{model_name_or_path} has no weights for {len(missing)} exit module(s) that "
                f"{mec.vocab_projection_mode.name} needs (e.g. {missing[0]}); train heads with acd-train-heads, "
                "fit cast matrices with acd-fit-cast, or use SHARED_PROJECTION_DIRECT")
        model.eval()
        return model

    @staticmethod
    def from_config(config: Any, multi_exit_config: MultiExitConfiguration | None = None) -> MultiExitMixin:
        """A randomly initialised multi-exit model (tiny test models, training from scratch)."""
        mec = multi_exit_config or MultiExitConfiguration()
        config = prepare_config(config, mec)
        return _model_class(config)(config, multi_exit_config=mec)
