"""Streaming detokenization: text deltas that are always whole characters, cut before stop strings.

A byte-level BPE token can end inside a multi-byte UTF-8 character (decoding shows U+FFFD); a
delta is held back until the character completes. With stop strings, the last few characters
(one less than the longest stop string) are held back too, since they may begin one. Each delta
is the difference between the decoding of all ids so far and what was already emitted, so the
concatenated deltas equal the final text exactly.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from autocontrast.runtime.stopping import stop_string_cut

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed ids one at a time with `push`; each call returns the new text ('' while held back)."""

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._hold = max((len(s) for s in self._stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.emitted = ""

    def final_text(self) -> str:
        """The decoding of all ids, cut before the first stop string."""
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        at = stop_string_cut(text, self._stop_strings) if self._stop_strings else None
        return text if at is None else text[:at]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the rest of its bytes
        at = stop_string_cut(text, self._stop_strings) if self._stop_strings else None
        safe = text[:at] if at is not None else text[:len(text) - self._hold]
        return self._emit(safe)

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._emit(self.final_text())

    def _emit(self, safe: str) -> str:
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""  # nothing new, or a join that rewrote emitted text (the final flush settles it)
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta
