"""T5 (encoder-decoder) bundles through the runtime: greedy tokens equal the project's PyTorch T5
(`generate()`) in every projection mode and decoding mode, with the fused and the NumPy contrast and
with min_new_tokens; batches, streaming, sampling and the stepping API behave as for decoder-only
bundles (rows joining, leaving and rewinding carry their cross-attention KV along)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import BundleError
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.runtime import Generator
from tests.runtime.conftest import CONTRAST
from tests.runtime.test_tiny_parity import MODES as DECODER_MODES
from tests.runtime.test_tiny_parity import NEW_TOKENS, PROMPTS

# the decoder-only parity tests' prompts and modes (but alpha 0), so both families answer the same questions
MODES = {name: fields for name, fields in DECODER_MODES.items() if name != "contrast_alpha0"}
ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)


def _torch_tokens(checkpoint, projection, fields: dict, prompt_ids: list[int], **generate_args) -> list[int]:
    """The PyTorch T5's greedy `generate()` tokens after the decoder start token."""
    config = MultiExitConfiguration(vocab_projection_mode=projection, **fields)
    model = AutoMultiExitModel.from_pretrained(str(checkpoint), config)
    ids = torch.tensor([prompt_ids])
    generate_args = {"eos_token_id": 2, **generate_args}
    with torch.no_grad():
        # an explicit cache: transformers 4.57's generate() sizes its own by the encoder's depth (2), not the decoder's
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                             **generate_args)
    assert out[0, 0].item() == model.config.decoder_start_token_id
    return out[0, 1:].tolist()


@pytest.fixture(scope="module")
def t5_generator(tiny_bundle):
    return Generator(tiny_bundle("t5", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION, fuse_contrast=CONTRAST))


@pytest.mark.parametrize("projection", tuple(VocabularyProjectionMode), ids=lambda m: m.name.lower())
def test_greedy_tokens_equal_pytorch_t5_in_every_mode(projection, tiny_bundle, tiny_checkpoint):
    generator = Generator(tiny_bundle("t5", projection, fuse_contrast=CONTRAST))
    checkpoint = tiny_checkpoint("t5", projection)
    mismatches = []
    for name, fields in MODES.items():
        for prompt in PROMPTS:
            ids = generator.encode(prompt)
            want = _torch_tokens(checkpoint, projection, fields, ids)
            for fused in ((True, False) if name.startswith("contrast") else (True,)):
                got = generator.generate(ids, multi_exit=MultiExitConfiguration(**fields), max_new_tokens=NEW_TOKENS,
                                         fused_contrast=fused).token_ids[0]
                if got != want:
                    mismatches.append(f"{name} fused={fused} {prompt[:12]!r}: runtime {got} != torch {want}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("mode", ["original", "contrast"])
def test_min_new_tokens_and_repetition_penalty_equal_pytorch_t5(mode, t5_generator, tiny_checkpoint):
    projection = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    checkpoint, fields = tiny_checkpoint("t5", projection), MODES[mode]
    ids = t5_generator.encode(PROMPTS[0])
    stop = _torch_tokens(checkpoint, projection, fields, ids, eos_token_id=None)[0]  # what greedy picks first
    want = _torch_tokens(checkpoint, projection, fields, ids, eos_token_id=stop, min_new_tokens=5)
    got = t5_generator.generate(ids, multi_exit=MultiExitConfiguration(**fields), max_new_tokens=NEW_TOKENS,
                                stop_token_ids=(stop,), min_new_tokens=5)
    assert got.token_ids[0] == want and stop not in want[:5]
    assert got.finish_reasons[0] == ("eos" if want[-1] == stop else "length")
    # HF's penalty reads the decoder's tokens (start token first), never the encoder's prompt
    want = _torch_tokens(checkpoint, projection, fields, ids, repetition_penalty=1.5)
    got = t5_generator.generate(ids, multi_exit=MultiExitConfiguration(**fields), max_new_tokens=NEW_TOKENS,
                                repetition_penalty=1.5)
    assert got.token_ids[0] == want


@pytest.mark.parametrize("config", [MultiExitConfiguration(), ACD], ids=["original", "contrast"])
def test_batch_equals_each_row_alone(t5_generator, config):
    prompts = ["Hi", *PROMPTS]  # encoder prompts of different lengths: left-padded together
    batch = t5_generator.generate(prompts, multi_exit=config, max_new_tokens=8)
    alone = [t5_generator.generate(p, multi_exit=config, max_new_tokens=8).token_ids[0] for p in prompts]
    assert batch.token_ids == alone


def test_each_row_stops_on_its_own_and_token_ids_exclude_the_start_token(t5_generator):
    exit_2 = MultiExitConfiguration(use_original_head=False, output_layer_index=2)
    first = t5_generator.generate(PROMPTS[1], multi_exit=exit_2, max_new_tokens=8).token_ids[0]
    stop = first[3]
    out = t5_generator.generate([PROMPTS[1], PROMPTS[0]], multi_exit=exit_2, max_new_tokens=8, stop_token_ids=(stop,))
    assert out.token_ids[0] == first[:first.index(stop) + 1] and out.finish_reasons[0] == "eos"
    assert len(out.token_ids[1]) == 8 or out.token_ids[1][-1] == stop
    assert out.prompt_token_ids[0] == t5_generator.encode(PROMPTS[1])  # the prompt is the encoder's input


def test_streaming_equals_generate_and_stops_before_a_stop_string(t5_generator):
    full = t5_generator.generate(PROMPTS[0], multi_exit=ACD, max_new_tokens=10)
    assert "".join(t5_generator.stream(PROMPTS[0], multi_exit=ACD, max_new_tokens=10)) == full.text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = t5_generator.generate(PROMPTS[0], multi_exit=ACD, max_new_tokens=10, stop_strings=(stop,))
    assert cut.finish_reasons[0] == "stop_string" and stop not in cut.text and full.text.startswith(cut.text)
    assert "".join(t5_generator.stream(PROMPTS[0], multi_exit=ACD, max_new_tokens=10, stop_strings=(stop,))) \
        == cut.text


def test_seeded_sampling_repeats_and_a_batch_row_samples_as_alone(t5_generator):
    sample = dict(temperature=1.5, top_p=0.95, seed=7, max_new_tokens=8)
    once = t5_generator.generate(PROMPTS[0], multi_exit=ACD, **sample).token_ids[0]
    assert t5_generator.generate(PROMPTS[0], multi_exit=ACD, **sample).token_ids[0] == once
    assert t5_generator.generate([PROMPTS[0], PROMPTS[1]], multi_exit=ACD, **sample).token_ids[0] == once
    assert t5_generator.generate(PROMPTS[0], multi_exit=ACD, **{**sample, "seed": 8}).token_ids[0] != once


def test_a_row_joining_a_running_batch_and_rows_leaving_give_the_tokens_of_rows_alone(t5_generator):
    alone = {p: t5_generator.generate(p, max_new_tokens=10).token_ids[0] for p in ("Hi", *PROMPTS)}
    stepper = t5_generator.stepper()
    short = stepper.add("Hi", max_new_tokens=3)  # leaves after 3 tokens, from in front of the other row
    first = stepper.add(PROMPTS[1], max_new_tokens=10)
    for _ in range(4):
        stepper.step()
    late = stepper.add(PROMPTS[0], max_new_tokens=10)  # joins a batch with a longer encoder prompt
    while not stepper.done:
        stepper.step()
    assert stepper.row(first).token_ids == alone[PROMPTS[1]]
    assert stepper.row(short).token_ids == alone["Hi"][:3]
    assert stepper.row(late).token_ids == alone[PROMPTS[0]]


def test_rewinding_a_row_regenerates_the_same_tokens_and_logits(t5_generator):
    stepper = t5_generator.stepper(ACD)
    row = stepper.add(PROMPTS[0], max_new_tokens=6)
    other = stepper.add(PROMPTS[1], max_new_tokens=6)
    logits = []  # logits[i]: the step's exit logits that chose token i
    while not stepper.row(row).done:
        stepper.step()
        logits.append(stepper.exit_logits(row))
    tokens, prompt = list(stepper.row(row).token_ids), len(stepper.row(row).prompt_ids)
    for keep in (3, 0):  # within the generated tokens, then back to the bare prompt (the start token again)
        stepper.rewind_to(row, prompt + keep)
        stepper.step()
        assert stepper.row(row).token_ids == tokens[:keep + 1]
        assert abs(stepper.exit_logits(row) - logits[keep]).max() < 1e-4
    while not stepper.done:
        stepper.step()
    assert stepper.row(row).token_ids == tokens and len(stepper.row(other).token_ids) == 6


def test_rewinding_into_the_prompt_encodes_the_shorter_prompt(t5_generator):
    ids = t5_generator.encode(PROMPTS[1])
    shorter = t5_generator.generate(ids[:4], max_new_tokens=5).token_ids[0]
    stepper = t5_generator.stepper()
    row = stepper.add(ids, max_new_tokens=5)
    stepper.step()
    stepper.step()
    stepper.rewind_to(row, 4)
    while not stepper.done:
        stepper.step()
    assert stepper.row(row).prompt_ids == ids[:4] and stepper.row(row).token_ids == shorter


def test_scoring_token_sequences_needs_a_decoder_only_bundle(t5_generator):
    with pytest.raises(BundleError, match="decoder-only bundle"):
        t5_generator.exit_logits_all_positions([[5, 6, 7]], ["original"])


def test_t5_bundle_generates_without_torch(tiny_bundle):
    import subprocess
    import sys
    import textwrap

    from tests.runtime.test_torch_free import BLOCKER

    bundle = tiny_bundle("t5", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT, fuse_contrast=CONTRAST)
    script = BLOCKER + textwrap.dedent(f"""
        from autocontrast.config import MultiExitConfiguration
        from autocontrast.runtime import Generator
        gen = Generator({str(bundle)!r})
        acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(3, 1))
        print(len(gen.generate(["Hello", "Hi there"], multi_exit=acd, max_new_tokens=4, ignore_eos=True).token_ids[1]))
        assert not any(m.split(".")[0] in ("torch", "transformers", "optimum") for m in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4"]


def test_t5_prompts_join_whole_under_a_step_budget(t5_generator):
    # an encoder reads its prompt in one pass: a budget or a prefix cache leaves a T5 stepper unchunked
    from autocontrast.runtime.prefix_cache import PrefixCache

    stepper = t5_generator.stepper(max_step_tokens=2, prefix_cache=PrefixCache(1 << 20))
    assert not stepper.chunked and stepper.prefix_cache is None
    rows = [stepper.add(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    stepper.step()
    assert not stepper.prefilling  # every prompt joined in the first step
    while not stepper.done:
        stepper.step()
    for row, prompt in zip(rows, PROMPTS, strict=True):
        assert stepper.row(row).token_ids == t5_generator.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids[0]
