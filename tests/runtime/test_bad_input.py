"""A table of bad inputs to the runtime: each raises its typed error, with a message that names the
value and what to do, and the Generator keeps working afterwards."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import (
    BundleError,
    ConfigurationError,
    ContrastFunctionError,
    GenerationParameterError,
    InferenceError,
    PromptError,
    RuntimeOptionError,
    UnknownExitError,
)
from autocontrast.runtime import Generator
from tests.runtime.conftest import CONTRAST
from tests.tiny_models import MAX_POSITIONS


def _acd(**fields) -> MultiExitConfiguration:
    return MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST, **fields)


def _gen(**fields):
    return lambda g: g.generate("Hello there", **{"max_new_tokens": 3, **fields})


def _contrast(function):
    return lambda g: g.generate("Hello there", max_new_tokens=3, multi_exit=_acd(contrast_function=function))


def _all(value):
    return lambda u, lo: np.full_like(u, value)


def _processor(result):
    def processor(ids, scores):
        return result(scores)
    return processor


CASES = [
    # prompts
    ("float token ids", lambda g: g.generate([1.5, 2.0]), PromptError, "must be integers"),
    ("bytes prompt", lambda g: g.generate(b"hello"), PromptError, "not bytes"),
    ("None prompt", lambda g: g.generate(None), PromptError, "not NoneType"),
    ("dict prompt", lambda g: g.generate({"text": "hi"}), PromptError, "not dict"),
    ("bytes in a batch", lambda g: g.generate(["fine", b"bytes"]), PromptError, "not bytes"),
    ("lone surrogate", lambda g: g.generate("abc \ud800 def"), PromptError, "lone surrogate"),
    ("empty batch", lambda g: g.generate([]), PromptError, "no prompts"),
    ("empty id list in a batch", lambda g: g.generate([[5, 6], []]), PromptError, "no tokens"),
    ("whitespace prompt", lambda g: g.generate("   "), PromptError, "empty"),
    ("id outside the vocabulary", lambda g: g.generate([5, 10**7]), PromptError, "outside the vocabulary"),
    ("prompt beyond max positions", lambda g: g.generate([5] * (MAX_POSITIONS + 44), max_new_tokens=8), PromptError,
     "maximum positions"),
    # generation parameters
    ("temperature NaN", _gen(temperature=math.nan), GenerationParameterError, "temperature"),
    ("top_p NaN", _gen(top_p=math.nan), GenerationParameterError, "top_p"),
    ("repetition_penalty NaN", _gen(repetition_penalty=math.nan), GenerationParameterError, "repetition_penalty"),
    ("repetition_penalty inf", _gen(repetition_penalty=math.inf), GenerationParameterError, "finite"),
    ("top_k not an integer", _gen(top_k=2.5), GenerationParameterError, "top_k"),
    ("max_new_tokens not an integer", _gen(max_new_tokens=2.5), GenerationParameterError, "max_new_tokens"),
    ("negative seed", _gen(temperature=1.0, seed=-1), GenerationParameterError, "seed"),
    ("fractional seed", _gen(temperature=1.0, seed=1.5), GenerationParameterError, "seed"),
    ("negative min_new_tokens", _gen(min_new_tokens=-1), GenerationParameterError, "min_new_tokens"),
    ("stop id not an integer", _gen(stop_token_ids=("a",)), GenerationParameterError, "stop_token_ids"),
    ("stop id outside the vocabulary", _gen(stop_token_ids=(10**9,)), GenerationParameterError,
     "outside the vocabulary"),
    ("stop strings not strings", _gen(stop_strings=(1, 2)), GenerationParameterError, "stop_strings"),
    ("unknown parameter", _gen(temprature=0.5), GenerationParameterError, "unknown generation parameter"),
    ("processor not callable", _gen(logits_processors=("upper",)), GenerationParameterError, "callables"),
    # modes
    ("minimum_candidates beyond the vocabulary", lambda g: g.generate("Hi", multi_exit=_acd(minimum_candidates=10**6)),
     ConfigurationError, "exceeds the vocabulary"),
    ("contrast of original with the top exit",
     lambda g: g.generate("Hi", multi_exit=MultiExitConfiguration(use_original_head=False,
                                                                  contrast_layer_indices=("original", 4))),
     ConfigurationError, "same logits"),
    ("exit outside the model",
     lambda g: g.generate("Hi", multi_exit=MultiExitConfiguration(use_original_head=False, output_layer_index=9)),
     UnknownExitError, r"outside 0\.\.4"),
    # custom contrast functions and logits processors
    ("contrast of the wrong width", _contrast(lambda u, lo: u[:, :5]), ContrastFunctionError, "shape"),
    ("contrast returning a scalar", _contrast(lambda u, lo: 1.0), ContrastFunctionError, "float scores of shape"),
    ("contrast returning None", _contrast(lambda u, lo: None), ContrastFunctionError, "NoneType"),
    ("contrast of integers", _contrast(lambda u, lo: np.zeros(u.shape, np.int64)), ContrastFunctionError, "int64"),
    ("contrast all NaN", _contrast(_all(np.nan)), ContrastFunctionError, "no finite score"),
    ("contrast all -inf", _contrast(_all(-np.inf)), ContrastFunctionError, "no finite score"),
    ("processor of the wrong shape", _gen(logits_processors=(_processor(lambda s: s[:3]),)), ContrastFunctionError,
     "processor"),
    ("processor all -inf", _gen(logits_processors=(_processor(lambda s: s * 0 - np.inf),)), ContrastFunctionError,
     "no finite score"),
    # scoring
    ("scoring an empty list", lambda g: g.exit_logits_all_positions([], (4,)), PromptError, "no sequences"),
    ("scoring text, not ids", lambda g: g.exit_logits_all_positions("some text", (4,)), PromptError, "no sequences"),
    # the generator itself
    ("a million threads", lambda g: Generator(g.bundle_dir, threads=10**6), RuntimeOptionError, "threads"),
    ("zero threads", lambda g: Generator(g.bundle_dir, threads=0), RuntimeOptionError, "1..1024"),
    ("an onnxruntime failure", lambda g: g.session(g.mode().graph).step(
        np.ones((1, 2), np.int64), np.ones((1, 5), np.int64), np.zeros((1, 2), np.int64), None),
     InferenceError, "decode_original"),
]


@pytest.mark.parametrize("call,error,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_its_typed_error(llama_generator, call, error, phrase):
    with pytest.raises(error, match=phrase):
        call(llama_generator)
    assert len(llama_generator.generate("Hello", max_new_tokens=2, ignore_eos=True).token_ids[0]) == 2


def test_one_plain_stop_string_is_one_string_not_its_characters(llama_generator):
    whole = llama_generator.generate("Once upon a time", max_new_tokens=16, ignore_eos=True)
    stop = whole.text[4:7]
    cut = llama_generator.generate("Once upon a time", max_new_tokens=16, ignore_eos=True, stop_strings=stop)
    assert cut.text == whole.text[:whole.text.find(stop)] and cut.finish_reasons == ["stop_string"]


@pytest.fixture()
def bundle_copy(llama_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(llama_bundle, copy)
    return copy


def test_a_bundle_path_that_is_a_file(bundle_copy):
    with pytest.raises(BundleError, match="is a file, not a bundle directory"):
        Generator(bundle_copy / "manifest.json")


def test_a_manifest_that_is_not_utf8(bundle_copy):
    (bundle_copy / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(BundleError, match="not UTF-8"):
        Generator(bundle_copy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory: permissions cannot make one unreadable")
def test_an_unreadable_bundle_directory(bundle_copy):
    bundle_copy.chmod(0)
    try:
        with pytest.raises(BundleError, match="not readable"):
            Generator(bundle_copy)
    finally:
        bundle_copy.chmod(0o755)


def test_a_manifest_whose_exits_disagree_with_the_graph(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    graph = next(g for g in manifest["graphs"] if g["name"] == "decode_exits")
    graph["exits"] = list(reversed(graph["exits"]))  # reordered: would silently give wrong tokens
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="the graph returns"):
        Generator(bundle_copy).generate("Hi", multi_exit=_acd(), max_new_tokens=2)


def test_exits_in_different_graphs_say_which_exits_to_export(tiny_bundle):
    generator = Generator(tiny_bundle("llama", "LAYER_SPECIFIC_PROJECTION", fuse_contrast=CONTRAST))
    both = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 2))
    with pytest.raises(UnknownExitError, match="no single decode graph .* re-export with --exits original,2"):
        generator.generate("Hi", multi_exit=both, max_new_tokens=2)
