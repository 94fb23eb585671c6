"""MultiExitConfiguration: the original library's parameters, their string forms, and clear errors."""

from __future__ import annotations

import pytest

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import (
    ConfigurationError,
    MissingExitWeightsError,
    UnknownExitError,
    UnsupportedArchitectureError,
)

MODE = VocabularyProjectionMode


def test_contrast_string_with_original_upper_parses():
    cfg = MultiExitConfiguration(use_original_head="False", contrast_layer_indices="original;12")
    assert cfg.contrast_layer_indices == ("original", 12)
    assert cfg.required_exits == ("original", 12)


def test_contrast_string_of_two_layers_parses():
    assert MultiExitConfiguration(use_original_head=False, contrast_layer_indices="24;12").contrast_layer_indices \
        == (24, 12)


@pytest.mark.parametrize("text,value", [("True", True), ("False", False), ("true", True), (" false ", False)])
def test_boolean_strings_parse(text, value):
    cfg = MultiExitConfiguration(freeze_parameters=text, use_original_head=text, output_layer_index=None
                                 if value else 3)
    assert cfg.freeze_parameters is value and cfg.use_original_head is value


@pytest.mark.parametrize("name", [m.name for m in MODE])
def test_mode_names_parse(name):
    assert MultiExitConfiguration(vocab_projection_mode=name).vocab_projection_mode is MODE[name]


def test_exit_list_string_parses():
    assert MultiExitConfiguration(lm_head_layer_indices="2;4;6").lm_head_layer_indices == (2, 4, 6)


def test_unknown_mode_name_is_named_in_the_error():
    with pytest.raises(ConfigurationError, match="unknown vocab_projection_mode 'SHARED'"):
        MultiExitConfiguration(vocab_projection_mode="SHARED")


def test_non_boolean_string_is_refused():
    with pytest.raises(ConfigurationError, match="use_original_head must be True or False"):
        MultiExitConfiguration(use_original_head="yes please")


def test_contrast_with_use_original_head_is_a_contradiction():
    with pytest.raises(ConfigurationError, match="use_original_head=True.*contrast_layer_indices"):
        MultiExitConfiguration(use_original_head=True, contrast_layer_indices="24;12")


@pytest.mark.parametrize("contrast", ["12;24", "12;12"])
def test_lower_exit_not_below_upper_is_refused(contrast):
    with pytest.raises(ConfigurationError, match="lower exit of a contrast must be below the upper"):
        MultiExitConfiguration(use_original_head=False, contrast_layer_indices=contrast)


def test_original_as_lower_exit_is_refused():
    with pytest.raises(ConfigurationError, match="'original' can only be the upper exit"):
        MultiExitConfiguration(use_original_head=False, contrast_layer_indices="12;original")


def test_contrast_needs_exactly_two_exits():
    with pytest.raises(ConfigurationError, match="exactly two exits"):
        MultiExitConfiguration(use_original_head=False, contrast_layer_indices="24;12;6")


def test_exit_that_is_not_a_number_is_refused():
    with pytest.raises(ConfigurationError, match="'top' is not a layer index"):
        MultiExitConfiguration(use_original_head=False, output_layer_index="top")


def test_negative_exit_is_refused():
    with pytest.raises(ConfigurationError, match="exit index -1 is negative"):
        MultiExitConfiguration(lm_head_layer_indices=(-1, 4))


def test_use_original_head_false_needs_an_exit_or_a_contrast():
    with pytest.raises(ConfigurationError, match="needs output_layer_index"):
        MultiExitConfiguration(use_original_head=False)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ConfigurationError, match="alpha"):
        MultiExitConfiguration(alpha=alpha)


def test_minimum_candidates_below_one_is_refused():
    with pytest.raises(ConfigurationError, match="minimum_candidates"):
        MultiExitConfiguration(minimum_candidates=0)


# -- errors that need a checkpoint (tiny models) ---------------------------------------------------


def test_exit_the_checkpoint_lacks_is_an_unknown_exit_error(tiny_checkpoint):
    from autocontrast.models.auto import AutoMultiExitModel

    path = tiny_checkpoint("llama", MODE.SHARED_PROJECTION_CAST_OUTPUTS)  # exits 1, 2, 3 (+ the top, 4)
    cfg = MultiExitConfiguration(vocab_projection_mode=MODE.SHARED_PROJECTION_CAST_OUTPUTS,
                                 use_original_head=False, contrast_layer_indices="4;0")
    with pytest.raises(UnknownExitError, match=r"exit 0 is not available; this model has exits: 1, 2, 3, 4"):
        AutoMultiExitModel.from_pretrained(path, multi_exit_config=cfg)


def test_exit_above_the_top_layer_is_out_of_range(tiny_checkpoint):
    from autocontrast.models.auto import AutoMultiExitModel

    path = tiny_checkpoint("gpt2", MODE.SHARED_PROJECTION_DIRECT)
    cfg = MultiExitConfiguration(vocab_projection_mode=MODE.SHARED_PROJECTION_DIRECT, use_original_head=False,
                                 output_layer_index=5)
    with pytest.raises(UnknownExitError, match=r"exit 5 is outside 0\.\.4"):
        AutoMultiExitModel.from_pretrained(path, multi_exit_config=cfg)


def test_new_exit_list_beyond_the_top_layer_is_out_of_range(tiny_checkpoint):
    from autocontrast.models.auto import AutoMultiExitModel

    path = tiny_checkpoint("gpt2", MODE.SHARED_PROJECTION_DIRECT)
    cfg = MultiExitConfiguration(vocab_projection_mode=MODE.SHARED_PROJECTION_DIRECT, lm_head_layer_indices=(2, 9))
    with pytest.raises(UnknownExitError, match=r"exit 9 is outside 0\.\.4"):
        AutoMultiExitModel.from_pretrained(path, multi_exit_config=cfg)


def test_layer_specific_checkpoint_without_head_weights_is_refused(tiny_checkpoint):
    from autocontrast.models.auto import AutoMultiExitModel

    path = tiny_checkpoint("llama", MODE.SHARED_PROJECTION_DIRECT)  # lm_head_layer_indices but no head weights
    with pytest.raises(MissingExitWeightsError, match=r"no weights for 4 exit module.*name_to_lm_exit_head\.lm_head_"):
        AutoMultiExitModel.from_pretrained(path, MultiExitConfiguration(vocab_projection_mode=MODE.LAYER_SPECIFIC_PROJECTION))


def test_unsupported_architecture_is_named():
    from transformers import BertConfig

    from autocontrast.models.auto import AutoMultiExitModel

    with pytest.raises(UnsupportedArchitectureError, match="model_type 'bert' has no multi-exit support"):
        AutoMultiExitModel.from_config(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                  intermediate_size=64))


def test_configuration_for_mode_builds_each_mode_with_the_shared_defaults():
    from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, configuration_for_mode

    assert configuration_for_mode("original") == MultiExitConfiguration()
    assert configuration_for_mode("exit", "12").required_exits == (12,)
    contrast = configuration_for_mode("contrast", "original,12")
    assert contrast.required_exits == ("original", 12)
    assert (contrast.alpha, contrast.minimum_candidates) == (DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES)


@pytest.mark.parametrize("mode,exits,message", [("original", "12", "mode original"), ("exit", None, "one exit"),
                                                ("contrast", "30", "two exits"), ("beam", None, "unknown mode")])
def test_configuration_for_mode_refuses_what_does_not_fit(mode, exits, message):
    from autocontrast.config import configuration_for_mode

    with pytest.raises(ConfigurationError, match=message):
        configuration_for_mode(mode, exits)

