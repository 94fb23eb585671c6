"""`output_layer_index=K` runs on the early-exit graph (layers 1..K only) when the bundle has one, and
its tokens equal the PyTorch model's exit-K `generate()` tokens, alone and in a batch."""

from __future__ import annotations

import pytest

from autocontrast.bundle import Manifest, read_manifest
from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.runtime import Generator
from autocontrast.runtime.modes import resolve_mode
from tests.runtime.conftest import CONTRAST
from tests.runtime.test_tiny_parity import NEW_TOKENS, PROMPTS, _torch_tokens

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
EXIT = 2
EXIT_ONLY = MultiExitConfiguration(use_original_head=False, output_layer_index=EXIT)


@pytest.fixture(scope="module")
def early_bundle(tiny_bundle):
    return tiny_bundle("llama", DIRECT, fuse_contrast=CONTRAST, early_exits=(EXIT,))


def test_the_exit_alone_runs_on_its_early_exit_graph(early_bundle):
    manifest = read_manifest(early_bundle)
    assert resolve_mode(manifest, EXIT_ONLY).graph.name == f"decode_exit_{EXIT}"
    assert manifest.kv_for(manifest.graph(f"decode_exit_{EXIT}")).num_layers == EXIT
    # the contrast and the other exits still run where they did
    acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=CONTRAST)
    assert resolve_mode(manifest, acd).graph.name == "decode_exits"
    assert resolve_mode(manifest, MultiExitConfiguration()).graph.name == "decode_original"


def test_early_exit_tokens_equal_pytorch(early_bundle, tiny_checkpoint):
    generator = Generator(early_bundle, preload=[EXIT_ONLY])
    checkpoint = tiny_checkpoint("llama", DIRECT)
    wanted = [_torch_tokens(checkpoint, DIRECT, dict(use_original_head=False, output_layer_index=EXIT),
                            generator.encode(p)) for p in PROMPTS]
    for prompt, want in zip(PROMPTS, wanted, strict=True):
        assert generator.generate(prompt, multi_exit=EXIT_ONLY, max_new_tokens=NEW_TOKENS).token_ids[0] == want
    batch = generator.generate(list(PROMPTS), multi_exit=EXIT_ONLY, max_new_tokens=NEW_TOKENS).token_ids
    assert batch == wanted  # left-padded together on the early-exit graph's 2-layer cache
    assert set(generator._sessions) == {f"decode_exit_{EXIT}"}  # the full graphs were never opened


def test_manifest_round_trips_layers_and_reads_version_1():
    data = Manifest.example().to_dict()
    early = {"name": "decode_exit_15", "file": "decode_exit_15.onnx", "kind": "decode", "exits": [15], "layers": 15}
    data["graphs"] = [*data["graphs"], early]
    manifest = Manifest.from_dict(data)
    assert manifest.graph("decode_exit_15").layers == 15
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    old = Manifest.example().to_dict()
    old["format_version"] = 1
    assert Manifest.from_dict(old).graph("decode_exits").layers is None


def test_early_exit_graph_returning_a_higher_exit_is_refused():
    from autocontrast.errors import BundleError

    data = Manifest.example().to_dict()
    bad = {"name": "bad", "file": "bad.onnx", "kind": "decode", "exits": [30], "layers": 15}
    data["graphs"] = [*data["graphs"], bad]
    with pytest.raises(BundleError, match="computes 15 layers but returns exits"):
        Manifest.from_dict(data)
