"""`PrefixCache`: the KV entries of prompts already prefilled, so a prompt that starts the same way
(a chat's system prompt, a few-shot header) prefills only what differs.

Entries are host arrays of one row's cache after its prompt was prefilled ([(kv_heads, length,
head_dim)] per cache input, graph order; copies, or views of a spent row's own buffer, which nothing
writes again), keyed by the prompt's token ids. `lookup` finds the
stored prompt sharing the longest prefix with a new one and returns that many entries (at most all
but the new prompt's last token: a step must compute something to give the first token's logits).
Bounded by bytes, least recently used first out; one per stepper (the entries are one graph's).

>>> cache = PrefixCache(max_bytes=256 << 20)
>>> cache.put([1, 2, 3] * 20, entries)  # doctest: +SKIP
>>> length, seed = cache.lookup([1, 2, 3] * 20 + [9])  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

MIN_REUSE_TOKENS = 16  # a shorter common prefix is prefilled again: seeding costs about what it saves


@dataclasses.dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0


class PrefixCache:
    """Prompts' KV entries by token ids, within `max_bytes` (0 turns it off). Not thread-safe."""

    def __init__(self, max_bytes: int, *, min_tokens: int = MIN_REUSE_TOKENS) -> None:
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError(f"max_bytes ({max_bytes}) must be >= 0 and min_tokens ({min_tokens}) >= 1")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], list[np.ndarray]] = collections.OrderedDict()
        self.bytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, list[np.ndarray] | None]:
        """(length, entries) of the longest stored prefix of `ids` worth reusing, or (0, None)."""
        best, best_key = 0, None
        wanted = np.asarray(ids, dtype=np.int64)
        for key in self._entries:
            shared = _common_prefix(np.asarray(key, dtype=np.int64), wanted)
            if shared > best:
                best, best_key = shared, key
        best = min(best, len(wanted) - 1)
        if best_key is None or best < self.min_tokens:
            self.stats.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.stats.hits += 1
        self.stats.tokens_reused += best
        return best, [e[:, :best] for e in self._entries[best_key]]

    def put(self, ids: Sequence[int], entries: list[np.ndarray]) -> None:
        """Keep `entries` (host arrays this cache may hold on to) as the cache of prompt `ids`."""
        key = tuple(int(i) for i in ids)
        size = held_bytes(entries)
        if len(key) < self.min_tokens or size > self.max_bytes:
            return
        covered = [k for k in self._entries if len(k) <= len(key) and key[:len(k)] == k]  # prefixes of this one
        for k in covered:
            self._forget(k)
        self._entries[key] = entries
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._forget(next(iter(self._entries)))

    def _forget(self, key: tuple[int, ...]) -> None:
        self.bytes -= held_bytes(self._entries.pop(key))


def held_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes that keeping `arrays` keeps alive: a view counts the storage it is cut from, once."""
    bases = {}
    for a in arrays:
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        bases[id(root)] = root.nbytes
    return sum(bases.values())


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
