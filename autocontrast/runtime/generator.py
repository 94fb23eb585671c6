"""`Generator`: load a bundle once, generate from many threads, in any decoding mode.

>>> from autocontrast.config import MultiExitConfiguration
>>> from autocontrast.runtime import Generator
>>> gen = Generator("smollm2-acd")  # doctest: +SKIP
>>> acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15))
>>> gen.generate("The history of Paris", multi_exit=acd, max_new_tokens=32).text  # doctest: +SKIP
>>> for delta in gen.stream("Tell me a joke", chat=True):  # doctest: +SKIP
...     print(delta, end="", flush=True)

`generate` and `stream` are thin drivers of the stepping engine (`Generator.stepper`, see
`autocontrast.runtime.stepper`), in the caller's thread: breaking out of a stream stops all
computation at once. Every call keeps its state (KV cache, RNG) to itself, so one Generator serves
many threads at once.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import SCORE, GraphSpec, read_manifest
from autocontrast.config import Exit, MultiExitConfiguration
from autocontrast.errors import (
    BundleError,
    GenerationParameterError,
    PromptError,
    RuntimeOptionError,
    UnknownExitError,
)
from autocontrast.runtime.batch_state import BatchState
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.encoder import EncoderSession, open_encoder
from autocontrast.runtime.encoder_decoder_state import EncoderDecoderState
from autocontrast.runtime.modes import DecodeMode, graph_with_exits, resolve_mode
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.prefix_cache import PrefixCache
from autocontrast.runtime.session import ExitSession, open_session, shared_file_session
from autocontrast.runtime.stepper import Stepper
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
    """A loaded bundle. `provider`: 'cpu' (default), 'cuda' or 'tensorrt', never silently swapped.

    `share_weights=True` (CPU): every graph this Generator opens (and any other Generator on the
    same bundle in this process) reads one memory map of the weights file, so serving the original
    head, an exit and ACD holds the weights once, not once per graph; the step is slower (no
    pre-packed MatMul weights). See `autocontrast.runtime.weights` and the README's figures.
    """

    MAX_THREADS = 1024

    def __init__(self, bundle: str | Path, *, provider: str = "cpu", device_id: int = 0,
                 threads: int | None = None, preload: Sequence[MultiExitConfiguration] | None = None,
                 verify: bool = False, share_weights: bool = False) -> None:
        if threads is not None and (not isinstance(threads, numbers.Integral) or isinstance(threads, bool)
                                    or not 1 <= threads <= self.MAX_THREADS):
            raise RuntimeOptionError(f"threads ({threads!r}) must be an integer within 1..{self.MAX_THREADS} "
                                     f"(this machine has {os.cpu_count()} cores; None lets onnxruntime choose)")
        self.bundle_dir = Path(bundle)
        self.manifest = read_manifest(self.bundle_dir, verify=verify)  # verify: hash every file first
        self.tokenizer = load_tokenizer(self.bundle_dir)
        self.provider, self.device_id, self.threads = provider, device_id, threads
        self.share_weights = bool(share_weights)
        self._sessions: dict[str, ExitSession] = {}
        self._encoder: EncoderSession | None = None  # an encoder-decoder bundle's, opened on first use
        self._lock = threading.Lock()
        self._chat_template = chat_template(self.bundle_dir, self.manifest)
        self.pad_token_id = self.manifest.padding_token_id
        # Open the graphs of the `preload` modes now (default: the original head), so a bad bundle
        # or provider fails at construction; other graphs open on first use. A service that only
        # runs ACD preloads that mode and never holds the plain graph's weights.
        for config in (MultiExitConfiguration(),) if preload is None else preload:
            self.session(self.mode(config).graph)
        if self.manifest.is_encoder_decoder:
            self.encoder_session()

    # -- pieces -------------------------------------------------------------------------------

    def session(self, graph: GraphSpec) -> ExitSession:
        """The (lazily opened, shared) session of one graph."""
        with self._lock:
            if graph.name not in self._sessions:
                self._sessions[graph.name] = open_session(self.bundle_dir, self.manifest, graph,
                                                          provider=self.provider, device_id=self.device_id,
                                                          threads=self.threads, share_weights=self.share_weights,
                                                          session=shared_file_session(self._sessions.values(), graph))
            return self._sessions[graph.name]

    def decode_state(self, graph: GraphSpec) -> BatchState:
        """A new, empty batch state over one decode graph (an encoder-decoder bundle's runs its encoder too)."""
        spec = self.manifest.encoder_decoder
        if spec is None:
            return open_decode_state(self.session(graph), pad_token_id=self.pad_token_id)
        return EncoderDecoderState(self.encoder_session(), self.session(graph),
                                   start_token_id=spec.decoder_start_token_id, pad_token_id=self.pad_token_id)

    def encoder_session(self) -> EncoderSession:
        """The (lazily opened, shared) encoder of an encoder-decoder bundle."""
        with self._lock:
            if self._encoder is None:
                self._encoder = open_encoder(self.bundle_dir, self.manifest, provider=self.provider,
                                             device_id=self.device_id, threads=self.threads,
                                             share_weights=self.share_weights)
            return self._encoder

    def mode(self, multi_exit: MultiExitConfiguration | None = None, *, fused: bool = True) -> DecodeMode:
        return resolve_mode(self.manifest, multi_exit or MultiExitConfiguration(), fused=fused)

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

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text through the tokenizer, optionally the chat template; ids as given)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise PromptError(f"the prompt is not valid text: {err.reason} at character {err.start} "
                                  "(a lone surrogate?); pass well-formed Unicode") from None
            if chat:
                text = render_chat(self._chat_template, prompt, special_tokens=self._special_token_strings())
                return self.tokenizer.encode(text, add_special_tokens=False).ids
            return self.tokenizer.encode(prompt).ids
        if isinstance(prompt, (bytes, bytearray, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise PromptError(f"a prompt must be a string or a sequence of token ids, not {type(prompt).__name__}; "
                              "decode bytes to str first")
        ids = list(prompt)
        if not ids:
            raise PromptError("the prompt has no tokens")
        wrong = next((t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
        if wrong is not None:
            raise PromptError(f"token ids must be integers; got {wrong!r} ({type(wrong).__name__})")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.manifest.vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary 0..{self.manifest.vocab_size - 1}")
        return ids

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ([{role, content}, ...]) through the bundle's chat template."""
        if not messages:
            raise PromptError("the conversation has no messages")
        text = render_chat(self._chat_template, list(messages), special_tokens=self._special_token_strings())
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if self.manifest.is_encoder_decoder:  # the prompt is the encoder's; the decoder starts afresh
            longest = max(prompt_tokens, max_new_tokens + 1)
            if longest > self.manifest.max_positions:
                raise PromptError(f"prompt ({prompt_tokens} tokens) or max_new_tokens ({max_new_tokens}) plus the "
                                  f"decoder's start token exceeds the model's maximum positions "
                                  f"({self.manifest.max_positions})")
            return
        if prompt_tokens + max_new_tokens > self.manifest.max_positions:
            raise PromptError(f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's maximum positions ({self.manifest.max_positions})")

    def params(self, params: GenerationParams | None, fields: dict[str, Any]) -> GenerationParams:
        """`params` with `fields` replaced (or `GenerationParams(**fields)`); unknown fields are a typed error."""
        known = {f.name for f in dataclasses.fields(GenerationParams)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise GenerationParameterError(f"unknown generation parameter(s): {', '.join(unknown)}; known: "
                                           f"{', '.join(sorted(known))}")
        if params is not None and not isinstance(params, GenerationParams):
            raise GenerationParameterError(f"params must be a GenerationParams, not {type(params).__name__}")
        return dataclasses.replace(params, **fields) if params is not None else GenerationParams(**fields)

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
        """Generate for one prompt or a batch (prefilled together; each row stops on its own).

        `multi_exit` picks the mode (default: the original head); `params` or keyword fields of
        `GenerationParams` pick the search (default: greedy, 64 new tokens).
        """
        params = self.params(params, param_fields)
        batch = _as_batch(prompts)
        stepper = self.stepper(multi_exit, fused_contrast=fused_contrast)
        rows = [stepper.add(p, params, chat=chat) for p in batch]
        start = time.perf_counter()
        stamps = []
        while not stepper.done:
            stepper.step()
            stamps.append(time.perf_counter() - start)
        done = [stepper.row(r) for r in rows]
        # a row's tokens are chosen at steps 1..n: its timings are those of the longest row
        timings = Timings(ttft_s=stamps[0], step_s=tuple(np.diff(stamps)))
        return GenerationResult([r.token_ids for r in done], [r.text for r in done],
                                [str(r.finish_reason) for r in done], [r.prompt_ids for r in done], timings)

    def stream(self, prompt: Prompt, params: GenerationParams | None = None, *,
               multi_exit: MultiExitConfiguration | None = None, chat: bool = False, fused_contrast: bool = True,
               **param_fields: Any) -> Iterator[str]:
        """Text deltas of one prompt as they are generated; joined, they equal `generate(...).text`.

        A plain generator in the caller's thread: `break` (or `close()`) stops the computation at once.
        """
        stepper = self.stepper(multi_exit, fused_contrast=fused_contrast)
        stepper.add(prompt, self.params(params, param_fields), chat=chat)
        return _deltas(stepper)

    # -- scoring ------------------------------------------------------------------------------

    def exit_logits_all_positions(self, token_ids: Sequence[Sequence[int]], exits: Sequence[Exit]) -> list[np.ndarray]:
        """Every position's logits of `exits`, per sequence: [(seq, len(exits), vocab)], float32.

        Runs the bundle's score graph (right-padded batch; causal attention keeps pads out of
        real positions). Memory grows with batch * seq * exits * vocab: batch long texts in chunks.
        """
        if self.manifest.is_encoder_decoder:
            raise BundleError("scoring token sequences needs a decoder-only bundle: an encoder-decoder (T5) "
                                   "bundle's score graph reads decoder tokens against an encoded prompt, which "
                                   "this method does not take")
        if isinstance(token_ids, (str, bytes)) or len(token_ids) == 0:
            raise PromptError("no sequences to score: pass a non-empty list of token-id lists")
        rows = [self.encode(t) for t in token_ids]
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


def _deltas(stepper: Stepper) -> Iterator[str]:
    while not stepper.done:
        for event in stepper.step():
            if event.text:
                yield event.text
