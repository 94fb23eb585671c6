"""acd-serve against the official openai client, on loopback: routes, streaming, ACD per request,
continuous batching (concurrent requests equal their text alone), errors in OpenAI's format."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from autocontrast.config import MultiExitConfiguration
from tests.runtime.conftest import CONTRAST, SCHEMA
from tests.serve.conftest import API_KEY, ServerProcess
from tests.tiny_models import MAX_POSITIONS

ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea", "Hi", "1, 2, 3,",
           "A recipe for bread:", "The weather today", "In 1492,", "Dear diary,"]


def _alone(generator, prompt, config=ACD, *, chat=False, tokens=12):
    return generator.generate(prompt, multi_exit=config, max_new_tokens=tokens, chat=chat).text


def test_models_lists_the_bundle(client, llama_bundle):
    assert [m.id for m in client.models.list().data] == [llama_bundle.name]


def test_completion_equals_the_generator_alone(client, generator):
    out = client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == _alone(generator, PROMPTS[0])
    assert out.usage.prompt_tokens == len(generator.encode(PROMPTS[0]))
    assert out.usage.completion_tokens <= 12 and out.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_uses_the_chat_template(client, generator):
    out = client.chat.completions.create(model=generator.bundle_dir.name, max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": PROMPTS[1]}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _alone(generator, PROMPTS[1], chat=True)


def test_streamed_chat_starts_with_the_role_and_ends_with_a_finish_reason(client, generator):
    chunks = list(client.chat.completions.create(model=generator.bundle_dir.name, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": PROMPTS[2]}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _alone(generator, PROMPTS[2], chat=True)


def test_streamed_completion_equals_the_whole_one(client, generator):
    chunks = list(client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[3], max_tokens=12,
                                            temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == _alone(generator, PROMPTS[3])


@pytest.mark.parametrize("fields", [dict(use_original_head=True),
                                    dict(use_original_head=False, output_layer_index=2),
                                    dict(use_original_head=False, contrast_layer_indices=list(CONTRAST), alpha=0.3),
                                    dict(use_original_head=False, dola_layers=[1, 2], relative_top=0.05)],
                         ids=["original", "exit", "contrast_numpy", "dola"])
def test_multi_exit_per_request_through_extra_body(client, generator, fields):
    out = client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[4], max_tokens=12, temperature=0,
                                    extra_body={"multi_exit": fields})
    config = MultiExitConfiguration(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    assert out.choices[0].text == _alone(generator, PROMPTS[4], config)


def test_vllm_extras_and_stop_strings(client, generator):
    whole = _alone(generator, PROMPTS[5], tokens=16)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    out = client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[5], max_tokens=16, temperature=0,
                                    stop=[stop], extra_body={"top_k": 5, "min_tokens": 2, "ignore_eos": True})
    assert out.choices[0].text == whole[:whole.find(stop)] and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client, generator):
    def ask():
        return client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[6], max_tokens=10,
                                         temperature=1.0, top_p=0.9, seed=11).choices[0].text
    assert ask() == ask() == generator.generate(PROMPTS[6], multi_exit=ACD, max_new_tokens=10, temperature=1.0,
                                                top_p=0.9, seed=11).text


def test_sixteen_concurrent_streams_each_equal_their_text_alone(client, generator):
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + i) for i in range(16)]

    def stream(job):
        chunks = client.completions.create(model=generator.bundle_dir.name, prompt=job[0], max_tokens=job[1],
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(stream, jobs))
    expected = [generator.generate(p, multi_exit=ACD, max_new_tokens=n, ignore_eos=True).text for p, n in jobs]
    assert texts == expected


ERRORS = [
    ("temperature of the wrong type", dict(prompt="Hi", temperature="hot"), "temperature"),
    ("n of zero", dict(prompt="Hi", n=0), "n"),
    ("more choices than the limit", dict(prompt=["a", "b", "c"], n=6), "n"),
    ("best_of above n", dict(prompt="Hi", n=2, best_of=3), "best_of"),
    ("negative max_tokens", dict(prompt="Hi", max_tokens=-1), "max_tokens"),
    ("max_tokens beyond the limit", dict(prompt="Hi", max_tokens=10**6), "max_tokens"),
    ("top_p out of range", dict(prompt="Hi", top_p=1.5), "top_p"),
    ("empty prompt", dict(prompt=""), "prompt"),
    ("prompt of floats", dict(prompt=[1.5, 2.5]), "prompt"),
    ("a list holding an empty prompt", dict(prompt=["a", ""]), "prompt"),
    ("over-long prompt", dict(prompt=[5] * (MAX_POSITIONS + 44), max_tokens=8), "prompt"),
    ("unknown exit", dict(prompt="Hi", extra_body={"multi_exit": {"use_original_head": False,
                                                                 "output_layer_index": 9}}), "multi_exit"),
    ("unknown multi_exit field", dict(prompt="Hi", extra_body={"multi_exit": {"layer": 2}}), "multi_exit"),
    ("too many logprobs", dict(prompt="Hi", logprobs=21), "logprobs"),
    ("a penalty out of range", dict(prompt="Hi", presence_penalty=2.5), "presence_penalty"),
    ("logit_bias of a word", dict(prompt="Hi", logit_bias={"hello": 5}), "logit_bias"),
    ("logit_bias beyond 100", dict(prompt="Hi", logit_bias={"5": 500}), "logit_bias"),
    ("stop of the wrong type", dict(prompt="Hi", stop=[1, 2]), "stop"),
    ("negative seed", dict(prompt="Hi", seed=-5), "seed"),
]


@pytest.mark.parametrize("fields,param", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_requests_are_400_in_openai_format_and_the_server_goes_on(client, generator, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=generator.bundle_dir.name, **{"max_tokens": 4, **fields})
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == param
    assert caught.value.body["message"]
    assert client.completions.create(model=generator.bundle_dir.name, prompt="Hi", max_tokens=2).choices


def test_malformed_json_is_400(server):
    response = httpx.post(f"{server.base}/v1/completions", content=b'{"prompt": "Hi",',
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_oversized_body_is_413(server):
    response = httpx.post(f"{server.base}/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


def test_a_request_without_the_api_key_is_401(server):
    bare = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bare.models.list()
    assert httpx.post(f"{server.base}/v1/completions", json={"prompt": "Hi"}).status_code == 401
    assert httpx.get(f"{server.base}/health").status_code == 200  # health needs no key


def test_metrics_are_prometheus_text(client, server, generator):
    client.completions.create(model=generator.bundle_dir.name, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.base}/metrics").text
    for name in ("acd_requests_total", "acd_generated_tokens_total", "acd_queue_depth", "acd_batch_size",
                 "acd_time_to_first_token_seconds_bucket", "acd_time_per_output_token_seconds_bucket"):
        assert name in text
    assert server.metric("acd_generated_tokens_total") >= 3


def test_a_dropped_stream_is_cancelled_and_the_server_goes_idle(server, generator):
    cancelled = server.metric("acd_cancelled_requests_total")
    generated = server.metric("acd_generated_tokens_total")
    # many tokens: the tiny model is fast, and the stream must still be running when the client drops it
    body = {"model": generator.bundle_dir.name, "prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        next(response.iter_lines())  # the first event arrived: generation is under way
    time.sleep(1.0)
    assert server.health()["running"] == 0 and server.health()["queue_depth"] == 0
    assert server.metric("acd_cancelled_requests_total") == cancelled + 1
    assert server.metric("acd_generated_tokens_total") - generated < 1000


@pytest.mark.slow
def test_a_full_queue_is_429_with_retry_after(smollm2_bundle):
    # SmolLM2 (~20 ms a token) keeps the first request running while the queue fills
    small = ServerProcess(smollm2_bundle, "--max-batch", "1", "--max-queue", "1", "--mode", "original")
    try:
        body = {"prompt": PROMPTS[1], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=small.base, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the connection
                assert '"finish_reason": null' in next(lines)
                with http.stream("POST", "/v1/completions", json=body) as queued:
                    assert small.health()["queue_depth"] == 1, small.output()
                    refused = httpx.post(f"{small.base}/v1/completions", json=body, timeout=30)
                    assert refused.status_code == 429
                    assert refused.headers["Retry-After"] == "1"
                    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                    assert queued.status_code == 200
                    events = [line for line in queued.iter_lines() if line.startswith("data: {")]
                    assert '"finish_reason": "length"' in events[-1]  # the queued request was served in full
        assert small.health() == {**small.health(), "status": "ok", "running": 0, "queue_depth": 0}
    finally:
        small.stop()


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits(smollm2_bundle):
    from autocontrast.runtime import Generator

    server = ServerProcess(smollm2_bundle, "--mode", "original")
    body = {"prompt": PROMPTS[0], "max_tokens": 60, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=120) as response:
        stream = response.iter_lines()
        lines = [next(stream)]
        server.proc.terminate()  # SIGTERM mid-stream
        lines = [line for line in lines + list(stream) if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == Generator(smollm2_bundle).generate(
        PROMPTS[0], max_new_tokens=60, ignore_eos=True).text
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base}/health", timeout=2)


def test_the_server_binds_to_loopback_by_default():
    from autocontrast.serve.cli import _parser

    assert _parser().parse_args(["bundle"]).host == "127.0.0.1"


def test_a_server_sharing_one_copy_of_the_weights_answers_every_mode_as_the_generator_does(llama_bundle, generator):
    process = ServerProcess(llama_bundle, "--share-weights")
    try:
        shared = openai.OpenAI(base_url=f"{process.base}/v1", api_key="unused", max_retries=0, timeout=120)
        for fields in (dict(use_original_head=True), dict(use_original_head=False, output_layer_index=2),
                       dict(use_original_head=False, contrast_layer_indices=list(CONTRAST))):
            out = shared.completions.create(model=llama_bundle.name, prompt=PROMPTS[5], max_tokens=12, temperature=0,
                                            extra_body={"multi_exit": fields})
            config = MultiExitConfiguration(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            assert out.choices[0].text == _alone(generator, PROMPTS[5], config), fields
    finally:
        process.stop()


# every request field of OpenAI's API reference (2026-12), per endpoint
COMPLETION_FIELDS = ("model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
                     "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
                     "top_p", "user")
CHAT_FIELDS = ("messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
               "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
               "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort",
               "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
               "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
               "web_search_options")
# a value asking for something: what a client sends when it wants the feature
ASKING = {"audio": {"voice": "alloy", "format": "wav"}, "function_call": "auto",
          "functions": [{"name": "f", "parameters": {}}], "tools": [{"type": "function", "function": {"name": "f"}}],
          "echo": True, "suffix": "end",
          "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
          "reasoning_effort": "high", "verbosity": "low", "web_search_options": {},
          "store": True, "tool_choice": "auto", "service_tier": "flex"}


def test_every_documented_field_is_honoured_or_refused_never_ignored():
    from autocontrast.serve.protocol import ACCEPTED_ONLY_AS, HINTS, READ, UNSUPPORTED

    tables = set(READ) | set(HINTS) | set(UNSUPPORTED) | set(ACCEPTED_ONLY_AS)
    assert set(COMPLETION_FIELDS + CHAT_FIELDS) - tables == set()
    assert set(UNSUPPORTED) | set(ACCEPTED_ONLY_AS) <= set(ASKING)


@pytest.mark.parametrize("field", sorted(ASKING))
def test_a_field_the_server_cannot_honour_is_400_naming_it(client, generator, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=generator.bundle_dir.name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2, extra_body={field: ASKING[field]})
    assert caught.value.body["param"] == field and caught.value.body["code"] == "unsupported_parameter"


def _chat(client, generator, **fields):
    fields = {"max_tokens": 160, "temperature": 0, **fields}
    return client.chat.completions.create(model=generator.bundle_dir.name,
                                          messages=[{"role": "user", "content": "Give me JSON"}], **fields)


def test_response_format_json_object_and_json_schema_are_enforced(client, generator):
    answer = _chat(client, generator, response_format={"type": "json_object"}).choices[0]
    assert isinstance(json.loads(answer.message.content), dict) and answer.finish_reason == "stop"
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for multi_exit in ({"use_original_head": True}, {"use_original_head": False, "contrast_layer_indices": CONTRAST}):
        text = _chat(client, generator, response_format=schema_format, temperature=1.0, seed=7,
                     extra_body={"multi_exit": multi_exit}).choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
    streamed = _chat(client, generator, response_format=schema_format, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), SCHEMA)
    assert isinstance(_chat(client, generator, response_format={"type": "text"}, max_tokens=2).choices[0]
                      .message.content, str)


def test_structured_outputs_extension_regex_choice_on_completions(client, generator):
    out = client.completions.create(model=generator.bundle_dir.name, prompt="Code:", max_tokens=20, n=2, seed=1,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", c.text) for c in out.choices)
    out = client.completions.create(model=generator.bundle_dir.name, prompt="Pick:", max_tokens=8, temperature=1,
                                    extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert out.choices[0].text in ("left", "right")


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "json_schema constraint is not valid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs"),
    ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex constraint is not valid"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
def test_a_bad_structured_output_request_is_400_naming_its_field(client, generator, fields, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=generator.bundle_dir.name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, extra_body=fields)
    assert caught.value.body["param"] == param and message in caught.value.body["message"]
    assert _chat(client, generator, max_tokens=2).choices  # and the server goes on


@pytest.mark.parametrize("depth", [33, 100_000])
def test_a_deeply_nested_body_is_400_and_the_server_goes_on(server, client, generator, depth):
    body = b'{"prompt": "Hi", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    response = httpx.post(f"{server.base}/v1/completions", content=body,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "nests deeper than 32" in response.json()["error"]["message"]
    assert client.completions.create(model=generator.bundle_dir.name, prompt="Hi", max_tokens=2).choices


def test_a_chat_sharing_a_system_prompt_reuses_its_cache_and_answers_as_alone(server, client, generator):
    system = "You answer in one short sentence. " + " ".join(f"Fact {i}: the number {i} is {i % 7}." for i in range(30))
    before = httpx.get(f"{server.base}/health").json()["prefix_cache"]["tokens_reused"]
    replies = []
    for question in ("What is fact 3?", "What is fact 12?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        reply = client.chat.completions.create(model=generator.bundle_dir.name, messages=messages, max_tokens=8,
                                               temperature=0)
        replies.append(reply.choices[0].message.content)
        ids = generator.encode_chat(messages)
        assert replies[-1] == generator.generate(ids, max_new_tokens=8, multi_exit=ACD).text  # the server's default
    shared = len(generator.encode_chat([{"role": "system", "content": system}]))
    reused = httpx.get(f"{server.base}/health").json()["prefix_cache"]["tokens_reused"] - before
    assert reused >= shared - 8  # the second chat prefilled (about) only its own question


def test_a_long_prompt_joins_in_chunks_while_streams_keep_their_text(llama_bundle, generator):
    # a budget of 8 tokens a step: the long prompt joins over many steps beside two running streams
    import threading

    process = ServerProcess(llama_bundle, "--max-step-tokens", "8")
    try:
        tiny = openai.OpenAI(base_url=f"{process.base}/v1", api_key="unused", max_retries=0, timeout=120)
        long_prompt = " ".join(PROMPTS) * 6
        decoding = threading.Event()

        def stream(prompt):
            pieces = []
            for chunk in tiny.completions.create(model=llama_bundle.name, prompt=prompt, max_tokens=400,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}):
                pieces.append(chunk.choices[0].text if chunk.choices else "")
                decoding.set()
            return "".join(pieces)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream, p) for p in PROMPTS[:2]]
            assert decoding.wait(60)  # the long prompt arrives while the streams decode
            long_text = tiny.completions.create(model=llama_bundle.name, prompt=long_prompt, max_tokens=6,
                                                temperature=0, extra_body={"ignore_eos": True}).choices[0].text
            texts = [f.result() for f in streams]
        assert texts == [generator.generate(p, max_new_tokens=400, ignore_eos=True, multi_exit=ACD).text
                         for p in PROMPTS[:2]]
        assert long_text == generator.generate(long_prompt, max_new_tokens=6, ignore_eos=True, multi_exit=ACD).text
        assert httpx.get(f"{process.base}/health").json()["max_step_tokens"] == 8
    finally:
        process.stop()


def _reference_logprobs(generator, prompt_ids, token_ids):
    """log_softmax of the original head's logits at each generated position, from the score graph."""
    logits = generator.exit_logits_all_positions([prompt_ids + token_ids], ["original"])[0][:, 0]  # (seq, vocab)
    rows = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(token_ids)].astype(np.float64)
    return rows - rows.max(axis=1, keepdims=True) - np.log(np.exp(rows - rows.max(axis=1, keepdims=True)).sum(
        axis=1, keepdims=True))


def test_completion_logprobs_are_the_original_heads_log_softmax(client, generator):
    reply = client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                      logprobs=3, extra_body={"multi_exit": {"use_original_head": True},
                                                              "ignore_eos": True})
    scored = reply.choices[0].logprobs
    prompt_ids = generator.encode(PROMPTS[1])
    tokens = generator.generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True).token_ids[0]
    want = _reference_logprobs(generator, prompt_ids, tokens)
    assert np.allclose(scored.token_logprobs, want[np.arange(6), tokens], atol=1e-4)
    assert "".join(scored.tokens) == reply.choices[0].text
    for row, alternatives in zip(want, scored.top_logprobs, strict=True):
        assert len(alternatives) <= 3 and np.allclose(sorted(alternatives.values(), reverse=True),
                                                      np.sort(row)[::-1][:len(alternatives)], atol=1e-4)
    assert scored.text_offset == [sum(len(t) for t in scored.tokens[:i]) for i in range(6)]


def test_chat_logprobs_streamed_equal_the_whole_answers(client, generator):
    fields = dict(model=generator.bundle_dir.name, messages=[{"role": "user", "content": "Say something"}],
                  max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**fields).choices[0].logprobs.content
    streamed = [item for chunk in client.chat.completions.create(**fields, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 5)) for i in streamed] == [(i.token, round(i.logprob, 5)) for i in whole]
    assert len(whole) == 8 and all(len(i.top_logprobs) == 2 and i.top_logprobs[0].logprob >= i.logprob - 1e-6
                                   for i in whole)  # greedy (ACD): the chosen token is the most likely


def test_penalties_and_logit_bias_through_the_server_equal_the_generator(client, generator):
    fields = dict(presence_penalty=0.8, frequency_penalty=1.2, logit_bias={"7": 3.0, "11": -100})
    reply = client.completions.create(model=generator.bundle_dir.name, prompt=PROMPTS[0], max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True}, **fields)
    bias = {int(k): v for k, v in fields.pop("logit_bias").items()}
    alone = generator.generate(PROMPTS[0], multi_exit=ACD, max_new_tokens=12, ignore_eos=True, logit_bias=bias,
                               **fields)
    assert reply.choices[0].text == alone.text and 11 not in alone.token_ids[0]


def test_a_list_of_prompts_with_n_gives_indexed_choices_each_as_alone(client, generator):
    prompts = [PROMPTS[0], PROMPTS[1]]
    reply = client.completions.create(model=generator.bundle_dir.name, prompt=prompts, n=2, max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    want = [generator.generate(p, multi_exit=ACD, max_new_tokens=6, ignore_eos=True).text for p in prompts]
    assert [c.text for c in reply.choices] == [want[0], want[0], want[1], want[1]]  # prompt i's j-th is i * n + j
    assert reply.usage.prompt_tokens == sum(len(generator.encode(p)) for p in prompts)
    assert reply.usage.completion_tokens == 4 * 6


def test_seeded_sampling_with_n_gives_distinct_reproducible_choices(client, generator):
    fields = dict(model=generator.bundle_dir.name, prompt=PROMPTS[1], n=3, max_tokens=12, temperature=1.0, seed=7)
    first = [c.text for c in client.completions.create(**fields).choices]
    again = [c.text for c in client.completions.create(**fields).choices]
    assert first == again and len(set(first)) > 1
    alone = generator.generate(PROMPTS[1], multi_exit=ACD, max_new_tokens=12, temperature=1.0, seed=8).text
    assert first[1] == alone  # choice j draws with seed + j


def test_streamed_chat_with_n_interleaves_indexed_choices(client, generator):
    messages = [{"role": "user", "content": "Count to three"}]
    parts: dict[int, list[str]] = {0: [], 1: []}
    finished = set()
    for chunk in client.chat.completions.create(model=generator.bundle_dir.name, messages=messages, n=2,
                                                max_tokens=8, temperature=0, stream=True):
        for choice in chunk.choices:
            parts[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    whole = client.chat.completions.create(model=generator.bundle_dir.name, messages=messages, n=2, max_tokens=8,
                                           temperature=0)
    assert finished == {0, 1} and ["".join(parts[i]) for i in (0, 1)] == [c.message.content for c in whole.choices]


def test_echo_returns_the_prompt_and_its_logprobs_first(client, generator):
    fields = dict(model=generator.bundle_dir.name, prompt=PROMPTS[1], max_tokens=3, temperature=0, echo=True,
                  extra_body={"multi_exit": {"use_original_head": True}, "ignore_eos": True})
    reply = client.completions.create(logprobs=1, **fields).choices[0]
    prompt_ids = generator.encode(PROMPTS[1])
    tokens = generator.generate(PROMPTS[1], max_new_tokens=3, ignore_eos=True).token_ids[0]
    assert reply.text.startswith(PROMPTS[1]) and len(reply.logprobs.tokens) == len(prompt_ids) + 3
    assert reply.logprobs.token_logprobs[0] is None and reply.logprobs.top_logprobs[0] is None
    ids = prompt_ids + tokens
    want = _reference_logprobs(generator, ids[:1], ids[1:])  # every position after the first
    assert np.allclose(reply.logprobs.token_logprobs[1:], want[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **fields))
    assert streamed == reply.text and client.completions.create(**fields).choices[0].logprobs is None


def test_exit_logprobs_show_each_exit_the_contrast_read(client, generator):
    reply = client.chat.completions.create(model=generator.bundle_dir.name, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"exit_logprobs": True})
    for item in reply.choices[0].logprobs.content:
        exits = item.model_extra["exit_logprobs"]
        assert set(exits) == {str(x) for x in CONTRAST}
        assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6
                   for e in exits.values())
    completion = client.completions.create(model=generator.bundle_dir.name, prompt="Hi", max_tokens=3, temperature=0,
                                           logprobs=1, extra_body={"exit_logprobs": True}).choices[0].logprobs
    assert len(completion.model_extra["exit_logprobs"]) == 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=generator.bundle_dir.name, prompt="Hi", max_tokens=2,
                                  extra_body={"exit_logprobs": True})
    assert caught.value.body["param"] == "exit_logprobs"
