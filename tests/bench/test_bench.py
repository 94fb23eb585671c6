"""acd-bench end to end on a tiny scenario: the JSON has its schema, and every listed system has
figures or says why it was skipped. (No speed is asserted: speed lives in benchmark output.)"""

from __future__ import annotations

import json

import pytest

from autocontrast.bench.cli import main
from autocontrast.bench.systems import DEFAULT_SYSTEMS
from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import ConfigurationError

FIGURES = {"ttft_ms", "tpot_ms", "tpot_p90_ms", "tpot_spread_ms", "e2e_ms", "tokens_per_s", "rss_peak_mib", "repeats"}


@pytest.fixture(scope="module")
def results(tiny_bundle, tiny_checkpoint, tmp_path_factory):
    bundle = tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1))
    model = tiny_checkpoint("llama", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    out = tmp_path_factory.mktemp("bench")
    code = main(["--bundle", str(bundle), "--model", str(model), "--contrast", "3,1", "--exit", "2",
                 "--scenarios", "8x4x1,8x4x2", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def test_json_records_machine_and_every_scenario(results):
    data, _ = results
    assert data["schema_version"] == 1
    assert {"cpu", "cores", "versions", "onnxruntime_providers"} <= set(data["machine"])
    assert [s["name"] for s in data["scenarios"]] == ["p8-n4-b1", "p8-n4-b2"]


def test_every_system_has_figures_or_a_skip_reason(results):
    data, _ = results
    for scenario in data["scenarios"]:
        assert set(scenario["systems"]) == set(DEFAULT_SYSTEMS)
        for name, entry in scenario["systems"].items():
            if "skipped" in entry:
                assert entry["skipped"], name
                continue
            figures = entry["figures"]
            assert FIGURES <= set(figures), name
            assert figures["repeats"] == 2
            assert all(len(run["step_ends"]) == 4 for run in entry["runs"]), name
            assert figures["tpot_ms"] > 0 and figures["ttft_ms"] > 0


def test_our_systems_run_where_only_the_runtime_is_needed(results):
    data, _ = results
    for scenario in data["scenarios"]:
        for mode in ("original", "exit", "acd-fused", "acd-numpy"):
            assert "figures" in scenario["systems"][f"ours-{mode}"], scenario["systems"][f"ours-{mode}"]


def test_ratios_are_relative_to_the_baseline(results):
    data, _ = results
    for scenario in data["scenarios"]:
        base = scenario["systems"]["optimum-greedy"]
        if "figures" in base:
            assert base["figures"]["tpot_ratio"] == pytest.approx(1.0)


def test_chart_is_written(results):
    _, out = results
    assert (out / "chart.png").stat().st_size > 10_000


def test_unknown_system_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown system"):
        main(["--bundle", str(tmp_path), "--systems", "ours-magic", "--out", str(tmp_path)])
