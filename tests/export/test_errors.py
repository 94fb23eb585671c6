"""User mistakes give a typed error (exit code 2 from the CLI) and leave nothing behind."""

from __future__ import annotations

import json

import pytest

from autocontrast.config import VocabularyProjectionMode
from autocontrast.errors import (
    ExportError,
    ExportValidationError,
    ProviderUnavailableError,
    UnknownExitError,
    UnsupportedArchitectureError,
)
from autocontrast.export import ExportOptions, export_bundle
from autocontrast.export.cli import main
from autocontrast.export.tensorrt import missing_for_tensorrt

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


def _quiet(_message: str) -> None:
    pass


def _nothing_left(parent, name="bundle"):
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir()] == []


def test_an_exit_the_checkpoint_lacks_is_an_unknown_exit_error(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama", VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION)  # exits 1-4
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnknownExitError, match="exit 7 is not available.*1, 2, 3, 4, original"):
        export_bundle(checkpoint, out / "bundle", options=ExportOptions(exits=(7,)), log=_quiet)
    _nothing_left(out)


def test_an_unknown_architecture_is_an_unsupported_architecture_error(tmp_path):
    checkpoint = tmp_path / "bert"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        export_bundle(checkpoint, out / "bundle", log=_quiet)
    _nothing_left(out)


@pytest.mark.skipif(not missing_for_tensorrt(), reason="this machine has a GPU and TensorRT: no error to test")
def test_tensorrt_without_gpu_names_what_is_missing_and_exits_2(tiny_checkpoint, tmp_path, capsys):
    checkpoint = tiny_checkpoint("llama", DIRECT)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ProviderUnavailableError, match="--tensorrt cannot build engines here; missing:"):
        export_bundle(checkpoint, out / "bundle", options=ExportOptions(tensorrt=True), log=_quiet)
    from autocontrast.cli_support import run_cli

    assert run_cli(main, [str(checkpoint), str(out / "bundle"), "--tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "error: --tensorrt cannot build engines here; missing: " in err and "Traceback" not in err
    _nothing_left(out)


def test_an_existing_output_is_refused_without_force(tiny_checkpoint, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle", log=_quiet)
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "mine"


def test_force_replaces_an_existing_output_with_the_new_bundle(tiny_checkpoint, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "old.txt").write_text("old")
    export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle", options=ExportOptions(exits=(2,)),
                  force=True, log=_quiet)
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert not (tmp_path / "bundle" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary directories left


def test_a_failed_validation_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    from autocontrast.export import validation

    strict = validation.Tolerance(logits=-1.0, present=-1.0, contrast=None)  # nothing can pass
    monkeypatch.setitem(validation.TOLERANCES, "float32", strict)
    out = tmp_path / "out"
    with pytest.raises(ExportValidationError, match="do not match PyTorch.*nothing was written"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), out / "deeper" / "bundle",
                      options=ExportOptions(exits=(2,), score_graph=False), log=_quiet)
    assert not out.exists()  # parents created for the export are removed too


def test_cli_reports_a_bad_option_as_an_error_line(tiny_checkpoint, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    code = run_cli(main, [str(tiny_checkpoint("gpt2", DIRECT)), str(tmp_path / "b"), "--exits", "9"])
    assert code == 2
    assert "\nerror: exit 9 is not available in this checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_model_folder_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="cannot read a model config"):
        export_bundle(tmp_path / "no-such-model", tmp_path / "bundle", log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_fused_contrast_upside_down_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--fuse-contrast: the lower exit of a contrast must be below the upper"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle", options=ExportOptions(fuse_contrast=(1, 3)),
                      log=_quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fields,message", [(dict(alpha=1.5), r"alpha \(1.5\) must be within \[0, 1\]"),
                                            (dict(minimum_candidates=0), r"minimum_candidates \(0\) must be at least 1")])
def test_fused_contrast_parameters_follow_the_configurations_rule(fields, message):
    with pytest.raises(ExportError, match="fused contrast: " + message):
        ExportOptions(**fields)
