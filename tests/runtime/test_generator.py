"""Generator behaviour on a real exported tiny bundle: batching, streaming, sampling, stopping,
threads and the KV cache. (Token parity with PyTorch is in test_tiny_parity / test_smollm2.)"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.runtime import GenerationParams
from autocontrast.runtime.kv_cache import KVCache
from tests.runtime.conftest import CONTRAST

ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea", "Hi", "1, 2, 3,"]


@pytest.mark.parametrize("config", [MultiExitConfiguration(), ACD], ids=["original", "contrast"])
def test_batch_equals_one_by_one(llama_generator, config):
    batch = llama_generator.generate(PROMPTS, multi_exit=config, max_new_tokens=10, ignore_eos=True)
    single = [llama_generator.generate(p, multi_exit=config, max_new_tokens=10, ignore_eos=True) for p in PROMPTS]
    assert batch.token_ids == [s.token_ids[0] for s in single]
    assert batch.texts == [s.text for s in single]


def test_each_row_stops_on_its_own(llama_generator):
    # Make a token row 0 emits (and row 1 never does) a stop id: row 0 stops at its first occurrence,
    # row 1 runs to max_new_tokens unchanged.
    free = llama_generator.generate(PROMPTS[:2], multi_exit=ACD, max_new_tokens=8, ignore_eos=True)
    at = next(i for i, t in enumerate(free.token_ids[0]) if i > 0 and t not in free.token_ids[1])
    stop = free.token_ids[0][at]
    first = free.token_ids[0].index(stop)
    stopped = llama_generator.generate(PROMPTS[:2], multi_exit=ACD, max_new_tokens=8, ignore_eos=True,
                                       stop_token_ids=(stop,))
    assert stopped.token_ids[0] == free.token_ids[0][:first + 1]
    assert stopped.finish_reasons == ["eos", "length"]
    assert stopped.token_ids[1] == free.token_ids[1]


def test_streaming_equals_non_streaming(llama_generator):
    for config in (MultiExitConfiguration(), ACD):
        whole = llama_generator.generate(PROMPTS[1], multi_exit=config, max_new_tokens=16)
        assert "".join(llama_generator.stream(PROMPTS[1], multi_exit=config, max_new_tokens=16)) == whole.text


def test_streaming_with_a_stop_string_ends_before_it(llama_generator):
    whole = llama_generator.generate(PROMPTS[1], multi_exit=ACD, max_new_tokens=16, ignore_eos=True)
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
    cut = llama_generator.generate(PROMPTS[1], multi_exit=ACD, max_new_tokens=16, ignore_eos=True,
                                   stop_strings=(stop,))
    assert cut.finish_reasons == ["stop_string"]
    assert cut.text == whole.text[:whole.text.find(stop)]
    streamed = "".join(llama_generator.stream(PROMPTS[1], multi_exit=ACD, max_new_tokens=16, ignore_eos=True,
                                              stop_strings=(stop,)))
    assert streamed == cut.text


def test_seeded_sampling_repeats_and_seeds_differ(llama_generator):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    first = llama_generator.generate(PROMPTS, params, multi_exit=ACD)
    again = llama_generator.generate(PROMPTS, params, multi_exit=ACD)
    other = llama_generator.generate(PROMPTS, params, multi_exit=ACD, seed=8)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_sampling_with_top_k_one_is_greedy(llama_generator):
    greedy = llama_generator.generate(PROMPTS[0], multi_exit=ACD, max_new_tokens=8, ignore_eos=True)
    top1 = llama_generator.generate(PROMPTS[0], multi_exit=ACD, max_new_tokens=8, ignore_eos=True,
                                    temperature=0.8, top_k=1, seed=3)
    assert top1.token_ids == greedy.token_ids


def test_eight_threads_sharing_one_generator_get_the_sequential_results(llama_generator):
    configs = [MultiExitConfiguration(), ACD, MultiExitConfiguration(use_original_head=False, output_layer_index=2)]
    jobs = [(PROMPTS[i % len(PROMPTS)], configs[i % len(configs)]) for i in range(16)]
    sequential = [llama_generator.generate(p, multi_exit=c, max_new_tokens=12, ignore_eos=True).token_ids
                  for p, c in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda job: llama_generator.generate(job[0], multi_exit=job[1], max_new_tokens=12,
                                                                      ignore_eos=True).token_ids, jobs))
    assert threaded == sequential


def test_timings_cover_every_token(llama_generator):
    result = llama_generator.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True)
    assert len(result.token_ids[0]) == 6
    assert result.timings.ttft_s > 0 and len(result.timings.step_s) == 5


def test_token_ids_as_input_equal_text_input(llama_generator):
    ids = llama_generator.encode(PROMPTS[0])
    assert llama_generator.generate(ids, max_new_tokens=6).token_ids == \
        llama_generator.generate(PROMPTS[0], max_new_tokens=6).token_ids


def test_chat_template_is_applied(llama_generator):
    ids = llama_generator.encode("Hello there", chat=True)
    text = llama_generator.tokenizer.decode(ids, skip_special_tokens=False)
    assert "Hello there" in text and text != "Hello there"
    assert text.rstrip().endswith("assistant")  # the generation prompt of the SmolLM2 template


def test_kv_cache_rewind_replays_the_same_logits(llama_generator):
    session = llama_generator.session(llama_generator.mode(ACD).graph)
    ids = np.array([llama_generator.encode(PROMPTS[1])], dtype=np.int64)  # (1, seq)
    n = ids.shape[1]
    cache = KVCache(llama_generator.manifest.kv_cache, 1)
    first = session.step(ids[:, :n - 2], np.ones((1, n - 2), np.int64), np.arange(n - 2)[None], cache)
    after = session.step(ids[:, n - 2:n - 1], np.ones((1, n - 1), np.int64), np.array([[n - 2]]), cache)
    assert cache.length == n - 1
    cache.rewind_to(n - 2)
    replay = session.step(ids[:, n - 2:n - 1], np.ones((1, n - 1), np.int64), np.array([[n - 2]]), cache)
    np.testing.assert_allclose(replay.exit_logits, after.exit_logits, rtol=0, atol=1e-6)
    assert first.exit_logits.shape[:2] == (1, len(llama_generator.mode(ACD).graph.exits))
