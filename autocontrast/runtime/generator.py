"""`Generator`: load a bundle once, generate from many threads, in any decoding mode.

>>> from autocontrast.config import MultiExitConfiguration
>>> from autocontrast.runtime import Generator
>>> gen = Generator("smollm2-acd")  # doctest: +SKIP
>>> acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15))
>>> gen.generate("The history of Paris", multi_exit=acd, max_new_tokens=32).text  # doctest: +SKIP
>>> for delta in gen.stream("Tell me a joke", chat=True):  # doctest: +SKIP
...     print(delta, end="", flush=True)

A `Generator` is a loaded `Model` (`autocontrast.runtime.model`: manifest, sessions, tokenizer,
modes) with the drivers on top: `generate` and `stream` make a `Request` per prompt (`Model.request`,
checked there) and drive a `Stepper` over their mode (`autocontrast.runtime.stepper`; `Generator.stepper` makes one)
in the caller's thread: breaking out of a stream stops all computation at once. Every call keeps its
state (KV cache, RNG) to itself, so one Generator serves many threads at once.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from autocontrast.bundle import SCORE
from autocontrast.config import Exit, MultiExitConfiguration
from autocontrast.errors import BundleError, PromptError, UnknownExitError
from autocontrast.runtime.model import Model, Prompt
from autocontrast.runtime.modes import graph_with_exits, resolve_mode
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.prefix_cache import PrefixCache
from autocontrast.runtime.request import Request
from autocontrast.runtime.row_reshape import Align, pad_ragged
from autocontrast.runtime.stepper import Stepper

__all__ = ["GenerationResult", "Generator", "Prompt", "TextStream", "Timings"]


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
    finish_reasons: list[str]  # 'eos', 'stop_string', 'constraint' or 'length'
    prompt_token_ids: list[list[int]]
    timings: Timings
    requests: tuple[Request, ...] = ()  # one per prompt, each FINISHED

    @property
    def text(self) -> str:
        """The text of the first (or only) prompt."""
        return self.texts[0]


class Generator(Model):
    """A loaded bundle (`Model`) that generates: `generate`, `stream`, `stepper` and scoring.

    `provider`: 'cpu' (default), 'cuda' or 'tensorrt', never silently swapped; `share_weights=True`
    (CPU): every graph reads one memory map of the weights (see `Model`).
    """

    def stepper(self, multi_exit: MultiExitConfiguration | None = None, *, fused_contrast: bool = True,
                max_step_tokens: int | None = None, prefix_cache: PrefixCache | None = None) -> Stepper:
        """A new stepping engine on the graph of `multi_exit`'s mode (default: the original head).

        `max_step_tokens`: prompts join in chunks so that a step feeds about that many tokens (None:
        whole prompts); `prefix_cache`: joining prompts start from the longest prefix stored there.

        >>> stepper = gen.stepper(acd)  # doctest: +SKIP
        >>> row = stepper.add("The history of Paris", max_new_tokens=8)  # doctest: +SKIP
        >>> while not stepper.done:  # doctest: +SKIP
        ...     for event in stepper.step():
        ...         print(event.text, end="")
        """
        return Stepper(self, self.mode(multi_exit, fused=fused_contrast), max_step_tokens=max_step_tokens,
                       prefix_cache=prefix_cache)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], params: GenerationParams | None = None, *,
                 multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
                 **param_fields: Any) -> GenerationResult:
        """Generate for one prompt or a batch (prefilled together; each row stops on its own).

        `multi_exit` picks the mode (default: the original head); `params` or keyword fields of
        `GenerationParams` pick the search (default: greedy, 64 new tokens).
        """
        params = self.params(params, param_fields)
        batch = _as_batch(prompts)
        mode = self.mode(multi_exit, fused=fused_contrast)
        requests = [self.request(p, params, multi_exit=mode, chat=chat) for p in batch]
        stepper = Stepper(self, mode)
        rows = [stepper.submit(r) for r in requests]
        start = time.perf_counter()
        stamps = []
        while not stepper.done:
            stepper.step()
            stamps.append(time.perf_counter() - start)
        done = [stepper.row(r) for r in rows]
        # a row's tokens are chosen at steps 1..n: its timings are those of the longest row
        timings = Timings(ttft_s=stamps[0], step_s=tuple(np.diff(stamps)))
        return GenerationResult([r.token_ids for r in done], [r.text for r in done],
                                [str(r.finish_reason) for r in done], [r.prompt_ids for r in done], timings,
                                tuple(requests))

    def stream(self, prompt: Prompt, params: GenerationParams | None = None, *,
               multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
               **param_fields: Any) -> TextStream:
        """Text deltas of one prompt as they are generated; joined, they equal `generate(...).text`.

        An iterator in the caller's thread, computing only when asked for the next delta: `break` stops
        the computation at once, `close()` (or `request.cancel()`, from any thread) ends it.
        """
        mode = self.mode(multi_exit, fused=fused_contrast)
        request = self.request(prompt, params, multi_exit=mode, chat=chat, **param_fields)
        stepper = Stepper(self, mode)
        return TextStream(stepper, stepper.submit(request))

    # -- scoring ------------------------------------------------------------------------------

    def exit_logits_all_positions(self, token_ids: Sequence[Sequence[int]], exits: Sequence[Exit]) -> list[np.ndarray]:
        """Every position's logits of `exits`, per sequence: [(seq, len(exits), vocab)], float32.

        Runs the bundle's score graph (right-padded batch; causal attention keeps pads out of
        real positions). Memory grows with batch * seq * exits * vocab: batch long texts in chunks.
        """
        rows = self._scored_rows(token_ids)
        longest = max(len(r) for r in rows)
        found = graph_with_exits(self.manifest, tuple(exits), kind=SCORE)
        if found is None:
            raise UnknownExitError(f"this bundle has no score graph returning exits {list(exits)}; "
                                   "re-export without --no-score-graph and with those exits")
        graph, names = found
        ids, mask = pad_ragged(rows, pad=self.pad_token_id, align=Align.LEFT)  # (batch, seq), right-padded
        positions = np.broadcast_to(np.arange(longest, dtype=np.int64), ids.shape).copy()
        out = self.session(graph).step(ids, mask, positions, None)  # (batch, seq, n_exits, vocab)
        picked = out.exit_logits[:, :, [graph.exit_position(n) for n in names], :]
        return [picked[i, :len(row)] for i, row in enumerate(rows)]

    def mode_scores_all_positions(self, token_ids: Sequence[int],
                                  multi_exit: MultiExitConfiguration | None = None) -> np.ndarray:
        """Every position's scores under a mode (the original head's logits, an exit's, or the contrast's
        scores for ACD): (seq, vocab), what the decoder would choose the next token from at each position.

        Runs the bundle's score graph (its fused contrast when it is exactly the one asked for).
        """
        ids = self._scored_rows([token_ids])[0]
        mode = resolve_mode(self.manifest, multi_exit or MultiExitConfiguration(), kind=SCORE)
        batch = np.array([ids], dtype=np.int64)  # (1, seq)
        positions = np.arange(len(ids), dtype=np.int64)[None, :]
        out = self.session(mode.graph).step(batch, np.ones_like(batch), positions, None)  # (1, seq, ...)
        return mode.scores(out.rows(0))

    def _scored_rows(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """The sequences to score, checked: a decoder-only bundle, each within the model's positions."""
        if self.manifest.is_encoder_decoder:
            raise BundleError("scoring token sequences needs a decoder-only bundle: an encoder-decoder (T5) "
                              "bundle's score graph reads decoder tokens against an encoded prompt, which "
                              "scoring does not take")
        if isinstance(token_ids, (str, bytes)) or len(token_ids) == 0:
            raise PromptError("no sequences to score: pass a non-empty list of token-id lists")
        rows = [self.encode(t) for t in token_ids]
        longest = max(len(r) for r in rows)
        if longest > self.manifest.max_positions:
            raise PromptError(f"a sequence of {longest} tokens exceeds the model's maximum positions "
                              f"({self.manifest.max_positions})")
        return rows


def _as_batch(prompts: Any) -> list[Any]:
    """One prompt (text or ids) as a batch of one; a list of prompts as it is."""
    if isinstance(prompts, str) or (isinstance(prompts, (Sequence, np.ndarray)) and len(prompts) > 0
                                    and isinstance(prompts[0], numbers.Number)):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, bytearray, dict)) or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a string, a list of token ids, or a list of those; "
                          f"not {type(prompts).__name__}")
    if not prompts:
        raise PromptError("no prompts were given")
    return list(prompts)


class TextStream(Iterator[str]):
    """The text deltas of one request (`Generator.stream`), each step run when the next delta is asked for.

    `request` is its `Request`: FINISHED when the stream is exhausted; `close()`, or `request.cancel()`
    before the next delta, drops it (CANCELLED) and ends the stream.
    """

    def __init__(self, stepper: Stepper, row: int) -> None:
        self._stepper, self._row = stepper, row
        self.request = stepper.row(row).request

    def __next__(self) -> str:
        while not self.request.status.final:
            if self.request.cancel_requested:
                self.close()
                break
            for event in self._stepper.step():  # one row: at most one event
                if event.text:
                    return event.text
        raise StopIteration

    def close(self) -> None:
        """Stop now: the request is CANCELLED unless it has ended, and its cache is let go."""
        if not self.request.status.final:
            self._stepper.drop(self._row)
