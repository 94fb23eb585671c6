"""When a row stops: an end-of-sequence id, a stop string, a complete structured output, or its token
budget. Pure functions."""

from __future__ import annotations

EOS, STOP_STRING, LENGTH, CONSTRAINT = "eos", "stop_string", "length", "constraint"


def stop_string_cut(text: str, stop_strings: tuple[str, ...], *, start: int = 0) -> int | None:
    """Index where the earliest stop string starts in `text` (searching from `start`), or None."""
    hits = [i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


def finish_reason(token: int, generated: int, *, stop_ids: frozenset[int], max_new_tokens: int,
                  stop_string_hit: bool = False, constraint_done: bool = False) -> str | None:
    """Why a row stops after emitting `token` as its `generated`-th token (None: it goes on)."""
    if token in stop_ids:
        return EOS
    if stop_string_hit:
        return STOP_STRING
    if constraint_done:
        return CONSTRAINT
    if generated >= max_new_tokens:
        return LENGTH
    return None
