"""Prompts that join over several steps (a token budget per step) and prompts that start from a stored
prefix give the PyTorch model's greedy tokens, in both KV layouts, while running rows keep decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import GenerationParameterError
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.runtime import Generator
from autocontrast.runtime.prefix_cache import PrefixCache
from autocontrast.runtime.step_plan import (
    IDLE_STEP_TOKENS,
    MIN_CHUNK_TOKENS,
    PAST_PER_TOKEN_PER_HIDDEN,
    PROMPT_TOKENS_PER_DECODE_ROW,
    Pending,
    PromptChunk,
    chunk_cost,
    past_entries_per_token,
    plan_step,
)
from tests.runtime.conftest import CONTRAST

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
HEADER = "A few facts, one per line. The capital of France is Paris. The river of Paris is the Seine. " * 2
PROMPTS = [HEADER + "The capital of Italy is", HEADER + "Once upon a time", "Hi there", HEADER]
N = 8


def _torch(checkpoint, config: MultiExitConfiguration, ids: list[int]) -> list[int]:
    model = AutoMultiExitModel.from_pretrained(str(checkpoint), config.replace(vocab_projection_mode=DIRECT))
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False,
                             eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def _run(stepper) -> None:
    while not stepper.done:
        stepper.step()


def _run_rows(stepper, rows: list[int]) -> None:
    while not all(stepper.row(r).done for r in rows):
        stepper.step()


# -- the plan -------------------------------------------------------------------------------------


def test_decode_rows_come_first_and_prompts_get_what_the_budget_leaves():
    plan = plan_step([0, 1, 2], [Pending(3, 0, 100), Pending(4, 0, 10)], budget=64)
    assert plan.decode == (0, 1, 2)
    assert plan.chunks == (PromptChunk(3, 0, 61, final=False),)
    assert plan.tokens == 64
    nxt = plan_step([0, 1, 2], [Pending(3, 61, 100), Pending(4, 0, 10)], budget=64)
    assert nxt.chunks == (PromptChunk(3, 61, 100, final=True), PromptChunk(4, 0, 10, final=True))


def test_joining_prompts_progress_however_many_rows_decode():
    plan = plan_step([0], [Pending(1, 0, 500)], budget=8)
    assert plan.chunks == (PromptChunk(1, 0, MIN_CHUNK_TOKENS, final=False),)
    plan = plan_step(list(range(100)), [Pending(100, 0, 5000)], budget=64)  # a big batch allows a bigger chunk
    assert plan.chunks == (PromptChunk(100, 0, 100 * PROMPT_TOKENS_PER_DECODE_ROW, final=False),)


def test_with_no_row_decoding_prompts_get_the_idle_budget():
    plan = plan_step([], [Pending(0, 0, 5000)], budget=64)
    assert plan.chunks == (PromptChunk(0, 0, IDLE_STEP_TOKENS, final=False),)


def test_beside_decoding_rows_a_chunk_is_charged_its_attention_to_the_entries_before_it():
    # 64 tokens after 1,000 entries at 2,000 entries a token: 64 * (1 + (1000 + 31.5) / 2000)
    assert chunk_cost(64, 1000, 2000) == pytest.approx(64 * (1 + 1031.5 / 2000))
    assert chunk_cost(64, 1000, None) == 64
    early = plan_step([0, 1, 2, 3], [Pending(9, 0, 5000)], budget=84, past_per_token=2000).chunks[0]
    late = plan_step([0, 1, 2, 3], [Pending(9, 2000, 5000)], budget=84, past_per_token=2000).chunks[0]
    assert early.tokens == 78  # 78 * (1 + 38.5 / 2000) = 79.5 fits the 80 left; 79 tokens would cost 80.5
    assert late.tokens == 39  # 39 * (1 + 2019 / 2000) = 78.4; 40 tokens would cost 80.4
    for chunk in (early, late):
        assert chunk_cost(chunk.tokens, chunk.start, 2000) <= 80 < chunk_cost(chunk.tokens + 1, chunk.start, 2000)
    second = plan_step([0], [Pending(8, 1000, 1010), Pending(9, 0, 500)], budget=41, past_per_token=2000).chunks
    # the first costs 10 * (1 + 1004.5 / 2000) = 15.0 of the 40 left; the second gets 24 (24.1 of the 25.0 left)
    assert second == (PromptChunk(8, 1000, 1010, final=True), PromptChunk(9, 0, 24, final=False))


def test_idle_steps_and_token_only_plans_ignore_the_past():
    idle = plan_step([], [Pending(9, 3000, 9000)], budget=64, past_per_token=2000)
    assert idle.chunks[0].tokens == IDLE_STEP_TOKENS  # no stream's pace to keep: the fewest reads of the weights
    plain = plan_step([0], [Pending(9, 3000, 9000)], budget=64, past_per_token=None)
    assert plain.chunks[0].tokens == 63
    tiny = plan_step([0], [Pending(9, 10 ** 6, 2 * 10 ** 6)], budget=64, past_per_token=10)
    assert tiny.chunks[0].tokens == 1  # however far in, a joining prompt moves


def test_the_stepper_charges_attention_by_the_models_hidden_size(generator):
    stepper = generator.stepper(max_step_tokens=64)
    assert stepper.past_per_token == past_entries_per_token(generator.manifest.hidden_size)
    assert past_entries_per_token(576) == PAST_PER_TOKEN_PER_HIDDEN * 576


def test_no_budget_prefills_every_prompt_whole():
    plan = plan_step([0], [Pending(1, 0, 5000), Pending(2, 3, 9)], budget=None)
    assert plan.chunks == (PromptChunk(1, 0, 5000, final=True), PromptChunk(2, 3, 9, final=True))


# -- the prefix cache -------------------------------------------------------------------------------


def _entries(length: int, fill: float = 0.0) -> list[np.ndarray]:
    return [np.full((2, length, 4), fill, dtype=np.float32) for _ in range(4)]  # (kv_heads, length, head_dim)


def test_lookup_returns_the_longest_shared_prefix_but_never_the_whole_prompt():
    cache = PrefixCache(1 << 20, min_tokens=4)
    cache.put(list(range(10)), _entries(10, 1.0))
    cache.put(list(range(6)) + [99, 98], _entries(8, 2.0))
    length, seed = cache.lookup(list(range(9)) + [50])
    assert length == 9 and seed[0].shape == (2, 9, 4) and float(seed[0][0, 0, 0]) == 1.0
    assert cache.lookup(list(range(10)))[0] == 9  # one token is left to compute the first token's logits
    assert cache.lookup([7, 7, 7, 7, 7]) == (0, None)
    assert cache.lookup(list(range(3)) + [42])[0] == 0  # below min_tokens
    assert cache.stats.hits == 2 and cache.stats.misses == 2 and cache.stats.tokens_reused == 18


def test_the_cache_stays_within_its_bytes_least_recently_used_out():
    one = sum(e.nbytes for e in _entries(10))
    cache = PrefixCache(2 * one, min_tokens=4)
    cache.put([1] * 10, _entries(10))
    cache.put([2] * 10, _entries(10))
    cache.lookup([1] * 10 + [3])  # [1]*10 is now the most recently used
    cache.put([3] * 10, _entries(10))
    assert cache.bytes <= 2 * one and len(cache) == 2
    assert cache.lookup([2] * 10 + [3]) == (0, None) and cache.lookup([1] * 10 + [3])[0] == 10


def test_views_are_counted_by_the_storage_they_keep_alive():
    cache = PrefixCache(1 << 20, min_tokens=4)
    block = np.zeros((4, 2, 64, 4), dtype=np.float32)  # a row's buffer of 64 columns, 10 of them used
    cache.put(list(range(10)), [a[:, :10] for a in block])
    assert cache.bytes == block.nbytes


def test_a_longer_prompt_replaces_the_stored_prefixes_it_covers():
    cache = PrefixCache(1 << 20, min_tokens=4)
    cache.put(list(range(8)), _entries(8))
    cache.put(list(range(12)), _entries(12))
    assert len(cache) == 1 and cache.bytes == sum(e.nbytes for e in _entries(12))


# -- the stepper ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(None, None), ("concat", None), (None, True)],
                ids=["buffer", "concat", "buffer-mixed-step"])
def generator(request, tiny_bundle):
    layout, mixed = request.param
    return Generator(tiny_bundle("llama", DIRECT, fuse_contrast=CONTRAST, kv_layout=layout, mixed_step=mixed))


@pytest.mark.parametrize("config", [MultiExitConfiguration(), ACD], ids=["original", "contrast"])
@pytest.mark.parametrize("budget", [3, 16])
def test_chunked_and_prefix_seeded_prompts_give_pytorchs_tokens(generator, plain_llama, config, budget):
    cache = PrefixCache(64 << 20, min_tokens=8)
    stepper = generator.stepper(config, max_step_tokens=budget, prefix_cache=cache)
    assert stepper.chunked
    runner = stepper.add("Hi there", max_new_tokens=400, ignore_eos=True)  # decoding: the budget applies
    stepper.step()
    ids = [generator.encode(p) for p in PROMPTS]
    first = [stepper.add(i, max_new_tokens=N, ignore_eos=True) for i in ids]
    assert stepper.plan().chunks[0].stop < len(ids[0])  # the first prompt joins in chunks
    _run_rows(stepper, first)
    again = [stepper.add(i, max_new_tokens=N, ignore_eos=True) for i in ids]  # the header is stored now
    _run_rows(stepper, again)
    assert not stepper.row(runner).done
    assert cache.stats.tokens_reused >= 3 * len(generator.encode(HEADER)) - 3
    for prompt, a, b in zip(ids, first, again, strict=True):
        want = _torch(plain_llama, config, prompt)
        assert stepper.row(a).token_ids == want and stepper.row(b).token_ids == want


def test_running_rows_gain_a_token_every_step_while_a_long_prompt_joins(generator):
    stepper = generator.stepper(max_step_tokens=4)
    runners = [stepper.add(p, max_new_tokens=40, ignore_eos=True) for p in ("Hi there", "One two")]
    while stepper.prefilling:
        stepper.step()
    long_row = stepper.add(HEADER * 2, max_new_tokens=2, ignore_eos=True)
    steps = 0
    while long_row in stepper.prefilling:
        plan = stepper.plan()
        assert plan.tokens <= max(4, len(runners) + MIN_CHUNK_TOKENS)
        events = stepper.run(plan)
        assert set(runners) <= {e.row for e in events}  # no stream waits for the long prompt
        steps += 1
    assert steps > 1  # it joined over several steps
    _run(stepper)
    alone = generator.generate(HEADER * 2, max_new_tokens=2, ignore_eos=True).token_ids[0]
    assert stepper.row(long_row).token_ids == alone


def test_with_a_mixed_step_graph_the_decode_step_and_a_chunk_are_one_call(generator, monkeypatch):
    from autocontrast.runtime.session import ExitSession

    stepper = generator.stepper(ACD, max_step_tokens=8)
    if stepper.mixed is None:
        pytest.skip("the bundle has no mixed-step graph")
    calls = []
    for method in ("step", "step_mixed"):
        original = getattr(ExitSession, method)
        monkeypatch.setattr(ExitSession, method, lambda self, *a, _m=method, _f=original, **k: (
            calls.append((self.graph.kind, _m)), _f(self, *a, **k))[1])
    runners = [stepper.add(p, max_new_tokens=60, ignore_eos=True) for p in ("Hi there", "One two")]
    stepper.step()
    prompt = generator.encode(HEADER * 2)
    row = stepper.add(prompt, max_new_tokens=3, ignore_eos=True)
    calls.clear()
    joining = 0
    while row in stepper.prefilling:
        stepper.step()
        joining += 1
        assert calls == [("mixed", "step_mixed")], calls  # one pass over the weights for both
        calls.clear()
    assert joining > 1
    _run(stepper)
    alone = generator.generate(prompt, max_new_tokens=3, ignore_eos=True, multi_exit=ACD).token_ids[0]
    assert stepper.row(row).token_ids == alone
    for runner, text in zip(runners, ("Hi there", "One two"), strict=True):
        assert stepper.row(runner).token_ids == generator.generate(text, max_new_tokens=60, ignore_eos=True,
                                                                   multi_exit=ACD).token_ids[0]


def test_a_chunked_prompts_buffer_has_room_for_the_whole_prompt_from_its_first_chunk(generator):
    from autocontrast.runtime.kv_buffer import KVBuffer

    stepper = generator.stepper(max_step_tokens=16)
    stepper.add("Hi there", max_new_tokens=40, ignore_eos=True)  # decoding: the budget applies
    stepper.step()
    prompt = generator.encode(HEADER * 12)
    assert len(prompt) > 256  # past the first capacity step: growing it would copy every layer halfway
    row = stepper.add(prompt, max_new_tokens=1, ignore_eos=True)
    stepper.step()
    cache = stepper._prefills[row].state.cache
    if not isinstance(cache, KVBuffer):
        pytest.skip("a concatenated cache has no capacity")
    assert cache.capacity > len(prompt)
    first = cache.capacity
    while row in stepper.prefilling:
        stepper.step()
        if row in stepper.prefilling:
            assert stepper._prefills[row].state.cache is cache and cache.capacity == first  # never rebuilt
    assert stepper.row(row).token_ids == generator.generate(prompt, max_new_tokens=1, ignore_eos=True).token_ids[0]


def test_a_prompt_rewound_or_dropped_while_it_joins(generator):
    stepper = generator.stepper(max_step_tokens=4)
    stepper.add("Hi there", max_new_tokens=4 * N, ignore_eos=True)  # a decoding row: the budget applies
    stepper.step()
    row = stepper.add(PROMPTS[0], max_new_tokens=N, ignore_eos=True)
    gone = stepper.add(PROMPTS[1], max_new_tokens=N, ignore_eos=True)
    stepper.step()
    assert row in stepper.prefilling and gone in stepper.prefilling
    stepper.drop(gone)
    stepper.rewind_to(row, 5)  # its partial cache is dropped; it prefills its first 5 tokens anew
    _run(stepper)
    ids = generator.encode(PROMPTS[0])[:5]
    assert stepper.row(row).token_ids == generator.generate(ids, max_new_tokens=N, ignore_eos=True).token_ids[0]


def test_a_budget_must_be_positive(generator):
    with pytest.raises(GenerationParameterError, match="max_step_tokens"):
        generator.stepper(max_step_tokens=0)


def _decoding_and_counting_prefills(stepper, monkeypatch) -> list[int]:
    """A row decoding in `stepper` (so its budget applies); returns a list that records the rows of every
    prefill call from then on."""
    stepper.add("Hi there", max_new_tokens=40, ignore_eos=True)
    stepper.step()
    calls: list[int] = []
    kind = type(stepper.state)
    extend = kind.extend
    monkeypatch.setattr(kind, "extend", lambda self, rows, **k: calls.append(len(rows)) or extend(self, rows, **k))
    return calls


def test_short_prompts_joining_in_one_step_are_prefilled_together(generator, plain_llama, monkeypatch):
    from autocontrast.runtime.prefix_cache import held_bytes

    cache = PrefixCache(64 << 20, min_tokens=2)
    stepper = generator.stepper(ACD, max_step_tokens=200, prefix_cache=cache)
    calls = _decoding_and_counting_prefills(stepper, monkeypatch)
    prompts = ["The capital of Italy is", "Once upon a time", "1, 2, 3,"]
    rows = [stepper.add(p, max_new_tokens=N, ignore_eos=True) for p in prompts]
    _run_rows(stepper, rows)
    assert calls == [3]  # one call prefilled the three
    for row, prompt in zip(rows, prompts, strict=True):
        assert stepper.row(row).token_ids == _torch(plain_llama, ACD, generator.encode(prompt))
    grouped = [cache._entries[tuple(generator.encode(p))] for p in prompts]  # rows of a shared state: copies
    assert all(held_bytes(e) == sum(a.nbytes for a in e) for e in grouped)


def test_a_stored_prompt_survives_its_row_rewinding_and_writing_over_its_cache(generator, plain_llama):
    cache = PrefixCache(64 << 20, min_tokens=8)
    stepper = generator.stepper(max_step_tokens=16, prefix_cache=cache)
    ids = generator.encode(PROMPTS[0])
    row = stepper.add(ids, max_new_tokens=N, ignore_eos=True)  # joins an empty batch: its buffer becomes the batch's
    _run(stepper)
    stepper.rewind_to(row, 6)  # back into its prompt: the next steps write over the prompt's columns
    request = stepper.row(row).request  # the one holder of its parameters
    request.params = dataclasses.replace(request.params, max_new_tokens=N + len(ids))
    _run(stepper)
    again = stepper.add(ids, max_new_tokens=N, ignore_eos=True)  # seeded from the stored prompt
    _run(stepper)
    assert cache.stats.hits >= 1 and stepper.row(again).token_ids == _torch(plain_llama, MultiExitConfiguration(), ids)


def test_rows_sharing_a_prompt_are_prefilled_once(generator, plain_llama, monkeypatch):
    stepper = generator.stepper(max_step_tokens=2000)  # room for every prompt in one step
    calls = _decoding_and_counting_prefills(stepper, monkeypatch)
    same = [stepper.add(PROMPTS[0], max_new_tokens=N, ignore_eos=True, temperature=1.0, seed=s) for s in (1, 2, 3)]
    other = stepper.add(PROMPTS[1], max_new_tokens=N, ignore_eos=True)
    _run_rows(stepper, [*same, other])
    assert calls == [2]  # the shared prompt once, the other once, in one call
    for row, seed in zip(same, (1, 2, 3), strict=True):
        alone = generator.generate(PROMPTS[0], max_new_tokens=N, ignore_eos=True, temperature=1.0, seed=seed)
        assert stepper.row(row).token_ids == alone.token_ids[0]
    assert stepper.row(other).token_ids == _torch(plain_llama, MultiExitConfiguration(), generator.encode(PROMPTS[1]))
