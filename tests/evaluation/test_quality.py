"""acd-quality end to end on a tiny model (PyTorch and bundle): valid JSON, a PNG, every setting scored."""

from __future__ import annotations

import json

import pytest

from autocontrast.config import VocabularyProjectionMode
from autocontrast.data import wikitext_path
from autocontrast.evaluation.quality import main

MODE = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
VALID = wikitext_path("valid")


@pytest.mark.parametrize("kind", ["pytorch", "bundle"])
def test_quality_writes_json_and_png_for_every_setting(kind, tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    model = tiny_checkpoint("llama", MODE) if kind == "pytorch" else tiny_bundle("llama", MODE)
    settings = "greedy,exit,sampling" if kind == "bundle" else "greedy,exit,acd,sampling"  # tiny bundle: no
    # decode graph returns both 'original' and exit 2, so ACD is left to the PyTorch run
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    code = main([str(model), "--data", str(VALID), "--settings", settings, "--lower", "2", "--prompts", "3",
                 "--prompt-tokens", "8", "--max-new-tokens", "6", "--batch-size", "2",
                 "--json", str(out_json), "--chart", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert [s["name"] for s in report["settings"]] == settings.split(",")
    assert report["prompts"] == 3
    for s in report["settings"]:
        assert 0.0 <= s["rep"]["rep-2"] <= 1.0 and 0.0 <= s["diversity"] <= 1.0
        assert -1.0 <= s["coherence"] <= 1.0 and 0.0 < s["mauve"] <= 1.0
        assert 0 < s["mean_new_tokens"] <= 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rep-2" in capsys.readouterr().out


def test_quality_greedy_is_the_same_on_pytorch_and_bundle(tiny_checkpoint, tiny_bundle):
    from autocontrast.config import MultiExitConfiguration
    from autocontrast.evaluation.generation_backends import load_backend

    torch_backend = load_backend(tiny_checkpoint("llama", MODE))
    bundle_backend = load_backend(tiny_bundle("llama", MODE))
    rows = [torch_backend.encode("The history of Paris"), torch_backend.encode("A cat sat")]
    exit2 = MultiExitConfiguration(use_original_head=False, output_layer_index=2)
    assert bundle_backend.encode("A cat sat") == rows[1]
    assert (torch_backend.generate(rows, exit2, max_new_tokens=5)
            == bundle_backend.generate(rows, exit2, max_new_tokens=5))
    # HF's repetition penalty is the reference for the runtime's
    assert (torch_backend.generate(rows, exit2, max_new_tokens=8, repetition_penalty=1.5)
            == bundle_backend.generate(rows, exit2, max_new_tokens=8, repetition_penalty=1.5))


def test_a_study_of_greedy_acd_and_dola_settings_on_a_bundle(llama_bundle, tmp_path, capsys):
    out_json = tmp_path / "q.json"
    settings = ["greedy", "greedy:rp=1.3", "acd:lower=1,alpha=0.3", "dola:layers=1/2,rt=0.2,rp=1.2", "dola"]
    assert main([str(llama_bundle), "--data", str(VALID), "--settings", *settings, "--prompts", "2",
                 "--prompt-tokens", "8", "--max-new-tokens", "6", "--no-coherence", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert [(s["name"], s["description"]) for s in report["settings"]] == [
        ("greedy", "original_head"), ("greedy:rp=1.3", "original_head"), ("acd:lower=1,alpha=0.3", "original_vs_1"),
        ("dola:layers=1/2,rt=0.2,rp=1.2", "dola_1_2"), ("dola", "dola_1_2_3")]  # plain dola: every bundle exit
    assert all(s["mauve"] is None and s["coherence"] is None for s in report["settings"])
    assert report["exits"].startswith("direct projection (untrained")  # the tiny bundle's exits are no trained ones


def test_setting_specs_parse_and_refuse_what_a_method_does_not_use():
    from autocontrast.errors import ConfigurationError
    from autocontrast.evaluation.quality_settings import Setting, parse_settings, study_settings

    defaults = Setting(lower=15)
    acd = Setting.parse("acd:upper=30,alpha=0.3,k=2,rp=1.2", defaults)
    assert (acd.upper, acd.lower, acd.alpha, acd.minimum_candidates, acd.repetition_penalty) == (30, 15, 0.3, 2, 1.2)
    assert Setting.parse("dola:layers=8/15/22,rt=0.05", defaults).config().dola_layers == (8, 15, 22)
    for spec, message in [("beam", "unknown setting"), ("greedy:alpha=0.2", "does not use 'alpha'"),
                          ("acd:lower=x", "bad value"), ("acd:lower", "key=value"), ("acd:lower=original", "never")]:
        with pytest.raises(ConfigurationError, match=message):
            Setting.parse(spec, defaults)
    with pytest.raises(ConfigurationError, match="premature layers"):
        parse_settings(["dola"], Setting())
    specs = study_settings((10, 15, 20))
    assert len(specs) == len(set(specs)) == 3 + 12 + 4 + 3
    assert all(s.config() for s in parse_settings(specs, Setting(layers=(10, 15, 20))))


def test_unknown_setting_is_a_clear_error(tiny_checkpoint, capsys):
    from autocontrast.cli_support import run_cli

    code = run_cli(main, [str(tiny_checkpoint("llama", MODE)), "--data", str(VALID), "--settings", "beam"])
    assert code == 2
    assert "unknown setting 'beam'" in capsys.readouterr().err


def test_the_lower_exit_comes_from_the_bundle_or_the_command_line(tiny_checkpoint, tmp_path, capsys):
    from autocontrast.bundle import Manifest, write_manifest
    from autocontrast.cli_support import run_cli
    from autocontrast.evaluation.quality import _bundle_lower_exit

    manifest = Manifest.example()
    write_manifest(tmp_path, manifest)
    for name in [g.file for g in manifest.graphs] + list(manifest.tokenizer_files):
        (tmp_path / name).write_text("")
    assert _bundle_lower_exit(str(tmp_path)) == manifest.fused_contrast.lower
    code = run_cli(main, [str(tiny_checkpoint("llama", MODE)), "--data", str(VALID), "--settings", "acd"])
    assert code == 2 and "pass --lower" in capsys.readouterr().err
