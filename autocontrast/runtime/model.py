"""`Model`: a loaded bundle, what every run over it shares (and what a server holds once).

It owns the manifest, the tokenizer and chat template, the ONNX Runtime sessions of the graphs
(opened on first use, one per graph, shared by every thread) and the resolution of a decoding
mode to the graph that serves it; it checks and encodes prompts and generation parameters, and
makes every `Request` (`request`: the one place a generation is checked). It runs nothing by
itself: a `Stepper` (`autocontrast.runtime.stepper`) is one run over it, with its batch's decode
state (`decode_state`), and `Generator` (`autocontrast.runtime.generator`) is the convenient face
that drives steppers for `generate`, `stream` and scoring.

>>> model = Model("smollm2-acd")  # doctest: +SKIP
>>> ids = model.encode("The history of Paris")  # doctest: +SKIP
>>> state = model.decode_state(model.mode().graph)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import MIXED, GraphSpec, read_manifest
from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import GenerationParameterError, PromptError, RuntimeOptionError
from autocontrast.runtime.batch_state import BatchState
from autocontrast.runtime.constraint import grammar_tokenizer
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.encoder import EncoderSession, open_encoder
from autocontrast.runtime.encoder_decoder_state import EncoderDecoderState
from autocontrast.runtime.modes import DecodeMode, mode_on_graph, resolve_mode
from autocontrast.runtime.params import GenerationParams
from autocontrast.runtime.request import Request, Sink
from autocontrast.runtime.session import ExitSession, open_session, shared_file_session
from autocontrast.runtime.text import chat_template, load_tokenizer, render_chat

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, str]]  # a conversation: [{role, content}, ...] (with chat=True)


class Model:
    """A loaded bundle. `provider`: 'cpu' (default), 'cuda' or 'tensorrt', never silently swapped.

    `share_weights=True` (CPU): every graph this model opens (and any other model on the
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
        self._grammar_tokenizer: Any = None  # structured output's view of the vocabulary, built on first use
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

    def mixed_session(self, graph: GraphSpec) -> ExitSession | None:
        """The session of the bundle's MIXED graph serving decode graph `graph` (its step beside a prompt chunk in
        one pass over the weights), or None where the bundle has none (`acd-export --mixed-step`)."""
        spec = next((g for g in self.manifest.graphs if g.kind == MIXED and g.mixes == graph.name), None)
        return None if spec is None else self.session(spec)

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

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as structured output's masks read it (built on first use, shared by every run)."""
        with self._lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.manifest.vocab_size,
                                                            self.manifest.eos_token_ids)
            return self._grammar_tokenizer

    def mode(self, multi_exit: MultiExitConfiguration | None = None, *, fused: bool = True) -> DecodeMode:
        return resolve_mode(self.manifest, multi_exit or MultiExitConfiguration(), fused=fused)

    def request(self, prompt: Prompt | Messages, params: GenerationParams | None = None, *,
                multi_exit: MultiExitConfiguration | DecodeMode | None = None, chat: bool = False,
                fused_contrast: bool = True, graph: GraphSpec | None = None, fit_context: bool = False,
                sink: Sink | None = None, **param_fields: Any) -> Request:
        """A `Request` for `prompt`, checked here, once: the parameters (`params` with `param_fields`
        replaced), the prompt encoded (text, token ids, or with `chat` a conversation through the chat
        template), its length with `max_new_tokens` within the model's positions, stop and bias ids within
        its vocabulary, and the mode resolved: `multi_exit` as a configuration (on `graph` when given, else
        on the cheapest graph serving it; default the original head) or a `DecodeMode` resolved before.
        `fit_context`: `max_new_tokens` is cut to what the context leaves after the prompt (at least 1).

        >>> request = model.request("The history of Paris", max_new_tokens=8)  # doctest: +SKIP
        """
        params = self.params(params, param_fields)
        ids = self.encode(prompt, chat=chat)
        if fit_context:
            room = self.manifest.max_positions - len(ids)
            params = dataclasses.replace(params, max_new_tokens=max(1, min(params.max_new_tokens, room)))
        self.check_length(len(ids), params.max_new_tokens)
        params.check_vocabulary(self.manifest.vocab_size)
        mode = multi_exit if isinstance(multi_exit, DecodeMode) else self._mode_on(multi_exit, fused_contrast, graph)
        return Request(ids, params, mode, sink=sink)

    def _mode_on(self, config: MultiExitConfiguration | None, fused: bool, graph: GraphSpec | None) -> DecodeMode:
        config = config or MultiExitConfiguration()
        if graph is None:
            return self.mode(config, fused=fused)
        mode = mode_on_graph(self.manifest, config, graph, fused=fused)
        if mode is None:
            raise GenerationParameterError(f"graph {graph.name!r} (exits {', '.join(map(str, graph.exits))}) cannot "
                                           f"serve {config.description}; a stepper runs one graph: use one made for "
                                           "that mode")
        return mode

    def encode(self, prompt: Prompt | Messages, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text through the tokenizer, optionally the chat template; ids as given; with
        `chat`, a conversation [{role, content}, ...] through the chat template)."""
        if chat and _is_conversation(prompt):
            return self.encode_chat(prompt)
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

    def encode_chat(self, messages: Messages) -> list[int]:
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
        if params is not None and not fields:  # checked when it was made
            return params
        return dataclasses.replace(params, **fields) if params is not None else GenerationParams(**fields)

    def _special_token_strings(self) -> dict[str, str]:
        path = self.bundle_dir / "special_tokens_map.json"
        if not path.is_file():
            return {}
        found = json.loads(path.read_text(encoding="utf-8"))
        return {k: (v["content"] if isinstance(v, dict) else v) for k, v in found.items() if isinstance(v, (str, dict))}


def _is_conversation(prompt: object) -> bool:
    """A non-empty list of {role, content} messages (not text, not token ids)."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
            and all(isinstance(m, Mapping) for m in prompt))
