"""DoLa fused into the decode graph (`acd-export --fuse-dola`): the runtime uses it exactly when a request asks for
the DoLa it computes, its greedy tokens equal the PyTorch model's (the reference: `generate()` with the same
MultiExitConfiguration), its scores equal the paper's formula on the same graph's exit logits, and the export
refuses what it cannot fuse."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import ExportError
from autocontrast.export.exporter import ExportOptions, export_bundle
from autocontrast.runtime import Generator
from tests.runtime.torch_reference import torch_greedy

PROJECTION = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
CANDIDATES = (1, 2)
RELATIVE_TOP = 0.05
PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea, there lived")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def dola_bundle(tiny_bundle):
    return tiny_bundle("llama", PROJECTION, fuse_dola=CANDIDATES, relative_top=RELATIVE_TOP)


def _config(**fields) -> MultiExitConfiguration:
    return MultiExitConfiguration(use_original_head=False, **({"dola_layers": CANDIDATES,
                                                               "relative_top": RELATIVE_TOP} | fields))


def test_manifest_records_the_fused_dola_and_its_validation(dola_bundle):
    generator = Generator(dola_bundle)
    spec = generator.manifest.fused_dola
    assert spec is not None and spec.candidates == CANDIDATES and spec.relative_top == RELATIVE_TOP
    graph = next(g for g in generator.manifest.graphs if g.dola is not None)
    assert spec.output in generator.manifest.validation["graphs"][graph.name]  # compared with PyTorch float64


def test_fused_dola_is_used_only_when_it_is_the_dola_asked_for(dola_bundle):
    generator = Generator(dola_bundle)
    assert generator.mode(_config()).fused
    assert not generator.mode(_config(relative_top=0.2)).fused  # another cut: NumPy DoLa
    assert not generator.mode(_config(dola_layers=(2, 1))).fused  # another order: ties may choose differently
    assert not generator.mode(_config(dola_layers=(1,))).fused
    assert not generator.mode(_config(), fused=False).fused


def test_fused_dola_scores_are_the_formula_on_the_graphs_own_exit_logits(dola_bundle):
    from autocontrast.runtime.contrast import dola_scores

    generator = Generator(dola_bundle)
    mode = generator.mode(_config())
    state = generator.decode_state(mode.graph)
    out = state.extend([generator.encode(p) for p in PROMPTS])
    mature = out.exit_logits[:, mode.positions[0], :]
    premature = np.moveaxis(out.exit_logits[:, list(mode.positions[1:]), :], 1, 0)
    want = dola_scores(mature.astype(np.float64), premature.astype(np.float64), relative_top=RELATIVE_TOP)
    got = out.dola
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))  # the same tokens cut
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-4)


def test_fused_dola_greedy_tokens_equal_the_pytorch_model(dola_bundle, tiny_checkpoint):
    checkpoint = tiny_checkpoint("llama", PROJECTION)
    generator = Generator(dola_bundle)
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        want = torch_greedy(checkpoint, _config(), ids, NEW_TOKENS, projection=PROJECTION)
        got = generator.generate(ids, multi_exit=_config(), max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert got.token_ids[0] == want, prompt


@pytest.mark.parametrize("options,message", [
    (dict(fuse_dola=(4,)), "own head"),  # the top layer is the own head in the direct projection
    (dict(fuse_dola=("original",)), "own head"),
    (dict(fuse_dola=(1,), exits=(4, 1), decode_graphs="one"), "no --fuse-dola"),
    (dict(fuse_dola=(1,), relative_top=0.0), "relative_top"),
    (dict(fuse_dola=(1, 1)), "distinct"),
])
def test_export_refuses_what_it_cannot_fuse(options, message, tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_bundle(tiny_checkpoint("llama", PROJECTION), tmp_path / "b",
                      options=ExportOptions(projection=PROJECTION.name, **options), log=lambda m: None)
    assert not (tmp_path / "b").exists()
