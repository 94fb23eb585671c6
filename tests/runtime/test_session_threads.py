"""The runtime's sessions stop their threads' spinning when a run returns (what alternating between two
sessions costs otherwise is measured by benchmarks/alternating_sessions.py: ~2x a step on 2 cores)."""

from __future__ import annotations

from autocontrast.config import VocabularyProjectionMode
from autocontrast.runtime import Generator


def test_every_session_a_generator_opens_stops_spinning_after_its_run(tiny_bundle):
    bundle = tiny_bundle("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT, fuse_contrast=("original", 2),
                         fuse_dola=(1, 2))  # DoLa fused too: separate decode graphs
    generator = Generator(bundle, threads=2)
    graphs = [generator.mode().graph] + [g for g in generator.manifest.graphs if g.kind == "decode" and g.contrast]
    assert len({g.file for g in graphs}) >= 2  # two sessions, as a server serving greedy and ACD holds
    for graph in graphs:
        options = generator.session(graph).session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1", graph.name
