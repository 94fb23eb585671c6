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
