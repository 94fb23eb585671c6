"""acd-bench-structured end to end on the tiny Llama bundle: both modes run, every answer is checked by
jsonschema, and the figures are written (no speed is asserted: speed lives in benchmark output)."""

from __future__ import annotations

import json

import pytest

from autocontrast.bench.structured import main
from autocontrast.errors import ConfigurationError


def test_both_modes_answer_valid_json_and_report_the_mask_share(llama_bundle, tmp_path, capsys):
    out = tmp_path / "structured.json"
    assert main([str(llama_bundle), "--requests", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == ["original", "contrast"]
    assert all(r["valid"] == r["requests"] == 2 and 0 < r["mask_share"] < 1 and not r["failures"] for r in results)
    assert "mask %" in capsys.readouterr().out


def test_an_unknown_mode_is_a_clear_error(llama_bundle):
    with pytest.raises(ConfigurationError, match="not one of"):
        main([str(llama_bundle), "--requests", "1", "--modes", "greedy"])
