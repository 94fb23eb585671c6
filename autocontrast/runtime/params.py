"""Generation parameters: frozen, checked at construction, errors that quote the value and the range.

>>> GenerationParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1).do_sample
True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np

from autocontrast.errors import GenerationParameterError
from autocontrast.runtime.constraint import OutputConstraint

# (token_ids (seq,) int64: the row's prompt and generated ids, scores (vocab,)) -> scores (vocab,)
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default bound; OpenAI's is 20 for chat)
LOGIT_BIAS_BOUND = 100.0  # OpenAI's range for a logit_bias value


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """How to search. `temperature=0` (the default) is greedy.

    `min_new_tokens`: end-of-sequence (and `stop_token_ids`) suppressed until that many tokens.
    `presence_penalty` / `frequency_penalty` (OpenAI's, -2..2): a generated token's score loses the
    first once and the second per occurrence in the generated text (prompt excluded, as vLLM).
    `logit_bias`: {token id: -100..100} added to the scores.
    `logits_processors`: callables `(token_ids, scores) -> scores`.
    Order, per step: the mode's scores, repetition penalty, presence/frequency penalties,
    logit_bias, min_new_tokens, logits processors, the constraint's mask, then temperature/top-k/top-p (HF's order, the
    additive penalties beside the repetition penalty as vLLM applies them).
    `constraint`: an `OutputConstraint` (JSON schema, JSON object, regex, grammar, choice) the text must
    follow: a token mask on the scores after the processors, before the search; the row ends when the
    text is complete (finish reason 'constraint').
    `logprobs`: return each chosen token's log-probability under the mode's distribution (the
    contrast's for ACD, before penalties and search) and that many most likely alternatives (0..20).
    `exit_logprobs` (with `logprobs`): the same under each exit the mode reads, alone (the upper and
    the lower exit of a contrast): why the contrast chose what it chose.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # added to the bundle's end-of-sequence ids
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    min_new_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and k alternatives
    exit_logprobs: bool = False  # with logprobs: also under each exit the mode reads
    constraint: OutputConstraint | None = None  # structured output: what the text must be

    def __post_init__(self) -> None:
        self._normalise_sequences()
        for name in ("max_new_tokens", "top_k", "min_new_tokens"):
            if not _is_int(getattr(self, name)):
                raise GenerationParameterError(f"{name} ({getattr(self, name)!r}) must be an integer")
        if self.max_new_tokens < 1:
            raise GenerationParameterError(f"max_new_tokens ({self.max_new_tokens}) must be a positive integer")
        if self.min_new_tokens < 0:
            raise GenerationParameterError(f"min_new_tokens ({self.min_new_tokens}) must be >= 0")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise GenerationParameterError(f"{name} ({value!r}) must be a finite number")
        if self.temperature < 0:
            raise GenerationParameterError(f"temperature ({self.temperature}) must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationParameterError(f"top_p ({self.top_p}) must be within (0, 1]")
        if self.top_k < 0:
            raise GenerationParameterError(f"top_k ({self.top_k}) must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise GenerationParameterError(f"repetition_penalty ({self.repetition_penalty}) must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GenerationParameterError(f"{name} ({getattr(self, name)}) must be within -2..2")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise GenerationParameterError(f"logprobs ({self.logprobs!r}) must be an integer within 0..{MAX_LOGPROBS} "
                                           "(alternatives per token) or None")
        if not isinstance(self.exit_logprobs, bool) or (self.exit_logprobs and self.logprobs is None):
            raise GenerationParameterError(f"exit_logprobs ({self.exit_logprobs!r}) must be true or false, and true "
                                           "only with logprobs (how many alternatives per exit)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise GenerationParameterError(f"seed ({self.seed!r}) must be a non-negative integer or None")
        if self.constraint is not None and not isinstance(self.constraint, OutputConstraint):
            raise GenerationParameterError(f"constraint must be an OutputConstraint (OutputConstraint.json_schema(...), "
                                           f".regex(...), ...), not {type(self.constraint).__name__}")
        for processor in self.logits_processors:
            if not callable(processor):
                raise GenerationParameterError(f"logits_processors must be callables (token_ids, scores) -> scores; "
                                               f"got {processor!r}")

    def _normalise_sequences(self) -> None:
        stop_strings = self.stop_strings
        if isinstance(stop_strings, str):  # one plain string is one stop string, not its characters
            stop_strings = (stop_strings,)
        if not all(isinstance(s, str) for s in stop_strings):
            raise GenerationParameterError(f"stop_strings ({stop_strings!r}) must be strings")
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not all(_is_int(t) for t in ids):
            raise GenerationParameterError(f"stop_token_ids ({ids!r}) must be integer token ids")
        processors = self.logits_processors
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, Mapping):
                raise GenerationParameterError(f"logit_bias ({bias!r}) must map token ids to numbers")
            for token, value in bias.items():
                if not _is_int(token) or not _is_number(value) or not -LOGIT_BIAS_BOUND <= value <= LOGIT_BIAS_BOUND:
                    raise GenerationParameterError(f"logit_bias maps token ids to numbers within "
                                                   f"-{LOGIT_BIAS_BOUND:g}..{LOGIT_BIAS_BOUND:g}; got {token!r}: {value!r}")
            object.__setattr__(self, "logit_bias", {int(t): float(v) for t, v in bias.items()} or None)
        object.__setattr__(self, "stop_strings", tuple(stop_strings))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        object.__setattr__(self, "logits_processors", (processors,) if callable(processors) else tuple(processors))

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def check_vocabulary(self, vocab_size: int) -> None:
        """Stop ids and logit_bias ids must be tokens of the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", tuple(self.logit_bias or ()))):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise GenerationParameterError(f"{name} contains {bad[0]}, outside the vocabulary 0..{vocab_size - 1}")
