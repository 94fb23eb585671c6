"""`Generator`: load a bundle once, generate from many threads, in any decoding mode.

>>> from autocontrast.config import MultiExitConfiguration
>>> from autocontrast.runtime import Generator
>>> gen = Generator("smollm2-acd")  # doctest: +SKIP
>>> acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15))
>>> gen.generate("The history of Paris", multi_exit=acd, max_new_tokens=32).text  # doctest: +SKIP
>>> for delta in gen.stream("Tell me a joke", chat=True):  # doctest: +SKIP
...     print(delta, end="", flush=True)

The loop only orchestrates: an `ExitSession` computes exit logits, a `DecodeMode` turns them into
scores, pure functions sample and stop. Every call keeps its state (KV cache, RNG) to itself, so
one Generator serves many threads at once.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import SCORE, GraphSpec, read_manifest
from autocontrast.config import Exit, MultiExitConfiguration
from autocontrast.errors import GenerationParameterError, PromptError, UnknownExitError
from autocontrast.runtime import sampling
from autocontrast.runtime.detokenizer import StreamDecoder
from autocontrast.runtime.kv_cache import KVCache
from autocontrast.runtime.modes import DecodeMode, graph_with_exits, resolve_mode
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.session import ExitSession
from autocontrast.runtime.stopping import finish_reason, stop_string_cut
from autocontrast.runtime.text import chat_template, load_tokenizer, render_chat

Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Timings:
    ttft_s: float  # call start to the first token chosen (prefill included)
    step_s: tuple[float, ...]  # time of each later token

    @property
    def per_token_ms(self) -> float:
        return float(np.median(self.step_s) * 1000) if self.step_s else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per prompt (prompt excluded)
    texts: list[str]  # decoded, cut before a stop string
    finish_reasons: list[str]  # 'eos', 'stop_string' or 'length'
    prompt_token_ids: list[list[int]]
    timings: Timings

    @property
    def text(self) -> str:
        """The text of the first (or only) prompt."""
        return self.texts[0]


class Generator:
    """A loaded bundle. `provider`: 'cpu' (default), 'cuda' or 'tensorrt', never silently swapped."""

    def __init__(self, bundle: str | Path, *, provider: str = "cpu", device_id: int = 0,
                 threads: int | None = None, preload: Sequence[MultiExitConfiguration] | None = None,
                 verify: bool = False) -> None:
        self.bundle_dir = Path(bundle)
        self.manifest = read_manifest(self.bundle_dir, verify=verify)  # verify: hash every file first
        self.tokenizer = load_tokenizer(self.bundle_dir)
        self.provider, self.device_id, self.threads = provider, device_id, threads
        self._sessions: dict[str, ExitSession] = {}
        self._lock = threading.Lock()
        self._chat_template = chat_template(self.bundle_dir, self.manifest)
        special = self.manifest.special_tokens
        self.pad_token_id = int(special.get("pad_token_id") if special.get("pad_token_id") is not None
                                else (self.manifest.eos_token_ids or (0,))[0])
        # Open the graphs of the `preload` modes now (default: the original head), so a bad bundle
        # or provider fails at construction; other graphs open on first use. A service that only
        # runs ACD preloads that mode and never holds the plain graph's weights.
        for config in (MultiExitConfiguration(),) if preload is None else preload:
            self.session(self.mode(config).graph)

    # -- pieces -------------------------------------------------------------------------------

    def session(self, graph: GraphSpec) -> ExitSession:
        """The (lazily opened, shared) session of one graph."""
        with self._lock:
            if graph.name not in self._sessions:
                self._sessions[graph.name] = ExitSession(self.bundle_dir, self.manifest, graph, provider=self.provider,
                                                         device_id=self.device_id, threads=self.threads)
            return self._sessions[graph.name]

    def mode(self, multi_exit: MultiExitConfiguration | None = None, *, fused: bool = True) -> DecodeMode:
        return resolve_mode(self.manifest, multi_exit or MultiExitConfiguration(), fused=fused)

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text through the tokenizer, optionally the chat template; ids as given)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            if chat:
                text = render_chat(self._chat_template, prompt, special_tokens=self._special_token_strings())
                return self.tokenizer.encode(text, add_special_tokens=False).ids
            return self.tokenizer.encode(prompt).ids
        ids = [int(t) for t in prompt]
        if not ids:
            raise PromptError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.manifest.vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary 0..{self.manifest.vocab_size - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _special_token_strings(self) -> dict[str, str]:
        path = self.bundle_dir / "special_tokens_map.json"
        if not path.is_file():
            return {}
        found = json.loads(path.read_text(encoding="utf-8"))
        return {k: (v["content"] if isinstance(v, dict) else v) for k, v in found.items() if isinstance(v, (str, dict))}

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], params: GenerationParams | None = None, *,
                 multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
                 **param_fields: Any) -> GenerationResult:
        """Generate for one prompt or a batch (left-padded; each row stops on its own).

        `multi_exit` picks the mode (default: the original head); `params` or keyword fields of
        `GenerationParams` pick the search (default: greedy, 64 new tokens).
        """
        return self._generate(prompts, params, multi_exit, chat, fused_contrast, param_fields, on_token=None)

    def stream(self, prompt: Prompt, params: GenerationParams | None = None, *,
               multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
               **param_fields: Any) -> Iterator[str]:
        """Text deltas of one prompt as they are generated; joined, they equal `generate(...).text`."""
        deltas: queue.Queue = queue.Queue()
        params = self._params(params, param_fields)
        decoder = StreamDecoder(self.tokenizer, stop_strings=params.stop_strings)

        def work() -> None:
            try:
                self._generate([prompt] if isinstance(prompt, str) else [list(prompt)], params, multi_exit, chat,
                               fused_contrast, {}, on_token=lambda row, token, reason: deltas.put(decoder.push(token)))
                deltas.put(decoder.flush())
                deltas.put(None)
            except BaseException as err:  # re-raised in the consumer's thread
                deltas.put(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            item = deltas.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
        thread.join()

    def _params(self, params: GenerationParams | None, fields: dict[str, Any]) -> GenerationParams:
        if params is not None and fields:
            return dataclasses.replace(params, **fields)
        try:
            return params or GenerationParams(**fields)
        except TypeError as err:
            raise GenerationParameterError(f"unknown generation parameter: {err}") from None

    def _generate(self, prompts: Any, params: GenerationParams | None, multi_exit: MultiExitConfiguration | None,
                  chat: bool, fused: bool, fields: dict[str, Any],
                  on_token: Callable[[int, int, str | None], None] | None) -> GenerationResult:
        params = self._params(params, fields)
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise PromptError("no prompts were given")
        rows = [self.encode(p, chat=chat) for p in batch]
        longest = max(len(r) for r in rows)
        if longest + params.max_new_tokens > self.manifest.max_positions:
            raise PromptError(f"prompt ({longest} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                              f"model's maximum positions ({self.manifest.max_positions})")
        mode = self.mode(multi_exit, fused=fused)
        return self._decode(rows, params, mode, on_token)

    def _decode(self, rows: list[list[int]], params: GenerationParams, mode: DecodeMode,
                on_token: Callable[[int, int, str | None], None] | None) -> GenerationResult:
        session = self.session(mode.graph)
        batch, width = len(rows), max(len(r) for r in rows)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)  # (batch, width), left-padded
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (batch, width)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                       else frozenset(self.manifest.eos_token_ids))
        rng = np.random.default_rng(params.seed)
        generated: list[list[int]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * batch
        cache = KVCache(self.manifest.kv_cache, batch)
        start = time.perf_counter()
        stamps = []
        out = session.step(ids, mask, positions, cache)
        next_position = positions[:, -1:] + 1  # (batch, 1)
        while True:
            tokens = self._choose(mode.scores(out), rows, generated, params, rng)  # (batch,)
            stamps.append(time.perf_counter() - start)
            for i in range(batch):
                if reasons[i] is not None:
                    continue
                token = int(tokens[i])
                generated[i].append(token)
                text = self.decode(generated[i]) if params.stop_strings else None
                reasons[i] = finish_reason(token, len(generated[i]), stop_ids=stop_ids, text=text,
                                           max_new_tokens=params.max_new_tokens, stop_strings=params.stop_strings)
                if on_token is not None:
                    on_token(i, token, reasons[i])
            if all(r is not None for r in reasons):
                break
            step = np.where([r is None for r in reasons], tokens, self.pad_token_id)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)  # (batch, past + 1)
            out = session.step(step, mask, next_position, cache)
            next_position = next_position + 1
        texts = [self._final_text(g, params.stop_strings) for g in generated]
        timings = Timings(ttft_s=stamps[0], step_s=tuple(np.diff(stamps)))
        return GenerationResult(generated, texts, [str(r) for r in reasons], rows, timings)

    @staticmethod
    def _choose(scores: np.ndarray, rows: list[list[int]], generated: list[list[int]], params: GenerationParams,
                rng: np.random.Generator) -> np.ndarray:
        if params.repetition_penalty != 1.0:
            seen = [np.asarray(r + g, dtype=np.int64) for r, g in zip(rows, generated, strict=True)]
            scores = sampling.apply_repetition_penalty(scores, seen, params.repetition_penalty)
        if not params.do_sample:
            return sampling.greedy(scores)
        warped = sampling.warp(scores, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        return sampling.sample(warped, rng)

    def _final_text(self, ids: list[int], stop_strings: tuple[str, ...]) -> str:
        text = self.decode(ids)
        at = stop_string_cut(text, stop_strings) if stop_strings else None
        return text if at is None else text[:at]

    # -- scoring ------------------------------------------------------------------------------

    def exit_logits_all_positions(self, token_ids: Sequence[Sequence[int]], exits: Sequence[Exit]) -> list[np.ndarray]:
        """Every position's logits of `exits`, per sequence: [(seq, len(exits), vocab)], float32.

        Runs the bundle's score graph (right-padded batch; causal attention keeps pads out of
        real positions). Memory grows with batch * seq * exits * vocab: batch long texts in chunks.
        """
        rows = [self.encode(list(t)) for t in token_ids]
        longest = max(len(r) for r in rows)
        if longest > self.manifest.max_positions:
            raise PromptError(f"a sequence of {longest} tokens exceeds the model's maximum positions "
                              f"({self.manifest.max_positions})")
        found = graph_with_exits(self.manifest, tuple(exits), kind=SCORE)
        if found is None:
            raise UnknownExitError(f"this bundle has no score graph returning exits {list(exits)}; "
                                   "re-export without --no-score-graph and with those exits")
        graph, names = found
        ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)  # (batch, seq), right-padded
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        positions = np.broadcast_to(np.arange(longest, dtype=np.int64), ids.shape).copy()
        out = self.session(graph).step(ids, mask, positions, None)  # (batch, seq, n_exits, vocab)
        picked = out.exit_logits[:, :, [graph.exit_position(n) for n in names], :]
        return [picked[i, :len(row)] for i, row in enumerate(rows)]
