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


@pytest.mark.parametrize("token,count,hit,expected", [
    (2, 1, False, EOS), (5, 1, True, STOP_STRING), (2, 1, True, EOS), (5, 4, False, LENGTH), (5, 3, False, None)])
def test_finish_reason(token, count, hit, expected):
    assert finish_reason(token, count, stop_ids=frozenset({2}), max_new_tokens=4, stop_string_hit=hit) == expected


def test_stop_string_spanning_tokens_is_found_incrementally(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text).ids
    decoder = StreamDecoder(tokenizer, stop_strings=("ta gam",))
    hit_after = next(i for i, t in enumerate(ids) if (decoder.push(t), decoder.stop_at)[1] is not None)
    assert decoder.stop_at == text.find("ta gam")
    assert tokenizer.decode(ids[:hit_after + 1]).find("ta gam") >= 0  # found at the first token that completes it
    assert tokenizer.decode(ids[:hit_after]).find("ta gam") < 0


def test_decoding_cost_is_linear_in_the_output(tokenizer):
    # each push decodes a window of a few ids, never the whole output
    decoded: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("word " * 400).ids
    decoder = StreamDecoder(Counting(), stop_strings=("never",))
    for t in ids:
        decoder.push(t)
    assert max(decoded) <= 4
    assert decoder.text == tokenizer.decode(ids)
