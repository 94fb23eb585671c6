"""acd-bench end to end on a tiny scenario: the JSON has its schema, and every listed system has
figures or says why it was skipped. (No speed is asserted: speed lives in benchmark output.)"""

from __future__ import annotations

import json

import pytest

from autocontrast.bench.cli import main
from autocontrast.bench.systems import DEFAULT_SYSTEMS, FLOOR, OURS_MODES
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


def _base_name(name: str) -> str:
    """genai-greedy-fp32 -> genai-greedy: the native peers are one system per model file, named by label."""
    for peer in ("genai-greedy", "llamacpp-greedy"):
        if name.startswith(peer):
            return peer
    return name


def test_every_system_has_figures_or_a_skip_reason(results):
    data, _ = results
    for scenario in data["scenarios"]:
        assert {_base_name(name) for name in scenario["systems"]} == set(DEFAULT_SYSTEMS)
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
        for mode in OURS_MODES:
            assert "figures" in scenario["systems"][f"ours-{mode}"], scenario["systems"][f"ours-{mode}"]
        assert "figures" in scenario["systems"][FLOOR], scenario["systems"][FLOOR]


def test_the_matmul_floor_reads_the_bundles_weight_bytes(tiny_bundle):
    from autocontrast.bench.floor import MatMulFloorSystem
    from autocontrast.bundle import read_manifest

    bundle = tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1))
    system = MatMulFloorSystem(str(bundle))
    assert system.skip_reason() is None
    system.load()
    weights = sum((bundle / f).stat().st_size for f in read_manifest(bundle).graph("decode_original").external_data)
    assert 0 <= weights - system.weight_bytes < 4 * read_manifest(bundle).hidden_size  # all but a partial column
    assert len(system.generate([[1, 2]], 3).step_ends) == 3


def test_ratios_are_relative_to_the_baseline(results):
    data, _ = results
    for scenario in data["scenarios"]:
        base = scenario["systems"]["optimum-greedy"]
        if "figures" in base:
            assert base["figures"]["tpot_ratio"] == pytest.approx(1.0)


def test_greedy_peers_agree_with_our_greedy_token_for_token(results):
    data, _ = results
    assert data["reference"] == "ours-original"
    for scenario in data["scenarios"]:
        systems = scenario["systems"]
        measured = [name for name in ("torch-greedy", "optimum-greedy") if "figures" in systems[name]]
        if not measured:
            pytest.skip("neither greedy peer ran (torch/optimum not installed)")
        for name in measured:
            figures = systems[name]["figures"]
            assert (figures["agree_tokens"], figures["agree_of"]) == (4, 4), name


def test_chart_is_written(results):
    _, out = results
    assert (out / "chart.png").stat().st_size > 10_000


def test_unknown_system_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown system"):
        main(["--bundle", str(tmp_path), "--systems", "ours-magic", "--out", str(tmp_path)])


def test_a_labelled_peer_is_asked_for_by_the_name_list_systems_shows(tmp_path, capsys):
    files = []
    for label in ("a", "b"):
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(b"GGUF" + bytes(60))
        files += ["--gguf", f"{label}={path}"]
    assert main(["--bundle", str(tmp_path), *files, "--systems", "ours-original,llamacpp-greedy-b", "--list-systems"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ours-original", "llamacpp-greedy-b"]
    assert main(["--bundle", str(tmp_path), *files, "--systems", "llamacpp-greedy", "--list-systems"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["llamacpp-greedy-a", "llamacpp-greedy-b"]
    with pytest.raises(ConfigurationError, match="no such labelled peer: llamacpp-greedy-c"):
        main(["--bundle", str(tmp_path), *files, "--systems", "llamacpp-greedy-c", "--list-systems"])


def test_providers_expand_into_one_system_per_provider(tmp_path, capsys):
    code = main(["--bundle", str(tmp_path), "--providers", "cpu,GPU,cuda", "--systems", "ours-original,ours-acd-fused",
                 "--list-systems"])
    assert code == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["ours-original", "ours-acd-fused", "ours-original-fp32-cuda", "ours-acd-fused-fp32-cuda"]


def test_unknown_provider_exits_2_with_the_choices(tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    code = run_cli(main, ["--bundle", str(tmp_path), "--providers", "cpu,quantum", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown provider 'quantum'; choose one of: cpu, cuda, tensorrt")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_onnxruntime_gpu_exits_2_before_loading(tmp_path, capsys, provider):
    import onnxruntime as ort

    from autocontrast.cli_support import run_cli
    from autocontrast.runtime.providers import ORT_NAMES

    if ORT_NAMES[provider] in ort.get_available_providers():
        pytest.skip(f"this onnxruntime offers {provider}: the missing-provider error cannot happen")
    # tmp_path is no bundle: the provider is refused before any bundle, tokenizer or worker is touched
    code = run_cli(main, ["--bundle", str(tmp_path), "--providers", f"cpu,{provider}", "--systems", "ours-original",
                          "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"provider '{provider}' is not available in this onnxruntime" in err and "pip install" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["exit", "acd-fused"])
def test_our_systems_take_the_bundles_fused_contrast_when_none_is_given(mode, tiny_bundle):
    from autocontrast.bench.ours import RuntimeSystem
    from autocontrast.bundle import read_manifest

    bundle = tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1))
    fused = read_manifest(bundle).fused_contrast
    system = RuntimeSystem(str(bundle), mode=mode, provider="cpu", contrast=None)
    system.load()
    wanted = (fused.upper, fused.lower) if mode == "acd-fused" else (fused.lower,)
    assert system.multi_exit.required_exits == wanted


def test_acd_fused_runs_the_bundles_fused_contrast_with_the_alpha_it_was_fused_with(tiny_bundle):
    """A bundle fused at alpha 0.3 (the demo's): the system takes that alpha, so the fused graph serves it."""
    from autocontrast.bench.ours import RuntimeSystem
    from autocontrast.bundle import read_manifest

    bundle = tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1), alpha=0.3)
    assert read_manifest(bundle).fused_contrast.alpha == 0.3
    system = RuntimeSystem(str(bundle), mode="acd-fused", provider="cpu", contrast=None)
    system.load()  # raised "has no fused contrast" when it asked for the default alpha
    assert system.multi_exit.alpha == 0.3
    assert system.generator.mode(system.multi_exit, fused=True).fused


def test_memory_table_measures_each_weights_policy_after_each_mode(llama_bundle, tmp_path, capsys):
    code = main(["--bundle", str(llama_bundle), "--memory", "--contrast", "3,1", "--exit", "2", "--repeats", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    weights = (llama_bundle / "weights.bin").stat().st_size
    assert data["weight_bytes"] == weights
    assert set(data["policies"]) == {"own", "shared"}
    for rows in data["policies"].values():
        assert [r["mode"] for r in rows] == ["opened", "original", "exit 2", "ACD 3 vs 1"]
        assert [r["graph"] for r in rows] == ["-", "decode_original", "decode_exits", "decode_exits"]
        assert all(r["VmRSS"] > 0 and r["RssAnon"] + r["RssFile"] <= r["VmRSS"] + 1 for r in rows)
    assert "| shared | ACD 3 vs 1 | decode_exits |" in capsys.readouterr().out


def test_share_weights_adds_a_shared_twin_of_each_cpu_system(llama_bundle, capsys):
    main(["--bundle", str(llama_bundle), "--list-systems", "--systems", "ours-original,ours-acd-fused",
          "--share-weights"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["ours-original", "ours-original-shared", "ours-acd-fused", "ours-acd-fused-shared"]


def test_optimum_exports_are_cached_per_model_not_per_folder_name(tmp_path):
    from autocontrast.bench.systems import model_identity

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for folder, layers in ((first, 2), (second, 4)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    assert model_identity(first) != model_identity(second)  # same name, another model: another export
    (second / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert model_identity(first) == model_identity(second)


def _killed_while_loading(spec):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a system too large for the machine


class _DiesWhenRun:
    def skip_reason(self):
        return None

    def load(self):
        pass

    def generate(self, prompts, new_tokens):
        import os

        os._exit(3)


def _dies_when_run(spec):
    return _DiesWhenRun()


def test_a_worker_killed_while_loading_is_skipped_with_the_likely_cause():
    from autocontrast.bench.workers import Worker

    worker = Worker("big-system", _killed_while_loading)
    worker.wait_ready(60)
    assert "SIGKILL" in worker.skipped and "OOM killer" in worker.skipped and "--share-weights" in worker.skipped


def test_a_worker_that_dies_during_a_run_is_a_failed_run_not_a_crash():
    from autocontrast.bench.workers import Worker

    worker = Worker("fragile", _dies_when_run)
    worker.wait_ready(60)
    assert worker.skipped is None
    assert worker.run([[1, 2]], 4, timeout=60) == "its worker died during the run (exit status 3)"
    worker.close()


def test_a_worker_killed_after_loading_is_a_failed_run_naming_the_killer():
    import os
    import signal

    from autocontrast.bench.workers import Worker

    worker = Worker("loaded-then-killed", _dies_when_run)
    worker.wait_ready(60)
    assert worker.skipped is None
    os.kill(worker._process.pid, signal.SIGKILL)  # the OOM killer, woken by the next system's load
    worker._process.join(timeout=10)
    outcome = worker.run([[1, 2]], 4, timeout=60)
    assert outcome.startswith("its worker died before the run (killed by SIGKILL, most likely the kernel's OOM killer")
    worker.close()
