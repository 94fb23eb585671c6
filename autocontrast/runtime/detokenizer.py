"""Incremental detokenization: text deltas that are always whole characters, cut before stop strings.

Linear in the output length: each token decodes only a short window of ids (the previous token's
ids and the new ones, as TGI and vLLM do), never the whole output. The window keeps one earlier
token so that tokenizers which strip a leading space at the start of a decode (SentencePiece's
metaspace) give the same text as a whole decode. A byte-level BPE token can end inside a
multi-byte UTF-8 character (decoding shows U+FFFD); its text is held back until the character
completes. With stop strings, the last few characters (one less than the longest stop string) are
held back too, since they may begin one, and only the new tail is searched for a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from autocontrast.runtime.stopping import stop_string_cut

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed ids one at a time with `push`; each call returns the new text ('' while held back).

    `text` is everything decoded so far; `stop_at` the index of the first stop string in it, once found.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._longest = max((len(s) for s in self._stop_strings), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = ""
        self.stop_at: int | None = None
        self._prefix = 0  # window start: ids before it are settled text
        self._read = 0  # ids up to here are in `text`

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        settled = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if window.endswith(REPLACEMENT) or len(window) < len(settled):
            return ""  # an incomplete character: wait for the rest of its bytes
        searched_from = max(0, len(self.text) - self._longest + 1)
        self.text += window[len(settled):]
        self._prefix, self._read = self._read, len(self.ids)
        if self._stop_strings and self.stop_at is None:
            self.stop_at = stop_string_cut(self.text, self._stop_strings, start=searched_from)
        if self.stop_at is not None:
            return self._emit(self.text[:self.stop_at])
        return self._emit(self.text[:len(self.text) - max(self._longest - 1, 0)])

    def final_text(self) -> str:
        """The decoding of all ids, cut before the first stop string."""
        text = self._decode(self.ids)
        at = stop_string_cut(text, self._stop_strings) if self._stop_strings else None
        return text if at is None else text[:at]

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._emit(self.final_text())

    def _emit(self, safe: str) -> str:
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""  # nothing new, or a join that rewrote emitted text (the final flush settles it)
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta
