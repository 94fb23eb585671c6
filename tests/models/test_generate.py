"""Multi-exit models inside Hugging Face generate(): greedy, sampling and beam search in contrast mode.

Each mode is checked against the model's own full-sequence forward (no KV cache), so a cache,
slicing or logits-processor mistake in the generate path shows up as a different token or score.
"""

from __future__ import annotations

import pytest
import torch

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.models.contrast import calculate_contrasted_logits
from tests.tiny_models import NUM_LAYERS, make_tiny_model, tiny_config

NEW = 8
PROMPT = torch.tensor([[5, 17, 411, 427, 88], [31, 128, 9, 77, 300]])  # ids within the tiny vocabulary


def _tiny_t5(**mec_fields):
    """The tiny T5 with as many encoder as decoder layers: transformers 4.57's generate() sizes T5's
    self-attention cache by the encoder depth, so a deeper decoder fails there even without exits."""
    torch.manual_seed(0)
    config = tiny_config("t5")
    config.num_layers = NUM_LAYERS
    mec = MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION,
                                 lm_head_layer_indices=(1, 2, 3, 4), **mec_fields)
    model = AutoMultiExitModel.from_config(config, mec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("name_to_lm_exit_head"):
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "t5"])
def contrast_model(request):
    fields = dict(use_original_head=False, contrast_layer_indices=(4, 2))
    if request.param == "t5":
        model = _tiny_t5(**fields)
    else:
        model = make_tiny_model("llama", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION, **fields)
    model.generation_config.eos_token_id = None  # fixed-length outputs: every step is compared
    return model


def _generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                              pad_token_id=0, **kwargs)


def _new_tokens(model, sequences: torch.Tensor) -> torch.Tensor:
    return sequences if model.config.is_encoder_decoder else sequences[:, PROMPT.shape[1]:]


def _step_scores(model, generated: torch.Tensor) -> torch.Tensor:
    """Contrast log-probabilities of each generated token, full forward without cache: (batch, NEW)."""
    prompt = PROMPT.repeat_interleave(generated.shape[0] // PROMPT.shape[0], dim=0)  # beams: one row each
    with torch.no_grad():
        if model.config.is_encoder_decoder:  # generated starts with the decoder start token
            logits = model(input_ids=prompt, decoder_input_ids=generated[:, :-1]).logits
            targets = generated[:, 1:]
        else:
            logits = model(input_ids=generated[:, :-1]).logits[:, PROMPT.shape[1] - 1:]
            targets = generated[:, PROMPT.shape[1]:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _manual_greedy(model) -> torch.Tensor:
    if model.config.is_encoder_decoder:
        seq = torch.full((PROMPT.shape[0], 1), model.config.decoder_start_token_id)
    else:
        seq = PROMPT
    for _ in range(NEW):
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                logits = model(input_ids=PROMPT, decoder_input_ids=seq).logits
            else:
                logits = model(input_ids=seq).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_greedy_generate_equals_a_manual_argmax_loop_over_the_contrast(contrast_model):
    torch.testing.assert_close(_generate(contrast_model, do_sample=False), _manual_greedy(contrast_model))


def test_greedy_contrast_differs_from_greedy_with_the_original_head(contrast_model):
    contrast = _generate(contrast_model, do_sample=False)
    contrast_model.multi_exit_config = contrast_model.multi_exit_config.replace(
        use_original_head=True, contrast_layer_indices=None)
    try:
        original = _generate(contrast_model, do_sample=False)
    finally:
        contrast_model.multi_exit_config = contrast_model.multi_exit_config.replace(
            use_original_head=False, contrast_layer_indices=(4, 2))
    assert not torch.equal(contrast, original)


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(contrast_model):
    torch.manual_seed(0)
    first = _generate(contrast_model, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(0)
    second = _generate(contrast_model, do_sample=True, top_k=0, temperature=1.0)
    torch.testing.assert_close(first, second)
    torch.manual_seed(1)
    top1 = _generate(contrast_model, do_sample=True, top_k=1)
    torch.testing.assert_close(top1, _generate(contrast_model, do_sample=False))


def test_sampled_tokens_have_nonzero_contrast_probability(contrast_model):
    torch.manual_seed(2)
    sampled = _generate(contrast_model, do_sample=True, top_k=0)
    assert torch.isfinite(_step_scores(contrast_model, sampled)).all()


def test_beam_search_scores_are_sums_of_contrast_log_probabilities(contrast_model):
    out = _generate(contrast_model, num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False,
                    output_scores=True, return_dict_in_generate=True)
    sums = _step_scores(contrast_model, out.sequences).sum(-1)
    torch.testing.assert_close(out.sequences_scores, sums, rtol=1e-4, atol=1e-4)
    best = out.sequences_scores.view(PROMPT.shape[0], 3)
    assert (best[:, 0] >= best[:, 1]).all()  # returned best first


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy_here(contrast_model):
    greedy = _step_scores(contrast_model, _generate(contrast_model, do_sample=False)).sum(-1)
    beams = _generate(contrast_model, num_beams=4, length_penalty=0.0, output_scores=True,
                      return_dict_in_generate=True)
    assert (beams.sequences_scores >= greedy - 1e-4).all()


def test_custom_contrast_function_replaces_the_standard_contrast(contrast_model):
    calls = []

    def difference(upper, lower):
        calls.append(upper.shape)
        return upper - 2 * lower

    inputs = {"input_ids": PROMPT}
    if contrast_model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = PROMPT[:, :3]
    mec = contrast_model.multi_exit_config
    by_exit = {}
    try:
        for exit_ in (4, 2):
            contrast_model.multi_exit_config = mec.replace(contrast_layer_indices=None, output_layer_index=exit_)
            with torch.no_grad():
                by_exit[exit_] = contrast_model(**inputs).logits
        contrast_model.multi_exit_config = mec.replace(contrast_function=difference)
        with torch.no_grad():
            custom = contrast_model(**inputs).logits
    finally:
        contrast_model.multi_exit_config = mec
    assert calls, "the custom contrast function was never called"
    torch.testing.assert_close(custom, by_exit[4] - 2 * by_exit[2])
    standard = calculate_contrasted_logits(by_exit[4], by_exit[2])
    assert not torch.allclose(custom, standard)
