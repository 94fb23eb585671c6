"""One switched decode graph (`decode.onnx`) serves the original head, the early exit and ACD: each
mode's tokens equal the PyTorch model's `generate()` (alone and in a left-padded batch), a
Generator holds one ONNX Runtime session for all three, the early-exit mode runs no kernel of the
layers above its exit, and export refuses `--decode-graphs one` where it cannot be, saying why."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from autocontrast.bundle import (
    DECODE_EXITS,
    DECODE_ORIGINAL,
    LOWER_SWITCH,
    SWITCHED_DECODE_FILE,
    UPPER_SWITCH,
    Manifest,
    read_manifest,
)
from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import BundleError, ExportError
from autocontrast.export import ExportOptions
from autocontrast.export.cache import cached_bundle
from autocontrast.runtime import Generator
from autocontrast.runtime.decode_state import open_decode_state
from autocontrast.runtime.session import ExitSession
from tests.runtime.test_tiny_parity import NEW_TOKENS, PROMPTS, _torch_tokens

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
TOP, LOWER = 4, 2  # the tiny models have 4 layers
EARLY = f"decode_exit_{LOWER}"
MODES = {
    DECODE_ORIGINAL: dict(),
    EARLY: dict(use_original_head=False, output_layer_index=LOWER),
    DECODE_EXITS: dict(use_original_head=False, contrast_layer_indices=(TOP, LOWER)),
}


@pytest.fixture(scope="module")
def switched_bundle(plain_llama):
    """The default export of exits (top, lower) with their fused contrast: one switched decode graph."""
    options = ExportOptions(projection=DIRECT.name, exits=(TOP, LOWER), fuse_contrast=(TOP, LOWER))
    return cached_bundle(plain_llama, options, identity="tiny-llama-switched")


def test_the_three_decode_entries_name_one_switched_file(switched_bundle):
    manifest = read_manifest(switched_bundle)
    entries = {g.name: g for g in manifest.graphs if g.kind == "decode"}
    assert set(entries) == set(MODES)
    assert {g.file for g in entries.values()} == {SWITCHED_DECODE_FILE}
    assert dict(entries[DECODE_ORIGINAL].switches) == {UPPER_SWITCH: True, LOWER_SWITCH: False}
    assert dict(entries[EARLY].switches) == {UPPER_SWITCH: False, LOWER_SWITCH: True}
    assert dict(entries[DECODE_EXITS].switches) == {UPPER_SWITCH: True, LOWER_SWITCH: True}
    assert entries[EARLY].layers == LOWER and manifest.kv_for(entries[EARLY]).num_layers == TOP
    assert not (switched_bundle / "decode_original.onnx").exists()
    assert not (switched_bundle / f"{EARLY}.onnx").exists()
    # the exporter validated every entry against PyTorch (float64) through the switched graph
    assert manifest.validation["passed"] and set(MODES) <= set(manifest.validation["graphs"])


def test_every_mode_equals_pytorch_generate_through_one_session(switched_bundle, plain_llama):
    generator = Generator(switched_bundle, preload=())
    for name, fields in MODES.items():
        config = MultiExitConfiguration(**fields)
        assert generator.mode(config).graph.name == name
        wanted = [_torch_tokens(plain_llama, DIRECT, fields, generator.encode(p)) for p in PROMPTS]
        for prompt, want in zip(PROMPTS, wanted, strict=True):
            assert generator.generate(prompt, multi_exit=config, max_new_tokens=NEW_TOKENS).token_ids[0] == want, name
        batch = generator.generate(list(PROMPTS), multi_exit=config, max_new_tokens=NEW_TOKENS).token_ids
        assert batch == wanted, name  # rows of different lengths in one batch
    assert set(generator._sessions) == set(MODES)
    assert len({id(s.session) for s in generator._sessions.values()}) == 1  # one copy of the weights


def test_modes_run_at_once_from_threads_on_the_one_session(switched_bundle):
    from concurrent.futures import ThreadPoolExecutor

    generator = Generator(switched_bundle, preload=())
    configs = [MultiExitConfiguration(**fields) for fields in MODES.values()]
    alone = [generator.generate(list(PROMPTS), multi_exit=c, max_new_tokens=NEW_TOKENS).token_ids for c in configs]
    with ThreadPoolExecutor(len(configs)) as pool:
        together = list(pool.map(lambda c: generator.generate(list(PROMPTS), multi_exit=c,
                                                              max_new_tokens=NEW_TOKENS).token_ids, configs * 2))
    assert together == alone * 2


def test_the_early_exit_mode_keeps_only_its_layers_cache(switched_bundle):
    generator = Generator(switched_bundle, preload=())
    state = generator.decode_state(generator.mode(MultiExitConfiguration(**MODES[EARLY])).graph)
    state.extend([[5, 6, 7], [8, 9]])
    state.advance(np.array([3, 4]))
    assert len(state.cache.input_names) == 2 * TOP  # bound for every layer (the graph takes them all) ...
    assert state.cache.live == 2 * LOWER and len(state.entries()) == 2 * LOWER  # ... kept for its own
    assert [e.shape[0] for e in state.entries()] == [4 + 3] * (2 * LOWER)  # both rows' entries, step included


def _kernels_run(bundle, graph_name: str, tmp_path) -> set[str]:
    """Names of the nodes ONNX Runtime ran (its profile) for a prefill and one step of `graph_name`."""
    manifest = read_manifest(bundle)
    spec = manifest.graph(graph_name)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / graph_name)
    session = ort.InferenceSession(str(bundle / spec.file), options, providers=["CPUExecutionProvider"])
    state = open_decode_state(ExitSession(bundle, spec, kv=manifest.kv_for(spec), vocab_size=manifest.vocab_size,
                                          session=session))
    out = state.extend([[5, 6, 7, 8]])
    state.advance(np.array([int(out.exit_logits[0, 0].argmax())]))
    with open(session.end_profiling(), encoding="utf-8") as f:
        events = json.load(f)
    return {e["args"].get("node_name", e["name"]) for e in events if e.get("cat") == "Node"}


def test_the_early_exit_mode_runs_no_kernel_above_its_exit(switched_bundle, tmp_path):
    upper_layer = f"layers.{LOWER}/"  # 0-based: the first layer above exit LOWER
    early = _kernels_run(switched_bundle, EARLY, tmp_path)
    full = _kernels_run(switched_bundle, DECODE_ORIGINAL, tmp_path)
    assert any(upper_layer in name for name in full)  # the profile does name the layers' kernels
    assert any(f"layers.{LOWER - 1}/" in name for name in early)
    assert not any(upper_layer in name for name in early)


def test_separate_graphs_on_request(plain_llama):
    options = ExportOptions(projection=DIRECT.name, exits=(TOP, LOWER), fuse_contrast=(TOP, LOWER),
                            decode_graphs="separate")
    manifest = read_manifest(cached_bundle(plain_llama, options, identity="tiny-llama-switched"))
    files = {g.name: g.file for g in manifest.graphs if g.kind == "decode"}
    assert files == {name: f"{name}.onnx" for name in MODES}
    assert not any(g.switches for g in manifest.graphs)


def test_one_graph_is_refused_where_it_cannot_be(plain_llama, tmp_path):
    from autocontrast.export import export_bundle

    options = ExportOptions(projection=DIRECT.name, exits=(TOP, 3, LOWER), decode_graphs="one")
    with pytest.raises(ExportError, match="exactly two stacked exits"):
        export_bundle(plain_llama, tmp_path / "out", options=options, log=lambda _: None)
    options = ExportOptions(projection=DIRECT.name, exits=(TOP, LOWER), kv_layout="concat", decode_graphs="one")
    with pytest.raises(ExportError, match="buffer KV layout"):
        export_bundle(plain_llama, tmp_path / "out", options=options, log=lambda _: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--decode-graphs 'two'"):
        ExportOptions(decode_graphs="two")


def test_manifest_round_trips_switches_and_refuses_non_boolean_ones():
    data = json.loads(json.dumps(Manifest.example().to_dict()))
    data["graphs"][0] = {**data["graphs"][0], "file": SWITCHED_DECODE_FILE,
                         "switches": [[UPPER_SWITCH, True], [LOWER_SWITCH, False]]}
    manifest = Manifest.from_dict(json.loads(json.dumps(data)))
    assert manifest.graphs[0].switches == ((UPPER_SWITCH, True), (LOWER_SWITCH, False))
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    data["graphs"][0]["switches"] = [[UPPER_SWITCH, "false"]]
    with pytest.raises(BundleError, match="not true/false"):
        Manifest.from_dict(data)
