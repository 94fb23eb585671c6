"""The OpenAI wire format: request bodies to a `RequestSpec`, results to response bodies, errors to
OpenAI's error body. Pure functions over dicts; no HTTP here.

Request fields follow OpenAI's completions and chat completions, plus the extras vLLM users know
(`top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`) and `multi_exit`, the ACD mode of this
request: the `MultiExitConfiguration` fields by their Python names.

>>> spec = parse_request({"prompt": "Hi", "max_tokens": 4, "temperature": 0}, chat=False, limits=Limits())
>>> spec.params.max_new_tokens, spec.params.do_sample
(4, False)
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import AutocontrastError
from autocontrast.runtime.constraint import OutputConstraint
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.stopping import CONSTRAINT, EOS, LENGTH, STOP_STRING

MULTI_EXIT_FIELDS = ("use_original_head", "output_layer_index", "contrast_layer_indices", "alpha",
                     "minimum_candidates", "dola_layers", "relative_top")
# fields we take but cannot honour: a request that asks for them gets a clear 400, not a silent ignore
UNSUPPORTED = {"suffix": "suffix is not supported",
               "tools": "tool calls are not supported", "functions": "function calls are not supported",
               "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
               "web_search_options": "web search is not supported",
               "reasoning_effort": "this model does not reason in separate steps",
               "verbosity": "verbosity is not supported: bound the answer with max_tokens"}
EMPTY_ASKS = {"web_search_options"}  # an empty object turns web search on (elsewhere, empty means none)
# fields OpenAI documents that change nothing here, accepted with these values only (any other value
# asks for something the server does not do, and is refused like the fields above)
ACCEPTED_ONLY_AS = {"modalities": (["text"],), "store": (False,),
                    "tool_choice": ("none",), "function_call": ("none",), "service_tier": ("auto", "default")}
# fields OpenAI documents as hints or labels: taken and ignored, as OpenAI's own API may
HINTS = ("user", "metadata", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
# fields `parse_request` reads (n, best_of and the penalties only at their defaults; a test holds every field
# OpenAI documents to one of these tables)
READ = ("model", "prompt", "echo", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
        "stream", "stream_options", "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias",
        "logprobs", "top_logprobs", "response_format")
MAX_JSON_DEPTH = 32  # deeper request bodies are refused before anything walks them
FINISH_REASONS = {EOS: "stop", STOP_STRING: "stop", CONSTRAINT: "stop", LENGTH: "length"}  # ours -> OpenAI's
# the structured-output extension (vLLM's `structured_outputs`): its keys -> OutputConstraint's makers
STRUCTURED_OUTPUTS = {"json": OutputConstraint.json_schema, "regex": OutputConstraint.regex,
                      "grammar": OutputConstraint.grammar, "choice": OutputConstraint.choice}
# our parameter names in error messages -> the OpenAI field the client sent
PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_strings": "stop",
               "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
               "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
               "logit_bias": "logit_bias", "logprobs": "logprobs", "exit_logprobs": "exit_logprobs"}


class OpenAIError(Exception):
    """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 1024  # the most new tokens one request may ask for (and the chat default)
    completion_default_tokens: int = 16  # OpenAI's default max_tokens for /v1/completions
    max_choices: int = 16  # the most generations one request may ask for: n x prompts


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """A validated request: what to generate and how to answer."""

    prompts: list[str | list[int]] | None  # completions: one or several prompts
    echo: bool  # completions: the answer starts with the prompt (and its logprobs, when asked for)
    messages: list[dict[str, str]] | None  # chat
    n: int  # generations per prompt; choice i * n + j is prompt i's j-th
    params: GenerationParams
    multi_exit: MultiExitConfiguration | None  # None: the server's default mode
    stream: bool
    include_usage: bool
    model: str | None


def _number(body: dict[str, Any], name: str, default: float | None, *, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise bad_request(f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r}", name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        return tuple(stop)
    raise bad_request("'stop' must be a string or a list of at most 16 strings", "stop")


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as JSON object keys (strings of integers) to numbers."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or not all(isinstance(k, str) and k.strip().lstrip("-").isdigit() for k in bias):
        raise bad_request("'logit_bias' must map token ids (as strings) to numbers within -100..100", "logit_bias")
    return {int(k): v for k, v in bias.items()}  # the values are checked by GenerationParams


def _logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """Alternatives per token: completions' `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k`."""
    if not chat:
        return _number(body, "logprobs", None, integer=True)
    wanted, top = _bool(body, "logprobs", False), _number(body, "top_logprobs", None, integer=True)
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _multi_exit(body: dict[str, Any]) -> MultiExitConfiguration | None:
    fields = body.get("multi_exit")
    if fields is None:
        return None
    if not isinstance(fields, dict):
        raise bad_request("'multi_exit' must be an object of MultiExitConfiguration fields", "multi_exit")
    unknown = sorted(set(fields) - set(MULTI_EXIT_FIELDS))
    if unknown:
        raise bad_request(f"unknown multi_exit field(s) {', '.join(unknown)}; known: {', '.join(MULTI_EXIT_FIELDS)}",
                          "multi_exit")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return MultiExitConfiguration(**fields)
    except (AutocontrastError, TypeError, ValueError) as err:
        raise bad_request(f"multi_exit: {err}", "multi_exit") from None


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """OpenAI's `prompt`: a string, a list of token ids, or a list of either (a batch)."""
    prompt = body.get("prompt")

    def one(p: Any) -> bool:
        return (isinstance(p, str) and bool(p)) or (isinstance(p, list) and bool(p) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p))

    if one(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(one(p) for p in prompt):
        return list(prompt)
    raise bad_request("'prompt' must be a non-empty string, a list of token ids, or a list of those", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role' string", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content parts must be text parts", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _constraint(body: dict[str, Any]) -> OutputConstraint | None:
    """OpenAI's `response_format` (text, json_object, json_schema) or the `structured_outputs` extension (one of
    json: schema, regex, grammar: Lark text, choice: [strings]); not both."""
    response_format, extension = body.get("response_format"), body.get("structured_outputs")
    if response_format is not None and extension is not None:
        raise bad_request("give either 'response_format' or 'structured_outputs', not both", "structured_outputs")
    try:
        if extension is not None:
            if not isinstance(extension, dict) or len(extension) != 1 or next(iter(extension)) not in STRUCTURED_OUTPUTS:
                raise bad_request(f"'structured_outputs' must be an object with one of {', '.join(STRUCTURED_OUTPUTS)}",
                                  "structured_outputs")
            (kind, spec), = extension.items()
            return STRUCTURED_OUTPUTS[kind](spec)
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return OutputConstraint.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise bad_request("'response_format' json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                                  "{...}}}", "response_format")
            return OutputConstraint.json_schema(spec["schema"])
    except AutocontrastError as err:
        raise bad_request(str(err), "structured_outputs" if extension is not None else "response_format") from None
    raise bad_request(f"'response_format' type {kind!r} is not supported (text, json_object or json_schema)",
                      "response_format", "unsupported_parameter")


def check_depth(body: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a parsed body whose arrays/objects nest deeper than `limit` (walked without recursion)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise bad_request(f"the request body nests deeper than {limit} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def parse_request(body: Any, *, chat: bool, limits: Limits) -> RequestSpec:
    """A request body (parsed JSON) to a `RequestSpec`; anything wrong is a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, why in UNSUPPORTED.items():
        if body.get(name) is not None and (body[name] not in (False, {}, []) or name in EMPTY_ASKS):
            raise bad_request(f"'{name}': {why}", name, "unsupported_parameter")
    for name, allowed in ACCEPTED_ONLY_AS.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise bad_request(f"'{name}': {body[name]!r} is not supported by this server (only "
                              f"{' or '.join(map(repr, allowed))})", name,
                              "unsupported_parameter")
    n = _number(body, "n", 1, integer=True)
    if n < 1:
        raise bad_request(f"'n' ({n}) must be a positive integer", "n")
    if _number(body, "best_of", n, integer=True) != n:
        raise bad_request("best_of (ranking more candidates than are returned) is not supported: leave it out or "
                          "equal to n", "best_of", "unsupported_parameter")
    prompts = None if chat else _prompts(body)
    if n * len(prompts or [None]) > limits.max_choices:
        raise bad_request(f"n x prompts ({n} x {len(prompts or [None])}) exceeds this server's limit of "
                          f"{limits.max_choices} generations per request", "n")
    default = limits.max_tokens if chat else limits.completion_default_tokens
    max_tokens = _number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                         default, integer=True)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise bad_request(f"max_tokens ({max_tokens}) must be within 1..{limits.max_tokens}", "max_tokens")
    top_k = _number(body, "top_k", 0, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    try:
        params = GenerationParams(
            max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
            top_k=0 if top_k == -1 else top_k, seed=_number(body, "seed", None, integer=True),
            repetition_penalty=_number(body, "repetition_penalty", 1.0), stop_strings=_stop(body),
            min_new_tokens=_number(body, "min_tokens", 0, integer=True), ignore_eos=_bool(body, "ignore_eos", False),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0), logit_bias=_logit_bias(body),
            logprobs=_logprobs(body, chat=chat), exit_logprobs=_bool(body, "exit_logprobs", False),
            constraint=_constraint(body))
    except AutocontrastError as err:
        message = str(err)
        param = next((v for k, v in PARAM_NAMES.items() if message.startswith(k)), None)
        raise bad_request(message, param) from None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if chat and body.get("echo") not in (None, False):
        raise bad_request("'echo' is a /v1/completions field; a chat answer does not repeat the conversation", "echo",
                          "unsupported_parameter")
    return RequestSpec(prompts=prompts, echo=_bool(body, "echo", False), messages=_messages(body) if chat else None,
                       n=n, params=params, multi_exit=_multi_exit(body), stream=_bool(body, "stream", False),
                       include_usage=_bool(stream_options, "include_usage", False), model=model)


# -- responses --------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


LOGPROB_FLOOR = -9999.0  # an impossible token's log-probability as sent (JSON has no -inf; vLLM sends the same)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's text, log-probability and most likely alternatives (text, log-probability); an echoed
    prompt's first token has neither (nothing comes before it)."""

    text: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None
    exits: tuple[tuple[str, float, tuple[tuple[str, float], ...]], ...] = ()  # (exit, logprob, top) per exit read


def _floor(logprob: float | None) -> float | None:
    return None if logprob is None else max(float(logprob), LOGPROB_FLOOR)


def logprobs_body(entries: list[TokenLogprob], *, chat: bool, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's `logprobs` of a choice (or of a chunk): chat's `content` list, or completions' parallel lists
    (`text_offset` counts characters from `offset`). None when the request asked for none."""
    if not entries:
        return None
    if chat:
        def item(text: str, logprob: float | None) -> dict[str, Any]:
            return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}

        def exits(e: TokenLogprob) -> dict[str, Any]:
            return {"exit_logprobs": {name: {"logprob": _floor(lp), "top_logprobs": [item(t, x) for t, x in top]}
                                      for name, lp, top in e.exits}} if e.exits else {}

        return {"content": [item(e.text, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top or ()]}
                            | exits(e) for e in entries], "refusal": None}
    offsets = [offset + sum(len(e.text) for e in entries[:i]) for i in range(len(entries))]
    body = {"tokens": [e.text for e in entries], "token_logprobs": [_floor(e.logprob) for e in entries],
            "top_logprobs": [None if e.top is None else {t: _floor(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets}
    if any(e.exits for e in entries):  # our extension: per token, each exit the mode reads, alone
        body["exit_logprobs"] = [{name: {"logprob": _floor(lp), "top_logprobs": {t: _floor(x) for t, x in top}}
                                  for name, lp, top in e.exits} or None for e in entries]
    return body


def choice_body(*, chat: bool, index: int, text: str, finish_reason: str,
                logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response."""
    reason = FINISH_REASONS.get(finish_reason, finish_reason)
    scored = logprobs_body(logprobs or [], chat=chat)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": scored,
                "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": scored, "finish_reason": reason}


def completion_body(*, chat: bool, request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """The whole (non-streamed) response: `choices` made by `choice_body`, in index order."""
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(*, chat: bool, request_id: str, model: str, text: str | None, finish_reason: str | None,
               first: bool = False, logprobs: list[TokenLogprob] | None = None, offset: int = 0,
               index: int = 0) -> dict[str, Any]:
    """One server-sent event of a streamed response; the first chat chunk carries the role; `logprobs`: the
    tokens this chunk's text came from (`offset`: characters streamed before it)."""
    reason = FINISH_REASONS.get(finish_reason, finish_reason) if finish_reason else None
    scored = logprobs_body(logprobs or [], chat=chat, offset=offset)
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        elif first:
            delta["content"] = ""
        choice = {"index": index, "delta": delta, "logprobs": scored, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": scored, "finish_reason": reason}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(*, chat: bool, request_id: str, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
