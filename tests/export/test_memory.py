"""An export reports each stage's time and peak resident memory, and refuses early, with figures,
when its estimated peak exceeds what the machine has available."""

from __future__ import annotations

import time

import numpy as np
import pytest

from autocontrast.errors import ExportError
from autocontrast.export.memory import StageMeter, check_memory


def test_a_stage_peak_covers_what_the_stage_allocated_and_the_next_stage_starts_afresh():
    lines = []
    meter = StageMeter(lines.append)
    meter("[1/2] allocating")
    block = np.ones(200_000_000 // 8)  # 200 MB, touched
    time.sleep(0.2)  # sampled
    meter("[1/2] still the same stage")
    del block
    meter("[2/2] small")
    time.sleep(0.2)
    meter.stop()
    (first, _, big), (second, _, small) = meter.stages
    assert first == "[1/2] allocating" and second == "[2/2] small"
    assert big - small > 150_000_000
    assert sum("peak resident" in line for line in lines) == 2


def test_an_estimate_beyond_the_available_memory_is_refused_with_both_figures():
    with pytest.raises(ExportError, match=r"about 48\.0 GB .* 24\.0 GB available"):
        check_memory(48_000_000_000, what="exporting Llama-3.2-1B", available=24_000_000_000)
    check_memory(1_000_000_000, what="exporting a small model", available=24_000_000_000)
