"""On the real SmolLM2-135M bundle, the runtime's greedy tokens equal the PyTorch multi-exit model's
in every mode: original head, one exit, and the contrast (fused, NumPy, non-default alpha/k, original
as the upper exit)."""

from __future__ import annotations

import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.runtime import Generator
from tests.runtime.torch_reference import torch_greedy

pytestmark = pytest.mark.slow

PROMPT = "The history of the city of Paris"
NEW_TOKENS = 24
DIRECT = "SHARED_PROJECTION_DIRECT"
EXITS = (10, 15, 20, 30)
CASES = {
    "original": (MultiExitConfiguration(), True),
    "exit-15": (MultiExitConfiguration(use_original_head=False, output_layer_index=15), True),
    "acd-30-15-fused": (MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15)), True),
    "acd-30-15-numpy": (MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15)), False),
    "acd-alpha-k": (MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15), alpha=0.3,
                                           minimum_candidates=3), True),
    "acd-original-vs-10": (MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 10)),
                           True),
}


@pytest.fixture(scope="module")
def generator(smollm2_bundle):
    return Generator(smollm2_bundle)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_pytorch(case, generator, smollm2_path):
    config, fused = CASES[case]
    ids = generator.encode(PROMPT)
    ours = generator.generate(ids, multi_exit=config, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                              fused_contrast=fused)
    assert generator.mode(config, fused=fused).fused == (case == "acd-30-15-fused")
    assert ours.token_ids[0] == torch_greedy(smollm2_path, config, ids, NEW_TOKENS, projection=DIRECT, exits=EXITS)


def test_acd_differs_from_greedy(generator):
    acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(30, 15))
    assert generator.generate(PROMPT, multi_exit=acd, max_new_tokens=16).token_ids != \
        generator.generate(PROMPT, max_new_tokens=16).token_ids
