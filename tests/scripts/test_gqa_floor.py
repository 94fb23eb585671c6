"""scripts/gqa_floor.py times ONNX Runtime's GroupQueryAttention at a bundle's shapes, past lengths of
our choice, and prints one row per length."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gqa_floor.py"


def test_prints_a_time_per_past_length_at_the_bundles_shapes(llama_bundle):
    run = subprocess.run([sys.executable, str(SCRIPT), str(llama_bundle), "--contexts", "3,300", "--repeats", "3",
                          "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "4 layers x GroupQueryAttention" in run.stdout
    rows = re.findall(r"^\| (\d+) \| ([0-9.]+) \|$", run.stdout, flags=re.M)
    assert [int(past) for past, _ in rows] == [3, 300]
    assert all(float(ms) > 0 for _, ms in rows)
