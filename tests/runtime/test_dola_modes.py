"""DoLa in the runtime's command-line modes: without --exits it takes every exit a decode graph returns
beside the model's own head; acd-generate runs it (its tokens are held to PyTorch's in test_tiny_parity)."""

from __future__ import annotations

import pytest

from autocontrast.bundle import read_manifest
from autocontrast.errors import ConfigurationError
from autocontrast.runtime import Generator
from autocontrast.runtime.cli import bundle_mode, main


def test_dola_without_exits_takes_every_exit_beside_the_own_head(llama_bundle):
    config = bundle_mode(read_manifest(llama_bundle), "dola", None, 0.1, 1, 0.2)
    assert config.dola_layers == (1, 2, 3) and config.relative_top == 0.2  # the tiny model's 4th layer is its head


def test_acd_generate_runs_dola_as_the_generator_does(llama_bundle, capsys):
    assert main([str(llama_bundle), "--prompt", "The capital of France is", "--mode", "dola", "--exits", "1,2",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    config = bundle_mode(read_manifest(llama_bundle), "dola", "1,2", 0.1, 1)
    expected = Generator(llama_bundle).generate("The capital of France is", multi_exit=config, max_new_tokens=8).text
    assert expected.strip() and expected.strip() in capsys.readouterr().out


def test_a_dola_candidate_that_is_the_own_head_is_refused(llama_generator):
    config = bundle_mode(llama_generator.manifest, "dola", "2,4", 0.1, 1)
    with pytest.raises(ConfigurationError, match="model's own head"):
        llama_generator.generate("Hi", multi_exit=config, max_new_tokens=2)


def test_a_contrast_without_exits_takes_the_fused_contrast_and_its_parameters(llama_bundle):
    import dataclasses

    manifest = read_manifest(llama_bundle)
    graphs = tuple(dataclasses.replace(g, contrast=dataclasses.replace(g.contrast, alpha=0.3, minimum_candidates=2))
                   if g.contrast else g for g in manifest.graphs)
    manifest = dataclasses.replace(manifest, graphs=graphs)
    fused = bundle_mode(manifest, "contrast", None, None, None)
    assert (fused.contrast_layer_indices, fused.alpha, fused.minimum_candidates) == ((3, 1), 0.3, 2)
    given = bundle_mode(manifest, "contrast", None, 0.5, None)
    assert (given.alpha, given.minimum_candidates) == (0.5, 2)
    assert bundle_mode(manifest, "contrast", "4,2", None, None).alpha == 0.1  # named exits: the defaults
