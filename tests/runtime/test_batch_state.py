"""`BatchState.rewind_row` says what it did: each layout keeps a rewound row in place (`Rewind.KEPT`), except
an encoder-decoder's rewind into its prompt, which changes nothing and asks for a new prefill."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.bundle import read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.runtime import Generator
from autocontrast.runtime.batch_state import BatchState, Rewind
from autocontrast.runtime.decode_state import DecodeState, open_decode_state
from autocontrast.runtime.encoder_decoder_state import EncoderDecoderState
from autocontrast.runtime.inplace_state import InPlaceDecodeState
from autocontrast.runtime.session import open_session
from tests.runtime.conftest import CONTRAST

MODE = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def _decoder_only(bundle) -> BatchState:
    manifest = read_manifest(bundle)
    return open_decode_state(open_session(bundle, manifest, manifest.graph("decode_exits")))


@pytest.fixture(params=["buffer", "concat"])
def state(request, llama_bundle, tiny_bundle) -> BatchState:
    """A decoder-only state of each layout: the Llama bundle's KV buffer, GPT-2's concatenated cache."""
    bundle = llama_bundle if request.param == "buffer" else tiny_bundle("gpt2", MODE.name)
    state = _decoder_only(bundle)
    assert isinstance(state, InPlaceDecodeState if request.param == "buffer" else DecodeState)
    return state


@pytest.fixture(scope="module")
def t5_generator(tiny_bundle) -> Generator:
    return Generator(tiny_bundle("t5", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION, fuse_contrast=CONTRAST))


@pytest.fixture()
def t5_state(t5_generator) -> EncoderDecoderState:
    state = t5_generator.decode_state(t5_generator.mode().graph)
    assert isinstance(state, EncoderDecoderState)
    return state


def test_a_decoder_only_rewind_is_kept_and_the_row_holds_that_many_tokens(state):
    state.extend([[5, 6, 7, 8], [9, 10]])
    assert state.rewind_row(0, 2) is Rewind.KEPT
    assert state.lengths().tolist() == [2, 2]


def test_a_rewound_row_steps_on_as_if_it_had_only_those_tokens(state, llama_bundle, tiny_bundle):
    state.extend([[5, 6, 7, 8]])
    assert state.rewind_row(0, 2) is Rewind.KEPT
    rewound = state.advance(np.array([11])).exit_logits[0]
    fresh = _decoder_only(llama_bundle if isinstance(state, InPlaceDecodeState) else tiny_bundle("gpt2", MODE.name))
    np.testing.assert_allclose(rewound, fresh.extend([[5, 6, 11]]).exit_logits[0], atol=1e-5)


def test_an_encoder_decoder_rewind_within_the_generated_tokens_is_kept(t5_state):
    t5_state.extend([[37, 38, 39, 1]], prompt_lengths=[4])  # the decoder holds its start token
    t5_state.advance(np.array([7]))
    t5_state.advance(np.array([8]))  # prompt (4) + generated 7, 8, then the pending token: 3 decoder entries
    assert t5_state.lengths().tolist() == [3]
    assert t5_state.rewind_row(0, 5) is Rewind.KEPT  # prompt + the first generated token
    assert t5_state.lengths().tolist() == [2]


def test_an_encoder_decoder_rewind_into_the_prompt_asks_for_a_new_prefill_and_changes_nothing(t5_state):
    t5_state.extend([[37, 38, 39, 1]], prompt_lengths=[4])
    t5_state.advance(np.array([7]))
    assert t5_state.rewind_row(0, 2) is Rewind.PREFILL_AGAIN
    assert t5_state.lengths().tolist() == [2] and t5_state.prompt_lengths == [4]
