"""Streaming detokenization and stopping, with the real SmolLM2 byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from autocontrast.runtime.detokenizer import REPLACEMENT, StreamDecoder
from autocontrast.runtime.stopping import EOS, LENGTH, STOP_STRING, finish_reason, stop_string_cut

TEXTS = ("Plain ASCII text, with punctuation!", "Emoji 🎉🤖 and CJK 世界你好 and ñandú — naïve",
         "  leading spaces\n\nand newlines\t", "🧑‍🚀 zero-width joiner")


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decoding(tokenizer, text):
    ids = tokenizer.encode(text).ids
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("a 🤖").ids
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids), "the emoji should span byte tokens"
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == "a 🤖"


def test_stream_stops_before_a_stop_string(tokenizer):
    ids = tokenizer.encode("one two STOP three").ids
    decoder = StreamDecoder(tokenizer, stop_strings=("STOP",))
    streamed = "".join(decoder.push(t) for t in ids) + decoder.flush()
    assert streamed == decoder.final_text() == "one two "


def test_partial_stop_string_is_held_back_until_it_cannot_match(tokenizer):
    decoder = StreamDecoder(tokenizer, stop_strings=("<END>",))
    out = [decoder.push(t) for t in tokenizer.encode("value <EN").ids]
    assert "<EN" not in "".join(out)
    assert "".join(out) + decoder.flush() == "value <EN"


def test_stop_string_cut_finds_the_earliest():
    assert stop_string_cut("abc\n\nxyz###", ("###", "\n\n")) == 3
    assert stop_string_cut("nothing here", ("###",)) is None


@pytest.mark.parametrize("token,count,text,expected", [
    (2, 1, "x", EOS), (5, 1, "a###", STOP_STRING), (5, 4, "abc", LENGTH), (5, 3, "abc", None)])
def test_finish_reason(token, count, text, expected):
    assert finish_reason(token, count, stop_ids=frozenset({2}), max_new_tokens=4, text=text,
                         stop_strings=("###",)) == expected
