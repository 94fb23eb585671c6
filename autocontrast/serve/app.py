"""The OpenAI-compatible HTTP app (Starlette): routes, auth, limits, streaming, errors.

Thin over the scheduler: a request is parsed (`protocol`), made into one
`autocontrast.runtime.request.Request` per choice (`Model.request`: checked and encoded there; here
`Generation`, beside Starlette's HTTP `Request`) and submitted; its `TokenEvent`s come back from the
scheduler thread through its sink, an asyncio queue, and go out as one JSON body or as server-sent
events. A client that disconnects has its job cancelled (its row leaves the
batch before the next step). Every error is OpenAI's error body; the server keeps serving.

>>> app = create_app(Generator("smollm2-acd"), ServerConfig(model_name="smollm2"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from autocontrast.bundle import BUFFER_LAYOUT
from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import AutocontrastError, ConfigurationError, PromptError
from autocontrast.runtime.contrast import log_softmax
from autocontrast.runtime.generator import Generator
from autocontrast.runtime.kv_pool import KVPool, default_pool
from autocontrast.runtime.request import Request as Generation
from autocontrast.runtime.request import Sink, TokenEvent
from autocontrast.runtime.sampling import most_likely
from autocontrast.runtime.step_plan import step_budget_problem
from autocontrast.serve.metrics import CONTENT_TYPE, Metrics
from autocontrast.serve.protocol import (
    MAX_JSON_DEPTH,
    Limits,
    OpenAIError,
    RequestSpec,
    TokenLogprob,
    bad_request,
    check_depth,
    choice_body,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    usage_chunk,
)
from autocontrast.serve.scheduler import (
    DEFAULT_KV_RESERVE_BYTES,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_PREFIX_CACHE_BYTES,
    QueueFullError,
    Scheduler,
    SchedulerStoppedError,
)

log = logging.getLogger("autocontrast.serve")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    default_mode: MultiExitConfiguration = dataclasses.field(default_factory=MultiExitConfiguration)
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    limits: Limits = dataclasses.field(default_factory=Limits)
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    max_step_tokens: int | None = DEFAULT_MAX_STEP_TOKENS  # None: whole prompts join in one step
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES  # 0: no prefix reuse
    kv_reserve_bytes: int = DEFAULT_KV_RESERVE_BYTES  # KV buffer memory touched when the app is built; 0: none

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 0 or self.max_body_bytes < 1:
            raise ConfigurationError(f"max_batch ({self.max_batch}) must be >= 1, max_queue ({self.max_queue}) >= 0 "
                                     f"and max_body_bytes ({self.max_body_bytes}) >= 1")
        if problem := step_budget_problem(self.max_step_tokens):
            raise ConfigurationError(problem)
        if self.prefix_cache_bytes < 0 or self.kv_reserve_bytes < 0:
            raise ConfigurationError(f"prefix_cache_bytes ({self.prefix_cache_bytes}) and kv_reserve_bytes "
                                     f"({self.kv_reserve_bytes}) must be >= 0")


@dataclasses.dataclass(frozen=True)
class AppSpec:
    """All a process needs to build the app itself (a Ray replica gets this, pickled, and builds its own
    Generator from it). `bundle` must be a path valid where the app is built: make it absolute."""

    bundle: str
    config: ServerConfig
    provider: str = "cpu"
    threads: int | None = None
    share_weights: bool = False  # one memory map of the weights for every graph (CPU; slower steps)


def build_app(spec: AppSpec) -> Starlette:
    """Open the bundle (the default mode's graph loaded before any request) and return its app.

    >>> app = build_app(AppSpec("/models/smollm2-acd", ServerConfig(model_name="smollm2")))  # doctest: +SKIP
    """
    generator = Generator(spec.bundle, provider=spec.provider, threads=spec.threads, preload=(),
                          share_weights=spec.share_weights)
    generator.session(generator.mode(spec.config.default_mode).graph)
    generator.grammar_tokenizer()  # structured output's vocabulary (~0.5 s): now, not as a stall on the first request
    reserve_kv_memory(generator, spec.config.kv_reserve_bytes, max_batch=spec.config.max_batch)
    return create_app(generator, spec.config)


def reserve_kv_memory(generator: Generator, nbytes: int, *, max_batch: int, pool: KVPool | None = None) -> int:
    """Touch up to `nbytes` of KV buffer memory now and leave it in the KV pool (default: the process's) for a
    bundle whose decode graphs write a KV buffer in place; returns the bytes reserved. Memory new to the
    process stalls the first step on it, and every stream beside it, by a page fault per 4 KiB (~300 ms for a
    94 MB buffer on a VM whose host backs memory lazily); requests' buffers are cut from the reserve. Capped at
    what the bundle could hold at once: `max_batch` rows and a joining prompt, each of its whole context."""
    kv, manifest = generator.manifest.kv_cache, generator.manifest
    if not nbytes or kv.layout != BUFFER_LAYOUT:
        return 0
    column = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * np.dtype(kv.dtype).itemsize  # one token of one row
    nbytes = min(nbytes, (max_batch + 1) * manifest.max_positions * column)
    seconds = (pool or default_pool()).reserve(nbytes, np.dtype(kv.dtype))
    log.info("KV reserve: %d MB touched in %.2f s", nbytes >> 20, seconds)
    return nbytes


def create_app(generator: Generator, config: ServerConfig) -> Starlette:
    """The ASGI app serving `generator` under `config` (run it with uvicorn)."""
    metrics = Metrics()
    scheduler = Scheduler(generator, max_batch=config.max_batch, max_queue=config.max_queue,
                          max_step_tokens=config.max_step_tokens, prefix_cache_bytes=config.prefix_cache_bytes,
                          observe=metrics.observe)
    generator.mode(config.default_mode)  # a default mode the bundle cannot serve fails at start, not per request
    server = _Server(generator, config, scheduler, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, drain=True)

    routes = [Route("/health", server.health), Route("/metrics", server.prometheus),
              Route("/v1/models", server.models),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        OpenAIError: _openai_error, HTTPException: _http_error, Exception: _server_error})
    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


async def _openai_error(request: Request, err: OpenAIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: HTTPException) -> Response:
    return await _openai_error(request, OpenAIError(err.status_code, f"{request.method} {request.url.path}: "
                                                    f"{err.detail}", code="not_found" if err.status_code == 404
                                                    else None))


async def _server_error(request: Request, err: Exception) -> Response:
    log.exception("internal error serving %s", request.url.path)
    return JSONResponse(OpenAIError(500, f"internal server error: {type(err).__name__}", type="server_error").body(),
                        status_code=500)


class _Server:
    def __init__(self, generator: Generator, config: ServerConfig, scheduler: Scheduler, metrics: Metrics) -> None:
        self.generator, self.config, self.scheduler, self.metrics = generator, config, scheduler, metrics
        self.created = int(time.time())

    # -- plain routes ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "pid": os.getpid(), **self.scheduler.describe()})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        self._authorize(request, "/v1/models")
        self._count("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "autocontrast"}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # -- generation -----------------------------------------------------------------------------

    def _count(self, route: str, status: int) -> None:
        self.metrics.requests.labels(route=route, status=str(status)).inc()

    def _authorize(self, request: Request, route: str) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self._count(route, 401)
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        route = request.url.path
        self._authorize(request, route)
        try:
            body = await self._read_json(request)
            spec = parse_request(body, chat=chat, limits=self.config.limits)
            answer = self._prepare(spec, body, chat=chat)  # its requests, one object each from here on
            if spec.echo:
                await self._echo(answer, spec)
            self._enqueue(answer)
        except OpenAIError as err:
            self._count(route, err.status)
            raise
        self._count(route, 200)
        self.metrics.prompt_tokens.inc(answer.prompt_tokens)
        request_id = new_id(chat)
        if spec.stream:
            return StreamingResponse(self._events(request, answer, spec, chat=chat, request_id=request_id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, answer, chat=chat, request_id=request_id)

    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise OpenAIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}") from None
        except RecursionError:  # the parser's own bound, far below the size limit's worst case
            raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        check_depth(body)
        return body

    def _prepare(self, spec: RequestSpec, body: dict[str, Any], *, chat: bool) -> _Answer:
        """Encode and check every prompt: the request's generations, not queued yet."""
        if spec.model is not None and spec.model != self.config.model_name:
            raise OpenAIError(404, f"the model {spec.model!r} does not exist; this server serves "
                              f"{self.config.model_name!r}", param="model", code="model_not_found")
        gen = self.generator
        # a chat's default budget fits the context
        fit = chat and "max_tokens" not in body and "max_completion_tokens" not in body
        answer = _Answer(asyncio.get_running_loop())
        try:
            mode = gen.mode(spec.multi_exit or self.config.default_mode)
            for prompt in [spec.messages] if chat else spec.prompts:
                first = gen.request(prompt, spec.params, multi_exit=mode, chat=chat, fit_context=fit,
                                    sink=answer.sink())
                answer.add(first, counted=True)
                for j in range(1, spec.n):  # a seeded request's choices draw differently, reproducibly: seed + j
                    params = first.params if first.params.seed is None else dataclasses.replace(
                        first.params, seed=first.params.seed + j)
                    answer.add(dataclasses.replace(first, prompt_ids=list(first.prompt_ids), params=params,
                                                   sink=answer.sink()))
        except AutocontrastError as err:
            raise self._refusal(err, chat=chat) from None
        if spec.echo:
            answer.echo_texts = [p if isinstance(p, str) else gen.tokenizer.decode(p, skip_special_tokens=False)
                                 for p in spec.prompts for _ in range(spec.n)]
        return answer

    async def _echo(self, answer: _Answer, spec: RequestSpec) -> None:
        """Each echoed prompt's tokens with their log-probabilities under the request's mode (the score graph,
        off the event loop), when logprobs are asked for."""
        if spec.params.logprobs is None:
            return
        mode = spec.multi_exit or self.config.default_mode
        try:
            scored = [await asyncio.to_thread(self._prompt_logprobs, ids, mode, spec.params.logprobs)
                      for ids in answer.prompts[::spec.n]]
        except AutocontrastError as err:
            raise self._refusal(err, chat=False) from None
        answer.echo_logprobs = [s for s in scored for _ in range(spec.n)]

    def _prompt_logprobs(self, ids: list[int], mode: MultiExitConfiguration, alternatives: int) -> list[TokenLogprob]:
        scores = self.generator.mode_scores_all_positions(ids, mode)  # (seq, vocab): next-token scores
        logp = log_softmax(scores.astype(np.float64))
        texts = self._token_texts(ids)
        entries = [TokenLogprob(texts[0], None, None)]
        for t in range(1, len(ids)):
            entries.append(TokenLogprob(texts[t], float(logp[t - 1, ids[t]]),
                                        self._as_text(most_likely(logp[t - 1], alternatives))))
        return entries

    def _enqueue(self, answer: _Answer) -> None:
        """Queue all of the request's generations at once (or none)."""
        try:
            self.scheduler.submit_all(answer.jobs)
        except QueueFullError as err:
            raise OpenAIError(429, f"{err}; retry after {self.config.retry_after_s} s", type="rate_limit_error",
                              code="rate_limit_exceeded",
                              headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except SchedulerStoppedError as err:
            raise OpenAIError(503, str(err), type="server_error", code="shutting_down") from None

    @staticmethod
    def _refusal(err: AutocontrastError, *, chat: bool) -> OpenAIError:
        param = ("multi_exit" if isinstance(err, ConfigurationError) else
                 ("messages" if chat else "prompt") if isinstance(err, PromptError) else None)
        return bad_request(str(err), param)

    async def _next(self, request: Request, answer: _Answer,
                    watcher: asyncio.Task) -> tuple[int, TokenEvent | BaseException] | None:
        """The next (choice index, event) of any of the answer's generations, or None if the client has gone
        (then every one of them is cancelled)."""
        getter = asyncio.ensure_future(answer.events.get())
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        answer.cancel()
        log.info("client left; request cancelled after %d token(s)", answer.generated)
        return None

    async def _whole(self, request: Request, answer: _Answer, *, chat: bool, request_id: str) -> Response:
        watcher = asyncio.ensure_future(_disconnected(request))
        count = len(answer.jobs)
        pieces: list[list[str]] = [[] for _ in range(count)]
        scored: list[list[TokenLogprob]] = [[] for _ in range(count)]
        reasons: list[str | None] = [None] * count
        try:
            while None in reasons:
                item = await self._next(request, answer, watcher)
                if item is None:
                    return Response(status_code=499)  # nobody is listening; the generations are cancelled
                index, event = item
                if isinstance(event, BaseException):
                    answer.cancel()
                    raise OpenAIError(500, f"generation failed: {event}", type="server_error")
                pieces[index].append(event.text)
                scored[index] += self._logprobs(event)
                reasons[index] = event.finish_reason
        finally:
            watcher.cancel()
        choices = [choice_body(chat=chat, index=i, text=answer.echo_text(i) + "".join(pieces[i]),
                               finish_reason=str(reasons[i]), logprobs=answer.echo_logprob(i) + scored[i])
                   for i in range(count)]
        return JSONResponse(completion_body(chat=chat, request_id=request_id, model=self.config.model_name,
                                            choices=choices, prompt_tokens=answer.prompt_tokens,
                                            completion_tokens=answer.generated))

    def _logprobs(self, event: TokenEvent) -> list[TokenLogprob]:
        """The event's token with its log-probability and alternatives, as text (none if not asked for)."""
        if event.logprob is None:
            return []
        exits = tuple((e.exit, e.logprob, self._as_text(e.top)) for e in event.exit_logprobs)
        return [TokenLogprob(self._token_texts([event.token])[0], event.logprob, self._as_text(event.top_logprobs),
                             exits)]

    def _as_text(self, scored: Sequence[tuple[int, float]]) -> tuple[tuple[str, float], ...]:
        """(token id, log-probability) pairs with each id as its text."""
        return tuple(zip(self._token_texts([t for t, _ in scored]), (lp for _, lp in scored), strict=True))

    def _token_texts(self, ids: list[int]) -> list[str]:
        tokenizer = self.generator.tokenizer
        return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    async def _events(self, request: Request, answer: _Answer, spec: RequestSpec, *, chat: bool,
                      request_id: str) -> AsyncIterator[str]:
        model = self.config.model_name
        watcher = asyncio.ensure_future(_disconnected(request))
        count = len(answer.jobs)
        scored: list[list[TokenLogprob]] = [[] for _ in range(count)]  # tokens whose text is held back wait
        streamed = [0] * count  # characters sent so far, per choice (completions' text_offset)
        left = count
        try:
            if chat:  # the role first, before any token: the client knows the answers have begun
                for index in range(count):
                    yield _sse(chunk_body(chat=True, request_id=request_id, model=model, text=None,
                                          finish_reason=None, first=True, index=index))
            for index in range(count) if spec.echo else ():  # the echoed prompt first
                yield _sse(chunk_body(chat=False, request_id=request_id, model=model, text=answer.echo_text(index),
                                      finish_reason=None, logprobs=answer.echo_logprob(index), index=index))
                streamed[index] = len(answer.echo_text(index))
            while left:
                item = await self._next(request, answer, watcher)
                if item is None:
                    return
                index, event = item
                if isinstance(event, BaseException):
                    answer.cancel()
                    yield _sse(OpenAIError(500, f"generation failed: {event}", type="server_error").body())
                    break
                scored[index] += self._logprobs(event)
                if event.text or event.finish_reason is not None:
                    yield _sse(chunk_body(chat=chat, request_id=request_id, model=model, text=event.text,
                                          finish_reason=event.finish_reason, logprobs=scored[index],
                                          offset=streamed[index], index=index))
                    scored[index], streamed[index] = [], streamed[index] + len(event.text)
                left -= event.finish_reason is not None
            if spec.include_usage:
                yield _sse(usage_chunk(chat=chat, request_id=request_id, model=model,
                                       prompt_tokens=answer.prompt_tokens, completion_tokens=answer.generated))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            answer.cancel()  # a no-op for generations that have finished; stops any left if the stream was abandoned


class _Answer:
    """One HTTP request's generations (choice i is `jobs[i]`): their events arrive on one queue, tagged with
    the choice index, crossing from the scheduler thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.prompt_tokens = loop, 0  # each prompt counted once, whatever n
        self.events: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()
        self.jobs: list[Generation] = []
        self.echo_texts: list[str] | None = None  # per choice, with `echo`
        self.echo_logprobs: list[list[TokenLogprob]] | None = None  # per choice, with `echo` and `logprobs`

    @property
    def prompts(self) -> list[list[int]]:
        return [job.prompt_ids for job in self.jobs]

    def echo_text(self, index: int) -> str:
        return "" if self.echo_texts is None else self.echo_texts[index]

    def echo_logprob(self, index: int) -> list[TokenLogprob]:
        return [] if self.echo_logprobs is None else self.echo_logprobs[index]

    def sink(self) -> Sink:
        """The sink of the next choice added: its events onto the queue, tagged with its index."""
        index = len(self.jobs)
        return lambda event: self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

    def add(self, job: Generation, *, counted: bool = False) -> None:
        """The next choice (made with `sink()` just before); `counted`: its prompt counts in the usage."""
        self.jobs.append(job)
        self.prompt_tokens += len(job.prompt_ids) if counted else 0

    @property
    def generated(self) -> int:
        return sum(job.generated for job in self.jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
