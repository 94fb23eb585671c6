"""Structured output: text that must follow a JSON schema, a regular expression or a grammar.

A constraint is enforced by a token mask over the vocabulary: at every step only the tokens that
keep the text a prefix of the language stay possible, whatever the decoding mode (the mask applies
to the mode's scores: ACD's contrast as much as one exit's logits). The masks come from
llguidance (the library onnxruntime-genai, vLLM and llama.cpp use): compiled in Rust, torch-free,
about half a millisecond per token on SmolLM2's 49k vocabulary, mask applied (1-2 % of a step;
README), and its JSON-schema compiler covers nested objects, enums, arrays, string lengths and
number ranges.

>>> c = OutputConstraint.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}})
>>> c.kind
'json_schema'
>>> OutputConstraint.regex("[a-z")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
autocontrast.errors.GenerationParameterError: the regex constraint is not valid: ...
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autocontrast.errors import GenerationParameterError

# JSON as a model writes it (", " and ": ", no free whitespace): a grammar that allowed any run of
# whitespace between items lets a small model pad forever instead of closing its object
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
SPECIAL_TOKEN_PREFIX = b"\xff"  # how llguidance tells a special token's bytes from text


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the runtime; only a broken install lacks it
        raise GenerationParameterError("structured output needs the llguidance package: pip install llguidance") \
            from None
    return llguidance


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """What the generated text must be. Make one with a class method; the grammar is checked at once.

    `json_object()`: any JSON object. `json_schema(schema)`: a JSON value valid under `schema`.
    `regex(pattern)`: text matching the whole pattern (Rust regex syntax). `grammar(lark)`: a
    context-free grammar in llguidance's Lark dialect. `choice(options)`: exactly one of the strings.
    """

    kind: str
    spec: Any
    grammar_text: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GenerationParameterError(f"constraint kind {self.kind!r} must be one of {', '.join(KINDS)}")
        llg = _llguidance()
        compile_ = {"json_object": lambda s: llg.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                                     defaults=JSON_OPTIONS),
                    "json_schema": lambda s: llg.LLMatcher.grammar_from_json_schema(s, defaults=JSON_OPTIONS),
                    "regex": llg.LLMatcher.grammar_from_regex, "grammar": llg.LLMatcher.grammar_from_lark,
                    "choice": lambda s: llg.LLMatcher.grammar_from_lark(_choice_lark(s))}[self.kind]
        try:
            grammar = compile_(self.spec)
        except (ValueError, TypeError) as err:
            raise GenerationParameterError(f"the {self.kind} constraint is not valid: {err}") from None
        problem = llg.LLMatcher.validate_grammar(grammar)
        if problem and not problem.startswith("WARNING"):
            raise GenerationParameterError(f"the {self.kind} constraint is not valid: {problem.strip()}")
        object.__setattr__(self, "grammar_text", grammar)

    @classmethod
    def json_object(cls) -> OutputConstraint:
        return cls("json_object", None)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> OutputConstraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise GenerationParameterError(f"the json_schema constraint is not JSON: {err}") from None
        if not isinstance(schema, Mapping):
            raise GenerationParameterError(f"a JSON schema must be an object, not {type(schema).__name__}")
        return cls("json_schema", dict(schema))

    @classmethod
    def regex(cls, pattern: str) -> OutputConstraint:
        if not isinstance(pattern, str) or not pattern:
            raise GenerationParameterError(f"a regex constraint must be a non-empty string, not {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> OutputConstraint:
        if not isinstance(lark, str) or not lark.strip():
            raise GenerationParameterError(f"a grammar constraint must be non-empty Lark text, not {lark!r}")
        return cls("grammar", lark)

    @classmethod
    def choice(cls, options: Sequence[str]) -> OutputConstraint:
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise GenerationParameterError(f"a choice constraint must be a list of non-empty strings, not {options!r}")
        return cls("choice", tuple(options))


def _choice_lark(options: Sequence[str]) -> str:
    return "start: " + " | ".join(json.dumps(o) for o in options)


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for, for ids 0..vocab_size-1 (b'' beyond the tokenizer's vocabulary),
    read from a `tokenizers.Tokenizer`: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) through the
    byte-to-character table; SentencePiece vocabularies (Llama 2, T5) with '▁' as a space and <0xNN> byte
    tokens. Special tokens get llguidance's 0xFF prefix, so no text ever matches them."""
    config = json.loads(tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(config.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(config.get("decoder"))
    special = {t["id"] for t in config.get("added_tokens", []) if t.get("special")}
    from_char = {c: b for b, c in _bytes_to_unicode().items()}
    out = []
    for token_id in range(vocab_size):
        piece = tokenizer.id_to_token(token_id)
        if piece is None:
            out.append(b"")
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # a byte-fallback token
            out.append(bytes([int(piece[3:5], 16)]))
        elif token_id in special:
            out.append(SPECIAL_TOKEN_PREFIX + piece.encode("utf-8"))
        elif byte_level:
            out.append(bytes(from_char[c] for c in piece) if all(c in from_char for c in piece)
                       else piece.encode("utf-8"))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte to the printable character byte-level BPE writes it as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: token bytes, end-of-sequence, and a way to tokenize text."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], eos_token_id: int, special: list[int]) -> None:
        self._tokenizer, self.tokens, self.eos_token_id = tokenizer, tokens, eos_token_id
        self.bos_token_id = None
        self.special_token_ids = special

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """An llguidance tokenizer over a bundle's `tokenizers.Tokenizer` (about half a second for 49k tokens:
    build it once per model). End-of-sequence ids of the vocabulary are what a finished grammar allows."""
    llg = _llguidance()
    tokens = token_bytes(tokenizer, vocab_size)
    eos = [int(t) for t in eos_token_ids if 0 <= t < vocab_size]
    if not eos:
        raise GenerationParameterError("structured output needs an end-of-sequence token in the vocabulary; "
                                       "this bundle declares none")
    special = [i for i, b in enumerate(tokens) if b.startswith(SPECIAL_TOKEN_PREFIX)]
    return llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(tokenizer, tokens, eos[0], special)), n_vocab=vocab_size,
                           eos_token=eos)


class RowConstraint:
    """One row's constraint while it generates: the mask of the next token, the tokens taken so far.

    `seconds`: time spent computing masks and advancing (what the constraint costs the row)."""

    def __init__(self, constraint: OutputConstraint, tokenizer: Any) -> None:
        llg = _llguidance()
        self._matcher = llg.LLMatcher(tokenizer, constraint.grammar_text, log_level=0)
        if self._matcher.is_error():
            raise GenerationParameterError(f"the {constraint.kind} constraint cannot be used with this tokenizer: "
                                           f"{self._matcher.get_error()}")
        self._vocab = tokenizer.vocab_size
        self.seconds = 0.0

    @property
    def finished(self) -> bool:
        """The text is complete: nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens that may come next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little", count=self._vocab).view(bool)

    def mask(self, scores: np.ndarray) -> np.ndarray:
        """(vocab,) scores with every token the constraint forbids at -inf. Should penalties or processors have
        put every allowed token at -inf, the constraint wins: the allowed tokens all get 0 (an even choice among
        what the text may become)."""
        start = time.perf_counter()
        allowed = self.allowed()
        masked = np.where(allowed, scores, -np.inf)
        if not np.isfinite(masked).any():
            masked = np.where(allowed, 0.0, -np.inf)
        self.seconds += time.perf_counter() - start
        return masked

    def advance(self, token: int) -> None:
        start = time.perf_counter()
        if not self._matcher.consume_token(int(token)):
            raise GenerationParameterError(f"token {token} breaks the constraint: {self._matcher.get_error()}")
        self.seconds += time.perf_counter() - start

    def restart(self, tokens: Sequence[int]) -> None:
        """Back to the start, then through `tokens` (a rewound row's generated tokens)."""
        self._matcher.reset()
        for token in tokens:
            self.advance(token)
