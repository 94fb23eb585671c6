"""An early-exit graph (`decode_exit_K`) computes only layers 1..K: it returns exit K's logits equal to
PyTorch's over cached decode steps (batch 3, left padding), caches K layers, and holds none of the
weights of the layers above K."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from autocontrast.bundle import read_manifest
from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import ExportError
from autocontrast.export import ExportOptions
from tests.export.ort_loop import GraphRunner
from tests.export.test_tiny_parity import _batch, _torch_last
from tests.tiny_models import DECODER_ONLY, multi_exit_model

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
EXIT = 2  # of the tiny models' 4 layers
STEPS = 8
ATOL = 1e-4
# every registered decoder-only architecture (its layer stack and final norm), and Llama in every mode
CASES = [(arch, DIRECT) for arch in DECODER_ONLY] + [("llama", m) for m in VocabularyProjectionMode if m != DIRECT]


@pytest.mark.parametrize("arch,mode", CASES, ids=lambda v: getattr(v, "name", v).lower())
def test_early_exit_graph_matches_pytorch_exit_over_cached_steps(arch, mode, tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle(arch, mode, early_exits=(EXIT,))
    spec = read_manifest(bundle).graph(f"decode_exit_{EXIT}")
    assert spec.layers == EXIT and spec.exits == (EXIT,)
    runner = GraphRunner(bundle, spec.name)
    model = multi_exit_model(tiny_checkpoint(arch, mode), mode)
    ids, mask = _batch(3)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out, cache = runner.prefill(ids, mask), None
    for step in range(STEPS + 1):
        want, cache = _torch_last(model, (EXIT,), ids, mask, positions, cache)
        np.testing.assert_allclose(out["exit_logits"][:, 0], want[EXIT].numpy(), atol=ATOL, rtol=0,
                                   err_msg=f"exit {EXIT} of {arch}/{mode.name} at step {step}")
        tokens = want[EXIT].argmax(-1).numpy()
        out = runner.step(tokens)
        ids, positions = tokens[:, None], positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)


def _external_weights(bundle, graph_file: str) -> set[str]:
    graph = onnx.load(str(bundle / graph_file), load_external_data=False)
    return {dict((e.key, e.value) for e in t.external_data)["offset"] for t in graph.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_early_exit_graph_holds_only_the_weights_of_its_layers(tiny_bundle):
    bundle = tiny_bundle("llama", DIRECT, early_exits=(EXIT,))
    full = _external_weights(bundle, "decode_original.onnx")
    early = _external_weights(bundle, f"decode_exit_{EXIT}.onnx")
    assert early < full  # a subset of the same stored tensors
    shared = 1  # the embedding matrix (also the tied head): everything else is per layer
    per_layer = (len(full) - shared) / 4
    assert len(early) - shared == per_layer * EXIT
    graph = onnx.load(str(bundle / f"decode_exit_{EXIT}.onnx"), load_external_data=False)
    assert len([i for i in graph.graph.input if i.name.startswith("past_key_values.")]) == 2 * EXIT


def test_plain_checkpoint_gets_an_early_exit_for_each_chosen_lower_exit(tiny_checkpoint, tmp_path):
    from autocontrast.export.exporter import _early_exits

    options = ExportOptions(exits=(4, 2))
    assert _early_exits(options, (4, 2, "original"), 4, from_checkpoint=False) == (2,)
    assert _early_exits(options, (1, 2, 3, 4, "original"), 4, from_checkpoint=True) == ()
    assert _early_exits(ExportOptions(early_exits=()), (4, 2), 4, from_checkpoint=False) == ()


def test_early_exit_not_among_the_exits_is_refused():
    from autocontrast.export.exporter import _early_exits

    with pytest.raises(ExportError, match="not among the exported exits"):
        _early_exits(ExportOptions(exits=(4, 2), early_exits=(3,)), (4, 2, "original"), 4, from_checkpoint=False)
    with pytest.raises(ExportError, match="below the top layer"):
        _early_exits(ExportOptions(exits=(4, 2), early_exits=(4,)), (4, 2, "original"), 4, from_checkpoint=False)
    with pytest.raises(ExportError, match="layer numbers"):
        ExportOptions(early_exits=("x",))
