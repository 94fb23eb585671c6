"""rep-n, diversity and prompt extraction against hand-computed examples."""

from __future__ import annotations

import math

import pytest

from autocontrast.evaluation.quality import read_paragraphs
from autocontrast.evaluation.quality_metrics import diversity, ngram_counts, rep_n


def test_rep2_counts_repeated_bigrams_of_one_text():
    # bigrams: (a b) (b a) (a b) (b a) (a b) -> 2 unique of 5
    assert rep_n(["a b a b a b"], 2) == pytest.approx(1 - 2 / 5)


def test_rep_n_is_micro_averaged_over_texts():
    # text 1 "x x x": bigrams (x x)(x x) -> 1 unique of 2; text 2 "p q r": 2 unique of 2 -> 1 - 3/4
    assert rep_n(["x x x", "p q r"], 2) == pytest.approx(0.25)


def test_rep_n_of_text_without_repeats_is_zero():
    assert rep_n(["the cat sat on the mat"], 3) == 0.0


def test_text_shorter_than_n_has_no_ngrams():
    assert ngram_counts("one two", 3) == (0, 0)
    assert rep_n(["one two"], 4) == 0.0


def test_diversity_is_product_of_one_minus_rep():
    text = "a b c a b c a b"  # bigrams 7, unique 3; trigrams 6, unique 3; 4-grams 5, unique 3
    expected = (1 - (1 - 3 / 7)) * (1 - (1 - 3 / 6)) * (1 - (1 - 3 / 5))
    assert diversity([text]) == pytest.approx(expected)
    assert math.isclose(diversity(["w1 w2 w3 w4 w5"]), 1.0)


def test_paragraphs_skip_headings_blank_and_short_lines(tmp_path):
    long = " ".join(f"w{i}" for i in range(50))
    path = tmp_path / "wiki.txt"
    path.write_text(f" = Title = \n\n {long} \n = = Section = = \n short line \n {long} x \n", encoding="utf-8")
    assert read_paragraphs(path, min_words=40) == [long, long + " x"]
