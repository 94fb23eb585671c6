"""Structured output: the token mask keeps every mode's text inside its JSON schema, regex, grammar or
choice, on the tiny bundle and on the real SmolLM2 model; the token bytes it is computed over spell what
the tokenizer encodes."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import GenerationParameterError
from autocontrast.runtime import Generator
from autocontrast.runtime.constraint import OutputConstraint, token_bytes
from autocontrast.runtime.params import GenerationParams
from tests.conftest import WIKITEXT_VALID
from tests.runtime.conftest import CONTRAST, SCHEMA

ACD = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
ROOM = 160  # tokens: more than the longest answer SCHEMA admits in these tokenizers
WIKITEXT_LINES = [line for line in WIKITEXT_VALID.read_text(encoding="utf-8").splitlines() if line.strip()][:300]


def _spelled(tokens: list[bytes], ids: list[int]) -> str:
    return b"".join(tokens[i] for i in ids).decode("utf-8")


def test_token_bytes_spell_what_the_real_tokenizer_encodes(smollm2_bundle):
    tokenizer = Tokenizer.from_file(str(smollm2_bundle / "tokenizer.json"))
    tokens = token_bytes(tokenizer, tokenizer.get_vocab_size())
    for text in WIKITEXT_LINES + ['{"name": "Zoë", "emoji": "😀", "tab":\t1}\n']:
        assert _spelled(tokens, tokenizer.encode(text, add_special_tokens=False).ids) == text
    assert tokens[tokenizer.token_to_id("<|im_end|>")] == b"\xff<|im_end|>"  # special: no text matches it


def test_token_bytes_of_a_sentencepiece_vocabulary_with_byte_fallback():
    # Llama 2 / T5 style: '▁' for a space, <0xNN> tokens for bytes the vocabulary lacks
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<pad>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>"] + alphabet, show_progress=False)
    tokenizer.train_from_iterator(WIKITEXT_LINES, trainer)
    tokens = token_bytes(tokenizer, tokenizer.get_vocab_size())
    for text in WIKITEXT_LINES[:50] + ["naïve 😀 façade"]:
        ids = tokenizer.encode(text).ids
        assert _spelled(tokens, ids) == tokenizer.decode(ids, skip_special_tokens=False) == " " + text  # the normalizer's leading '▁'
    assert any(tokenizer.id_to_token(i) == "<0xF0>" for i in tokenizer.encode("😀").ids)  # byte tokens were used


@pytest.mark.parametrize("config", [MultiExitConfiguration(), ACD], ids=["original", "contrast"])
def test_json_schema_holds_greedy_and_sampled(llama_generator, config):
    constraint = OutputConstraint.json_schema(SCHEMA)
    for seed, temperature in ((None, 0.0), (1, 1.0), (2, 1.3)):
        out = llama_generator.generate("A city as JSON:", multi_exit=config, max_new_tokens=ROOM, seed=seed,
                                       temperature=temperature, constraint=constraint)
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.finish_reasons == ["constraint"]


def test_regex_choice_and_grammar(llama_generator):
    def text(constraint, **fields):
        return llama_generator.generate("Answer:", multi_exit=ACD, max_new_tokens=40, constraint=constraint,
                                        **fields).text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text(OutputConstraint.regex(r"[0-9]{3}-[a-z]{2,5}"),
                                                     temperature=1.0, seed=3))
    assert text(OutputConstraint.choice(["yes", "no", "maybe"]), temperature=1.0, seed=4) in ("yes", "no", "maybe")
    lark = 'start: "(" item (", " item)* ")"\nitem: /[a-z]{1,4}/'
    assert re.fullmatch(r"\([a-z]{1,4}(, [a-z]{1,4})*\)", text(OutputConstraint.grammar(lark)) or "x")


def test_a_constraint_that_admits_any_text_leaves_greedy_decoding_unchanged(llama_generator):
    # the reference is the unconstrained runtime (itself token-equal to PyTorch): the mask removes nothing it picks
    # while the text stays valid UTF-8 (a grammar is over text: the random model's stray byte tokens are not)
    prompt = "The capital of France is"
    tokens = token_bytes(llama_generator.tokenizer, llama_generator.manifest.vocab_size)
    plain = llama_generator.generate(prompt, multi_exit=ACD, max_new_tokens=20).token_ids[0]
    valid = max(n for n in range(len(plain) + 1) if _is_text(b"".join(tokens[t] for t in plain[:n])))
    assert valid >= 5
    masked = llama_generator.generate(prompt, multi_exit=ACD, max_new_tokens=valid,
                                      constraint=OutputConstraint.regex(r"(?s:.*)"))
    assert masked.token_ids[0] == plain[:valid]


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_rewound_row_keeps_to_its_constraint(llama_generator):
    stepper = llama_generator.stepper(ACD)
    constraint = OutputConstraint.regex(r"[a-z]{4,8}( [a-z]{4,8}){2}")
    row = stepper.add("Three words:", max_new_tokens=40, constraint=constraint, temperature=1.0, seed=5)
    for _ in range(4):
        stepper.step()
    stepper.rewind_to(row, len(stepper.row(row).prompt_ids) + 2)
    while not stepper.done:
        stepper.step()
    assert re.fullmatch(r"[a-z]{4,8}( [a-z]{4,8}){2}", stepper.row(row).text)


def test_the_constraint_wins_over_a_processor_that_forbids_every_allowed_token(llama_generator):
    exclamation = llama_generator.tokenizer.token_to_id("!")

    def only_exclamation(ids, scores):
        kept = np.full_like(scores, -np.inf)
        kept[exclamation] = 0.0
        return kept

    out = llama_generator.generate("Pick:", max_new_tokens=10, logits_processors=(only_exclamation,),
                                   constraint=OutputConstraint.choice(["alpha", "beta"]))
    assert out.text in ("alpha", "beta")


@pytest.mark.parametrize("make, message", [
    (lambda: OutputConstraint.regex("[a-z"), "regex constraint is not valid"),
    (lambda: OutputConstraint.json_schema({"type": "objectx"}), "json_schema constraint is not valid"),
    (lambda: OutputConstraint.json_schema("{not json"), "not JSON"),
    (lambda: OutputConstraint.grammar("start: missing"), "grammar constraint is not valid"),
    (lambda: OutputConstraint.choice([]), "list of non-empty strings"),
    (lambda: OutputConstraint.choice("yes"), "list of non-empty strings"),
    (lambda: OutputConstraint("xml", None), "must be one of"),
    (lambda: GenerationParams(constraint={"type": "json_object"}), "must be an OutputConstraint"),
])
def test_a_bad_constraint_is_a_typed_error(make, message):
    with pytest.raises(GenerationParameterError, match=message):
        make()


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    MultiExitConfiguration(),
    MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15)),  # the bundle's fused contrast
    MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 15), alpha=0.3),  # NumPy
], ids=["original", "acd-fused", "acd-numpy"])
def test_json_schema_holds_on_the_real_model(smollm2_bundle, config):
    gen = Generator(smollm2_bundle, preload=())
    for prompt in ("Describe Paris as JSON.", "Give me a small town in JSON."):
        out = gen.generate(prompt, chat=True, multi_exit=config, max_new_tokens=ROOM,
                           constraint=OutputConstraint.json_schema(SCHEMA))
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.finish_reasons == ["constraint"]
