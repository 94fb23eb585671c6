"""A decode graph fusing both the ACD contrast and DoLa computes, at each step, only the one its rows read
(autocontrast.export.output_gates): switching the other off leaves the exit logits, the KV cache and the
output that is read exactly as they were, and rows of both modes in one batch still give the PyTorch
model's greedy tokens (the reference: `generate()` with each row's MultiExitConfiguration)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from autocontrast.bundle import output_switch
from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.runtime import Generator
from tests.runtime.torch_reference import torch_greedy

PROJECTION = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
CONTRAST = ("original", 2)
CANDIDATES = (1, 2)
RELATIVE_TOP = 0.05
PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea, there lived")
NEW_TOKENS = 8
CONFIGS = {"acd": dict(contrast_layer_indices=CONTRAST), "dola": dict(dola_layers=CANDIDATES, relative_top=RELATIVE_TOP)}


def _config(mode: str, **fields) -> MultiExitConfiguration:
    return MultiExitConfiguration(use_original_head=False, **CONFIGS[mode], **fields)


@pytest.fixture(scope="module")
def both_bundle(tiny_bundle):
    return tiny_bundle("llama", PROJECTION, fuse_contrast=CONTRAST, fuse_dola=CANDIDATES, relative_top=RELATIVE_TOP)


def _fused_graph(generator: Generator):
    return next(g for g in generator.manifest.graphs if g.contrast is not None and g.dola is not None)


def test_the_graph_fusing_both_takes_a_switch_per_output(both_bundle):
    graph = _fused_graph(Generator(both_bundle))
    proto = onnx.load(str(both_bundle / graph.file), load_external_data=False)
    switches = {output_switch(graph.contrast.output), output_switch(graph.dola.output)}
    assert switches <= {i.name for i in proto.graph.input}
    gates = [n for n in proto.graph.node if n.op_type == "If" and n.input[0] in switches]
    assert sorted(o for n in gates for o in n.output) == sorted([graph.contrast.output, graph.dola.output])


@pytest.mark.parametrize("read", ["contrast", "dola"])
def test_a_step_reading_one_output_leaves_everything_else_as_computing_both_does(both_bundle, read):
    generator = Generator(both_bundle)
    graph = _fused_graph(generator)
    prompts = [generator.encode(p) for p in PROMPTS]
    full, gated = generator.decode_state(graph), generator.decode_state(graph)
    gated.fused_outputs = frozenset({getattr(graph, read).output})
    for step in range(3):
        if step == 0:
            want, got = full.extend(prompts), gated.extend(prompts)
        else:
            token = np.argmax(want.exit_logits[:, 0, :], axis=-1)
            want, got = full.advance(token), gated.advance(token)
        np.testing.assert_array_equal(got.exit_logits, want.exit_logits)
        np.testing.assert_array_equal(getattr(got, read), getattr(want, read))
        assert getattr(got, "dola" if read == "contrast" else "contrast") is None  # not computed
    for a, b in zip(full.entries(), gated.entries(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_of_both_modes_in_one_batch_give_the_pytorch_models_tokens(both_bundle, tiny_checkpoint):
    checkpoint = tiny_checkpoint("llama", PROJECTION)
    generator = Generator(both_bundle)
    stepper = generator.stepper(_config("acd"))
    rows = []
    for name in CONFIGS:
        config = _config(name)
        mode = generator.mode(config)
        assert mode.fused and mode.graph.name == stepper.graph.name  # both fused, one graph
        for prompt in PROMPTS:
            ids = generator.encode(prompt)
            want = torch_greedy(checkpoint, config, ids, NEW_TOKENS, projection=PROJECTION)
            rows.append((stepper.add(ids, multi_exit=config, max_new_tokens=NEW_TOKENS, ignore_eos=True), want))
    while not stepper.done:
        stepper.step()
    for row, want in rows:
        assert stepper.row(row).token_ids == want


def test_a_stepper_computes_only_what_its_rows_read(both_bundle):
    generator = Generator(both_bundle)
    graph = _fused_graph(generator)
    stepper = generator.stepper(_config("acd"))
    stepper.add(PROMPTS[0], max_new_tokens=2)
    stepper.step()
    assert stepper.state.fused_outputs == {graph.contrast.output}
    stepper.add(PROMPTS[1], multi_exit=_config("dola"), max_new_tokens=2)
    stepper.step()  # a DoLa row joins: both
    assert stepper.state.fused_outputs == {graph.contrast.output, graph.dola.output}
    plain = generator.stepper(_config("acd"), fused_contrast=False)  # NumPy contrast: neither fused output
    plain.add(PROMPTS[0], multi_exit=_config("acd"), fused_contrast=False, max_new_tokens=2)
    plain.step()
    assert plain.state.fused_outputs == frozenset()
