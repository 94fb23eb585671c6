"""`Stepper`: the open decode loop. The caller drives it; `generate`, `stream` and the server all do.

Modelled on onnxruntime-genai's `Generator`: add prompts, `step()` to give every running row one
more token, ask whether it is `done`, `rewind_to` a length, and read the step's logits of every
exit and the scores of each row's mode. Rows have their own generation parameters, mode (on the
stepper's graph), random generator and stop rules; each finishes on its own, and rows may be
added or dropped between any two steps (continuous batching).

Each step runs a `StepPlan` (`autocontrast.runtime.step_plan`): every decoding row gets one token,
then joining rows get prompt chunks within `max_step_tokens` (None: whole prompts, together; a chunk
beside decoding rows is charged its attention to the entries before it, `step_plan.chunk_cost`). A row
whose prompt is chunked is prefilled in a state of its own over several steps and joins the batch
when its prompt is in; with a `PrefixCache` it starts from the longest stored prefix of its prompt.
Where the bundle has a mixed-step graph (`acd-export --mixed-step`), a chunk runs in the same call as
the batch's decode step (`autocontrast.runtime.mixed_step`): one pass over the weights for both.

>>> from autocontrast.config import MultiExitConfiguration
>>> from autocontrast.runtime import Generator
>>> gen = Generator("smollm2-acd")  # doctest: +SKIP
>>> stepper = gen.stepper(MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15)))
>>> row = stepper.add("The history of Paris", max_new_tokens=8)  # doctest: +SKIP
>>> while not stepper.done:  # doctest: +SKIP
...     stepper.step()
...     upper, lower = stepper.exit_logits(row, 30), stepper.exit_logits(row, 15)  # (vocab,) each
>>> stepper.row(row).text  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from autocontrast.config import Exit, MultiExitConfiguration
from autocontrast.errors import GenerationParameterError, RowError, UnknownExitError
from autocontrast.runtime import sampling
from autocontrast.runtime.batch_state import BatchState, ChunkedState, Rewind
from autocontrast.runtime.constraint import RowConstraint
from autocontrast.runtime.contrast import log_softmax
from autocontrast.runtime.detokenizer import StreamDecoder
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.mixed_step import mixed_step
from autocontrast.runtime.model import Model, Prompt
from autocontrast.runtime.modes import DecodeMode, checked_scores
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.prefix_cache import PrefixCache
from autocontrast.runtime.request import ExitLogprobs, Request, RequestStatus, TokenEvent
from autocontrast.runtime.session import StepOutput
from autocontrast.runtime.step_plan import (
    Pending,
    PromptChunk,
    StepPlan,
    past_entries_per_token,
    plan_step,
    step_budget_problem,
)
from autocontrast.runtime.stopping import finish_reason


@dataclasses.dataclass(eq=False)
class _Prefill:
    """A joining row's prompt (token ids to put in the cache) and how far it is in."""

    ids: list[int]
    done: int = 0
    state: ChunkedState | None = None  # the row's own state while its prompt is chunked
    looked_up: bool = False  # the prefix cache was asked
    seed: list[np.ndarray] | None = None  # entries of a stored prefix to start from (`done` of them)

    @property
    def fresh(self) -> bool:
        """Nothing of it computed or found yet: it may be prefilled together with other such rows."""
        return self.state is None and self.seed is None


class Row:
    """One sequence of a stepper's batch: its `request` (prompt, parameters, mode, status), its tokens so
    far, why it stopped."""

    def __init__(self, row_id: int, request: Request, stop_ids: frozenset[int], decoder: StreamDecoder, *,
                 vocab_size: int) -> None:
        self.id, self.request, self.stop_ids = row_id, request, stop_ids
        # what min_new_tokens suppresses: stop ids of the vocabulary only, as HF's MinNewTokensLengthLogitsProcessor
        # (a checkpoint may keep an end-of-sequence id beyond its vocabulary: GPT-2's 50256 over a resized one)
        self.suppressed_ids = np.array(sorted(i for i in stop_ids if 0 <= i < vocab_size), dtype=np.int64)
        self.token_ids: list[int] = []  # generated, prompt excluded
        self.finish_reason: str | None = None
        self.decoder = decoder
        self.rng = np.random.default_rng(request.params.seed)
        self.decoder_start_token_id: int | None = None  # set for an encoder-decoder model's rows
        self.constraint: RowConstraint | None = None  # with params.constraint: its mask and progress

    @property
    def params(self) -> GenerationParams:
        return self.request.params

    @property
    def mode(self) -> DecodeMode:
        return self.request.mode

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    @property
    def context_ids(self) -> list[int]:
        """What repetition penalty and logits processors see, as in HF: the model's input so far (a
        decoder-only model's prompt and tokens; an encoder-decoder's decoder tokens, start token first)."""
        if self.decoder_start_token_id is None:
            return self.all_ids
        return [self.decoder_start_token_id] + self.token_ids

    @property
    def text(self) -> str:
        """The generated text so far, cut before a stop string."""
        return self.decoder.final_text()


class Stepper:
    """The stepping engine over one decode graph: one run over a `Model` (its batch's state, rows and plan).
    Create with `Generator.stepper(...)`. Not thread-safe."""

    def __init__(self, model: Model, mode: DecodeMode, *, max_step_tokens: int | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        if problem := step_budget_problem(max_step_tokens):
            raise GenerationParameterError(problem)
        self.model = model  # the loaded bundle this run is over (a Generator is one)
        self.default_mode = mode
        self.graph = mode.graph
        self.state: BatchState = model.decode_state(self.graph)
        # chunks and stored prefixes need a state that takes chunks (an encoder-decoder's prompt is one pass)
        self.chunked = isinstance(self.state, ChunkedState) and (max_step_tokens is not None or
                                                                  prefix_cache is not None)
        self.max_step_tokens = max_step_tokens if self.chunked else None
        # a chunk beside decoding rows is charged its attention (None: its tokens alone; a benchmark compares)
        self.past_per_token: float | None = past_entries_per_token(model.manifest.hidden_size)
        self.prefix_cache = prefix_cache if self.chunked else None
        # a MIXED graph runs the batch's decode step and one joining prompt's chunk in one call
        self.mixed = model.mixed_session(self.graph) if self.chunked and isinstance(
            self.state, InPlaceDecodeState) else None
        self._rows: dict[int, Row] = {}
        self._batch: list[int] = []  # row ids in the order of the state's batch
        self._prefills: dict[int, _Prefill] = {}  # joining rows, in the order they joined
        self._last: StepOutput | None = None
        self._last_rows: list[int] = []
        self.last_plan: StepPlan | None = None  # the plan the last step ran (what a step log reports)
        self._next_id = 0

    # -- rows ------------------------------------------------------------------------------------

    @property
    def exits(self) -> tuple[Exit, ...]:
        """The exits whose logits every step returns, in `exit_logits` order."""
        return self.graph.exits

    @property
    def done(self) -> bool:
        """No row is running or waiting to join."""
        return not self._prefills and all(self._rows[r].done for r in self._batch)

    @property
    def running(self) -> list[int]:
        """Rows that are decoding or joining (a joining row gains its first token once its prompt is in)."""
        return [r for r in self._batch if not self._rows[r].done] + list(self._prefills)

    @property
    def prefilling(self) -> list[int]:
        """Joining rows: their prompt is not (wholly) in the cache yet."""
        return list(self._prefills)

    def row(self, row_id: int) -> Row:
        try:
            return self._rows[row_id]
        except KeyError:
            raise RowError(f"row {row_id!r} is not in this stepper (it was never added, or was dropped)") from None

    def add(self, prompt: Prompt, params: GenerationParams | None = None, *,
            multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
            **param_fields: Any) -> int:
        """Queue a prompt; it is prefilled at the next `step()`, which gives it its first token. Returns its row id.

        Makes its `Request` (`Model.request`, where it is checked) and `submit`s it; `multi_exit`
        (default: the stepper's mode) must be servable by the stepper's graph.
        """
        mode = self.default_mode if multi_exit is None else multi_exit
        return self.submit(self.model.request(prompt, params, multi_exit=mode, chat=chat,
                                              fused_contrast=fused_contrast, graph=self.graph, **param_fields))

    def submit(self, request: Request) -> int:
        """Queue a request made by `Model.request` whose mode runs on this stepper's graph; it is prefilled at
        the next `step()` (PREFILLING from now on). Returns its row id (`row(id).request` is `request`)."""
        if request.mode.graph is None or request.mode.graph.name != self.graph.name:
            where = "no graph" if request.mode.graph is None else f"graph {request.mode.graph.name!r}"
            raise GenerationParameterError(f"this stepper runs graph {self.graph.name!r}; the request's mode runs on "
                                           f"{where}: submit it to a stepper made for that mode")
        request.admit()
        gen, params = self.model, request.params
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                       else frozenset(gen.manifest.eos_token_ids))
        row = Row(self._next_id, request, stop_ids, StreamDecoder(gen.tokenizer, stop_strings=params.stop_strings),
                  vocab_size=gen.manifest.vocab_size)
        if gen.manifest.encoder_decoder is not None:
            row.decoder_start_token_id = gen.manifest.encoder_decoder.decoder_start_token_id
        if params.constraint is not None:
            row.constraint = RowConstraint(params.constraint, gen.grammar_tokenizer())
        self._next_id += 1
        self._rows[row.id] = row
        self._prefills[row.id] = _Prefill(list(request.prompt_ids))
        return row.id

    def drop(self, row_id: int) -> Row:
        """Remove a row (running or finished) now; its computation stops. Returns its final state."""
        return self.drop_rows([row_id])[0]

    def drop_rows(self, row_ids: list[int]) -> list[Row]:
        """Remove several rows at once: one reshaping of the batch's cache, however many leave. A request that
        had not ended is CANCELLED."""
        rows = [self.row(r) for r in row_ids]
        for row in rows:
            if not row.request.status.final:
                row.request.move(RequestStatus.CANCELLED)
        leaving = set(row_ids)
        for row_id in leaving:
            self._prefills.pop(row_id, None)
        if leaving & set(self._batch):
            self._keep([i for i, r in enumerate(self._batch) if r not in leaving])
        for row_id in leaving:
            del self._rows[row_id]
        return rows

    def rewind_to(self, row_id: int, length: int) -> None:
        """Cut a row back to its first `length` tokens (prompt + generated); the next step continues from there.

        A finished row comes back to life. Rewinding into the prompt shortens the prompt (the request's).
        The request is DECODING again, or PREFILLING when its prompt is computed anew.
        """
        row = self.row(row_id)
        total = len(row.all_ids)
        if not isinstance(length, (int, np.integer)) or not 1 <= length <= total:
            raise GenerationParameterError(f"rewind length ({length!r}) must be within 1..{total} (row {row_id} has "
                                           f"{total} tokens)")
        ids = row.all_ids[:length]
        row.request.prompt_ids, row.token_ids = ids[:len(row.prompt_ids)], ids[len(row.prompt_ids):]
        row.finish_reason = None
        row.decoder = StreamDecoder(self.model.tokenizer, stop_strings=row.params.stop_strings)
        for token in row.token_ids:
            row.decoder.push(token)
        row.decoder.emitted = row.decoder.text  # what was streamed before stays streamed
        if row.constraint is not None:
            row.constraint.restart(row.token_ids)
        if row_id in self._batch:
            index = self._batch.index(row_id)
            if self.state.rewind_row(index, length - 1) is Rewind.PREFILL_AGAIN:  # an encoder-decoder's prompt
                self._keep([i for i in range(len(self._batch)) if i != index])
        if row_id not in self._batch:  # prefilled again from the start (a chunked one's partial cache is dropped)
            self._prefills.pop(row_id, None)
            self._prefills[row_id] = _Prefill(ids)
        row.request.move(RequestStatus.DECODING if row_id in self._batch else RequestStatus.PREFILLING)

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Give every decoding row one more token and joining rows their prompt (or its next chunk); a
        joining row gets its first token in the step its prompt is in. Finished rows leave at the next step.

        Each row's request gets its token (`Request.deliver`: status, timing, sink). A step that raises fails
        every request not ended (FAILED, the exception to its sink): the stepper is spent."""
        try:
            plan = self.plan()
        except Exception as err:
            self._fail(err)
            raise
        return self.run(plan)

    def _fail(self, err: Exception) -> None:
        for row in self._rows.values():
            if not row.request.status.final:
                row.request.fail(err)

    def plan(self) -> StepPlan:
        """The next step's plan (finished rows leave the batch first)."""
        if any(self._rows[r].done for r in self._batch):
            self._keep([i for i, r in enumerate(self._batch) if not self._rows[r].done])
        if self.prefix_cache is not None:
            for prefill in self._prefills.values():
                if not prefill.looked_up:
                    prefill.looked_up = True
                    prefill.done, prefill.seed = self.prefix_cache.lookup(prefill.ids)
        pending = [Pending(r, p.done, len(p.ids)) for r, p in self._prefills.items()]
        return plan_step(self._batch, pending, self.max_step_tokens, past_per_token=self.past_per_token)

    def run(self, plan: StepPlan) -> list[TokenEvent]:
        """Run a plan made by `plan()` (nothing changed since); the tokens chosen, each delivered to its request."""
        try:
            return self._run(plan)
        except Exception as err:
            self._fail(err)
            raise

    def _run(self, plan: StepPlan) -> list[TokenEvent]:
        self.last_plan = plan
        parts, joined = [], []
        self.state.fused_outputs = self._fused_outputs()  # a graph fusing both the contrast and DoLa skips the other
        for prefill in self._prefills.values():
            if prefill.state is not None:
                prefill.state.fused_outputs = self.state.fused_outputs
        groups: list[tuple[list[int], ChunkedState]] = []  # rows whose prompt is in, and the state holding them
        beside = self._beside(plan)
        if plan.decode:
            pending = np.array([self._rows[r].all_ids[-1] for r in self._batch], dtype=np.int64)  # (batch,)
            if beside is None:
                parts.append(self.state.advance(pending))
            else:  # the decode step and the first chunk, one pass over the weights
                decoded, joined_out = self._mixed(pending, beside)
                parts.append(decoded)
                if beside.final:
                    parts.append(joined_out)
                    groups.append(([beside.row], self._prefills[beside.row].state))
        if self.chunked:
            fresh = [c.row for c in plan.chunks if c.final and self._prefills[c.row].fresh and c is not beside]
            if fresh:  # whole prompts of rows not started: prefilled together, one call, each distinct prompt once
                distinct: dict[tuple[int, ...], int] = {}
                where = [distinct.setdefault(tuple(self._prefills[r].ids), len(distinct)) for r in fresh]
                state = self._new_state()
                out = state.extend([list(ids) for ids in distinct])
                if len(distinct) < len(fresh):  # rows sharing a prompt (a request's n choices) copy its cache
                    state.keep(where)
                    out = out.rows(np.array(where, dtype=np.int64))
                parts.append(out)
                groups.append((fresh, state))
            for chunk in plan.chunks:
                if chunk.row not in fresh and chunk is not beside:
                    out = self._prefill(chunk)
                    if chunk.final:
                        parts.append(out)
                        groups.append(([chunk.row], self._prefills[chunk.row].state))
            joined = [r for rows, _ in groups for r in rows]
        elif plan.chunks:  # whole prompts, together, straight into the batch
            whole = [c.row for c in plan.chunks]
            parts.append(self.state.extend([self._prefills.pop(r).ids for r in whole],
                                           prompt_lengths=[len(self._rows[r].prompt_ids) for r in whole]))
            self._batch += whole
        if not parts:
            return []
        self._last, self._last_rows = StepOutput.concat(parts), self._batch + joined
        events = self._choose()
        for rows, state in groups:  # prompts that are in: into the batch, unless their first token ended them
            self._join(rows, state)
        return events

    def _new_state(self, *, seed: list[np.ndarray] | None = None, columns: int | None = None,
                   empty_row: bool = False) -> ChunkedState:
        """A state of the batch's kind for joining rows (one holding `seed`, a stored prefix, when given; one empty
        row with `empty_row`, which only a KV buffer's state makes; room for `columns` entries), computing the
        fused outputs the batch does."""
        kind, pad, session = type(self.state), self.model.pad_token_id, self.state.session
        if seed is not None:
            state = kind.seeded(session, seed, pad_token_id=pad, columns=columns)
        elif empty_row:
            state = InPlaceDecodeState.empty_row(session, columns=columns, pad_token_id=pad)
        else:
            state = kind(session, pad_token_id=pad)
        state.fused_outputs = self.state.fused_outputs
        return state

    def _beside(self, plan: StepPlan) -> PromptChunk | None:
        """The chunk to run beside the decode step in the MIXED graph, if any: the first one not among whole
        prompts joining together (those are prefilled in one call of their own), or the one whole prompt."""
        if self.mixed is None or not plan.decode or not plan.chunks:
            return None
        together = [c for c in plan.chunks if c.final and self._prefills[c.row].fresh]
        apart = [c for c in plan.chunks if c not in together] + (together if len(together) == 1 else [])
        return apart[0] if apart else None

    def _mixed(self, pending: np.ndarray, chunk: PromptChunk) -> tuple[StepOutput, StepOutput]:
        """The batch's decode step (`pending`: each row's last token) and `chunk` of a joining prompt, in one call
        of the MIXED graph; the prompt's state is made at its first chunk, with room for the whole prompt."""
        prefill = self._prefills[chunk.row]
        if prefill.state is None:  # from its stored prefix, or from nothing
            prefill.state = self._new_state(seed=prefill.seed, columns=len(prefill.ids), empty_row=prefill.seed is None)
            prefill.seed = None
        prefill.done = chunk.stop
        tokens = np.array([prefill.ids[chunk.start:chunk.stop]], dtype=np.int64)  # (1, n)
        return mixed_step(self.mixed, self.state, pending, prefill.state, tokens, fused=self.state.fused_outputs)

    def _fused_outputs(self) -> frozenset[str]:
        """The fused outputs the modes of the rows in this stepper read."""
        return frozenset(o for r in [*self._batch, *self._prefills] if (o := self._rows[r].mode.fused_output))

    def _prefill(self, chunk: PromptChunk) -> StepOutput:
        """Put one chunk of a joining row's prompt into the row's own state; the chunk's last outputs."""
        prefill = self._prefills[chunk.row]
        tokens = np.array([prefill.ids[chunk.start:chunk.stop]], dtype=np.int64)  # (1, n)
        if prefill.state is None and prefill.seed is not None:
            prefill.state = self._new_state(seed=prefill.seed, columns=len(prefill.ids))
            prefill.seed = None
        elif prefill.state is None:
            prefill.state = self._new_state()
            prefill.done = chunk.stop
            # room for the whole prompt now: growing the buffer halfway copies every layer in one step (250-400 ms
            # at 1,024 of SmolLM2's tokens on 2 cores), a stall for every row decoding beside it
            return prefill.state.extend(tokens, columns=len(prefill.ids))
        prefill.done = chunk.stop
        return prefill.state.feed(tokens)

    def _join(self, rows: list[int], state: ChunkedState) -> None:
        """Rows whose prompt is in (the rows of `state`, in order): store each prompt's cache for later
        prompts, then move them into the batch; a row that ended at its first token never joins (nothing of
        the batch is copied for it)."""
        prefills = [self._prefills.pop(r) for r in rows]
        going_on = [i for i, r in enumerate(rows) if not self._rows[r].done]
        if self.prefix_cache is not None and self.prefix_cache.max_bytes:
            # views of a one-row state that is spent (nothing writes its buffer again); copies otherwise: a
            # joining row's buffer may become the batch's, written in place (a rewind writes over the prompt)
            spent = len(rows) == 1 and not going_on
            for prefill, entries in zip(prefills, state.prefixes(), strict=True):
                self.prefix_cache.put(prefill.ids, entries if spent else [e.copy() for e in entries])
        if not going_on:
            return
        if len(going_on) < len(rows):
            state.keep(going_on)
        self.state.absorb(state)
        self._batch += [rows[i] for i in going_on]

    def _keep(self, indices: list[int]) -> None:
        self.state.keep(indices)
        self._batch = [self._batch[i] for i in indices]
        if self._last is not None:  # logits of rows still here stay readable
            here = set(self._batch)
            keep = [i for i, r in enumerate(self._last_rows) if r in here]
            self._last, self._last_rows = self._last.rows(np.array(keep, dtype=np.int64)), \
                [self._last_rows[i] for i in keep]

    def _choose(self) -> list[TokenEvent]:
        """Each row's next token, delivered to its request."""
        rows = [self._rows[r] for r in self._last_rows]
        scores = self._mode_scores(rows)
        events = []
        for i, row in enumerate(rows):
            token = self._pick(row, scores[i])
            row.token_ids.append(token)
            delta = row.decoder.push(token)
            if row.constraint is not None:
                row.constraint.advance(token)
            row.finish_reason = finish_reason(token, len(row.token_ids), stop_ids=row.stop_ids,
                                              max_new_tokens=row.params.max_new_tokens,
                                              stop_string_hit=row.decoder.stop_at is not None,
                                              constraint_done=row.constraint is not None and row.constraint.finished)
            if row.finish_reason is not None:
                delta += row.decoder.flush()
            events.append(TokenEvent(row.id, token, delta, row.finish_reason,
                                     *_logprobs(scores[i], token, row.params.logprobs),
                                     self._exit_logprobs(i, row, token)))
        now = time.perf_counter()
        for row, event in zip(rows, events, strict=True):
            row.request.deliver(event, now)
        return events

    def _exit_logprobs(self, position: int, row: Row, token: int) -> tuple[ExitLogprobs, ...]:
        """Under each exit the row's mode reads, alone: the token's log-probability and the most likely tokens."""
        if not row.params.exit_logprobs:
            return ()
        logits = self._last.exit_logits[position]  # (n_exits, vocab)
        out = []
        for index in row.mode.positions:
            logp = log_softmax(logits[index].astype(np.float64))
            out.append(ExitLogprobs(str(self.graph.exits[index]), float(logp[token]),
                                    tuple(sampling.most_likely(logp, row.params.logprobs or 0))))
        return tuple(out)

    def _mode_scores(self, rows: list[Row]) -> list[np.ndarray]:
        """Each row's (vocab,) scores under its own mode, rows of one mode computed together."""
        out: list[Any] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        modes: dict[int, DecodeMode] = {}
        for i, row in enumerate(rows):
            key = next((k for k, m in modes.items() if m == row.mode), len(modes))
            modes[key] = row.mode
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            part = self._last if len(members) == len(rows) else self._last.rows(np.array(members, dtype=np.int64))
            for i, s in zip(members, modes[key].scores(part), strict=True):
                out[i] = s
        return out

    @staticmethod
    def _pick(row: Row, scores: np.ndarray) -> int:
        """Penalties, logit_bias, min_new_tokens, logits processors, the constraint's mask, then the search
        (`GenerationParams`' order)."""
        params = row.params
        scores = scores[None, :]  # (1, vocab)
        if params.repetition_penalty != 1.0:
            scores = sampling.apply_repetition_penalty(scores, [np.asarray(row.context_ids, dtype=np.int64)],
                                                       params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:  # the decode loop builds no id array otherwise
            scores = sampling.apply_presence_frequency(scores, [np.asarray(row.token_ids, dtype=np.int64)],
                                                       params.presence_penalty, params.frequency_penalty)
        if params.logit_bias:
            scores = sampling.apply_logit_bias(scores, params.logit_bias)
        if len(row.token_ids) < params.min_new_tokens and row.suppressed_ids.size:
            scores = scores.copy()
            scores[0, row.suppressed_ids] = -np.inf
        for processor in params.logits_processors:
            ids = np.asarray(row.context_ids, dtype=np.int64)
            scores = checked_scores(processor(ids, scores[0].copy()), scores.shape[1:], processor)[None, :]
        if row.constraint is not None:
            scores = row.constraint.mask(scores[0])[None, :]
        if not params.do_sample:
            return int(sampling.greedy(scores)[0])
        warped = sampling.warp(scores, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        return int(sampling.sample(warped, row.rng)[0])

    # -- this step's logits ----------------------------------------------------------------------

    def _position(self, row_id: int) -> int:
        self.row(row_id)
        if self._last is None or row_id not in self._last_rows:
            raise RowError(f"row {row_id} has no logits yet: call step() first")
        return self._last_rows.index(row_id)

    def exit_logits(self, row_id: int, exit_: Exit | None = None) -> np.ndarray:
        """The last step's logits of `row_id`: (n_exits, vocab) in `exits` order, or (vocab,) of one exit."""
        position = self._position(row_id)
        logits = self._last.exit_logits[position]  # (n_exits, vocab)
        if exit_ is None:
            return logits
        manifest = self.model.manifest
        name = next((a for a in manifest.aliases(exit_) if a in self.graph.exits), None)
        if name is None:
            raise UnknownExitError(f"exit {exit_} is not returned by graph {self.graph.name!r}; it returns "
                              f"{', '.join(map(str, self.graph.exits))}")
        return logits[self.graph.exit_position(name)]

    def scores(self, row_id: int) -> np.ndarray:
        """The last step's (vocab,) scores of the row's mode, before penalties, processors and search."""
        position = self._position(row_id)
        mode = self._rows[row_id].mode
        return mode.scores(self._last.rows(np.array([position])))[0]


def _logprobs(scores: np.ndarray, token: int, alternatives: int | None) -> tuple[float | None,
                                                                               tuple[tuple[int, float], ...]]:
    """The chosen token's log-probability under `scores` (a row's mode scores) and the `alternatives` most likely
    tokens with theirs; (None, ()) when not asked for."""
    if alternatives is None:
        return None, ()
    logp = log_softmax(np.asarray(scores, dtype=np.float64))
    return float(logp[token]), tuple(sampling.most_likely(logp, alternatives))
