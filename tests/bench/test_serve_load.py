"""acd-bench-serve end to end against a real acd-serve over the tiny Llama bundle: every scenario
runs, once per step budget, and writes its figures (no speed is asserted: speed lives in benchmark
output)."""

from __future__ import annotations

import json

import pytest

from autocontrast.bench.serve_load import main

SCENARIOS = {
    "load": (["--concurrency", "1,2", "--new-tokens", "4", "--requests", "1"], 2,
             {"clients", "tokens_per_s", "ttft_p99_s", "itl_median_s", "itl_p99_s"}),
    "long-prompt": (["--streams", "2", "--stream-tokens", "60", "--long-words", "150"], 1,
                    {"step_tokens", "prompt_tokens", "alone_ttft_s", "loaded_ttft_s", "gap_median_s", "gap_worst_s"}),
    "shared-prefix": (["--long-words", "150"], 1, {"step_tokens", "first_ttft_s", "second_ttft_s"}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_runs_per_step_budget_and_writes_its_figures(llama_bundle, tmp_path, capsys, scenario):
    args, per_server, fields = SCENARIOS[scenario]
    out = tmp_path / "serve.json"
    assert main(["--scenario", scenario, "--step-tokens", "0,8", "--json", str(out), *args, str(llama_bundle)]) == 0
    results = json.loads(out.read_text())
    assert len(results) == 2 * per_server and all(fields <= set(r) for r in results)
    if "step_tokens" in fields:
        assert [r["step_tokens"] for r in results] == [0, 8]
    if scenario == "long-prompt":
        assert all(r["prompt_tokens"] > 150 and r["gap_worst_s"] >= r["gap_median_s"] > 0 for r in results)
    table = capsys.readouterr().out
    assert table.count("\n|") >= 1 + 2 * per_server  # header rule and a row per result


def test_server_arguments_after_a_double_dash_reach_the_server_wherever_the_bundle_stands(monkeypatch):
    import autocontrast.bench.serve_load as serve_load

    seen = []

    class Started(Exception):
        pass

    def fake_server(bundle, *, max_batch, extra):
        seen.append((bundle, extra))
        raise Started

    monkeypatch.setattr(serve_load, "running_server", fake_server)
    for argv in (["B", "--scenario", "long-prompt", "--step-tokens", "48", "--", "--log-level", "debug"],
                 ["--scenario", "long-prompt", "--step-tokens", "48", "B", "--", "--log-level", "debug"]):
        with pytest.raises(Started):
            main(argv)
    assert seen == [("B", ["--log-level", "debug", "--max-step-tokens", "48"])] * 2
