"""Tiny bundles of every registered decoder-only architecture (tests/tiny_models.py export_cases: each
family in every projection mode) match PyTorch, exit by exit, for a prefill and 8 cached decode
steps, at batch 1 and at batch 3 with left padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocontrast.bundle import (
    ATTENTION_MASK,
    CONTRAST_OUTPUT,
    DECODE_EXITS,
    DECODE_ORIGINAL,
    INPUT_IDS,
    LOGITS_OUTPUT,
    POSITION_IDS,
    SCORE_GRAPH,
    read_manifest,
)
from autocontrast.config import VocabularyProjectionMode
from autocontrast.models.contrast import calculate_contrasted_logits
from autocontrast.models.families import family_of_type
from tests.export.ort_loop import GraphRunner
from tests.runtime.conftest import CONTRAST
from tests.tiny_models import DECODER_ONLY, export_cases, left_padded_prompts, multi_exit_model

CASES = export_cases()
IDS = [f"{arch}-{mode.name.lower()}" for arch, mode in CASES]
MODES = tuple(VocabularyProjectionMode)
STEPS = 8
ATOL = 1e-4


def _batch(batch: int) -> tuple[np.ndarray, np.ndarray]:
    # rows 2 and 3 left-padded; 12 + 8 steps > GPT-Neo's local attention window (16)
    return left_padded_prompts([12] if batch == 1 else [12, 7, 1], seed=batch)


def _torch_last(model, exits, ids, mask, positions, cache):
    """PyTorch reference: last-position logits of each exit, through the model's own forward."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        by_exit = model.exit_logits(tuple(exits), out.logits, out.hidden_states)
    return {e: v[:, -1].float() for e, v in by_exit.items()}, out.past_key_values


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch,mode", CASES, ids=IDS)
def test_every_exit_matches_pytorch_over_cached_decode_steps(arch, mode, batch, tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle(arch, mode, fuse_contrast=CONTRAST)
    model = multi_exit_model(tiny_checkpoint(arch, mode), mode)
    runners = [GraphRunner(bundle, name) for name in (DECODE_ORIGINAL, DECODE_EXITS)]
    ids, mask = _batch(batch)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    outs = [r.prefill(ids, mask) for r in runners]
    cache = None
    for step in range(STEPS + 1):
        want, cache = _torch_last(model, runners[1].exits + ["original"], ids, mask, positions, cache)
        for runner, out in zip(runners, outs, strict=True):
            for i, exit_ in enumerate(runner.exits):
                np.testing.assert_allclose(out[LOGITS_OUTPUT][:, i], want[exit_].numpy(), atol=ATOL, rtol=0,
                                           err_msg=f"exit {exit_} of {arch}/{mode.name} at step {step}")
        contrast = calculate_contrasted_logits(want[CONTRAST[0]], want[CONTRAST[1]]).numpy()
        np.testing.assert_allclose(outs[1][CONTRAST_OUTPUT], contrast, atol=ATOL, rtol=0)
        tokens = want["original"].argmax(-1).numpy()  # both sides continue with the same tokens
        outs = [r.step(tokens) for r in runners]
        ids, positions = tokens[:, None], positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


@pytest.mark.parametrize("arch", sorted({a for a, m in CASES if m == VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION}))
def test_score_graph_matches_pytorch_at_every_real_position(arch, tiny_bundle, tiny_checkpoint):
    mode = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
    bundle = tiny_bundle(arch, mode, fuse_contrast=CONTRAST)
    manifest = read_manifest(bundle)
    spec = manifest.graph(SCORE_GRAPH)
    model = multi_exit_model(tiny_checkpoint(arch, mode), mode)
    ids, mask = _batch(3)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
    logits, = session.run([LOGITS_OUTPUT], {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions})
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), output_hidden_states=True)
        by_exit = model.exit_logits(spec.exits, out.logits, out.hidden_states)
    real = mask.astype(bool)
    for i, exit_ in enumerate(spec.exits):
        np.testing.assert_allclose(logits[:, :, i][real], by_exit[exit_].numpy()[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_manifest_records_a_passed_validation_of_every_graph(mode, tiny_bundle):
    manifest = read_manifest(tiny_bundle("llama", mode))
    assert manifest.validation["passed"] is True
    assert set(manifest.validation["graphs"]) == {g.name for g in manifest.graphs}
    assert manifest.projection_mode == mode.name
    assert manifest.kv_cache.num_kv_heads == 2  # grouped-query attention: 4 query heads, 2 KV heads


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_manifest_names_the_registered_family_and_the_models_own_kv_layout(arch, tiny_bundle, tiny_checkpoint):
    mode = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
    manifest = read_manifest(tiny_bundle(arch, mode))
    assert manifest.architecture == family_of_type(arch).name and manifest.validation["passed"] is True
    with torch.no_grad():  # the layout transformers' own cache has
        cache = multi_exit_model(tiny_checkpoint(arch, mode), mode)(torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    keys = cache.layers[0].keys  # (batch, kv_heads, seq, head_dim)
    assert (manifest.kv_cache.num_layers, manifest.kv_cache.num_kv_heads, manifest.kv_cache.head_dim) == \
        (len(cache.layers), keys.shape[1], keys.shape[3])
