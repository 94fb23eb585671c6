"""User mistakes give a typed error (exit code 2 from the CLI) and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

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


def _snapshot(root):
    """Every path under `root` with its bytes (files) or None (directories), and its mode."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


def _fake_bundle(path):
    """A directory whose manifest names this format (what --force may replace), plus a file of the old export."""
    from autocontrast.bundle import Manifest, write_manifest

    path.mkdir()
    (path / "old.txt").write_text("old")
    write_manifest(path, Manifest.example())
    return path


def test_force_replaces_an_existing_bundle_with_the_new_one(tiny_checkpoint, tmp_path):
    _fake_bundle(tmp_path / "bundle")
    export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle", options=ExportOptions(exits=(2,)),
                  force=True, log=_quiet)
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["architecture"] == "gpt2"
    assert not (tmp_path / "bundle" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary directories left


def test_force_leaves_a_folder_that_is_not_a_bundle_byte_for_byte(tiny_checkpoint, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    precious = tmp_path / "precious"
    (precious / "chapters").mkdir(parents=True)
    (precious / "thesis.txt").write_text("x\n")
    (precious / "chapters" / "one.md").write_bytes(bytes(range(256)))
    (precious / "manifest.json").write_text(json.dumps({"format": "someone-elses-format"}))
    before = _snapshot(tmp_path)
    assert run_cli(main, [str(tiny_checkpoint("gpt2", DIRECT)), str(precious), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is not an autocontrast bundle" in err and "left it untouched" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_force_leaves_a_file_at_the_output_path_untouched(tiny_checkpoint, tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(ExportError, match="is not an autocontrast bundle"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "notes", force=True, log=_quiet)
    assert (tmp_path / "notes").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_a_folder_put_in_place_of_the_bundle_during_the_export_is_kept(tiny_checkpoint, tmp_path, monkeypatch):
    """--force checks again at the rename: what replaced the bundle meanwhile is not ours either."""
    from autocontrast.export import exporter

    build = exporter._build

    def build_then_swap(*args, **kwargs):
        manifest = build(*args, **kwargs)
        shutil.rmtree(tmp_path / "bundle")
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "thesis.txt").write_text("x")
        return manifest

    _fake_bundle(tmp_path / "bundle")
    monkeypatch.setattr(exporter, "_build", build_then_swap)
    with pytest.raises(ExportError, match="changed during the export and is not an autocontrast bundle"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle",
                      options=ExportOptions(exits=(2,), score_graph=False), force=True, log=_quiet)
    assert (tmp_path / "bundle" / "thesis.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


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


# -- bad output paths: refused before the model loads (a missing model proves the order) -----------


def _no_model(tmp_path):
    return tmp_path / "model-that-would-fail-later"


def test_an_output_under_a_file_is_refused_before_loading(tmp_path):
    (tmp_path / "afile").write_text("f")
    for output in (tmp_path / "afile" / "bundle", tmp_path / "afile" / "deeper" / "bundle"):
        with pytest.raises(ExportError, match="afile is a file, not a directory"):
            export_bundle(_no_model(tmp_path), output, log=_quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("output", ["", ".", "..", "/"])
def test_an_output_that_names_no_new_directory_is_refused_even_with_force(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="does not name a directory to create"):
        export_bundle(_no_model(tmp_path), output, force=True, log=_quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's")
def test_an_output_where_nobody_may_write_is_refused_before_loading(tmp_path):
    """sysfs refuses new entries even to root, so this runs as any user."""
    with pytest.raises(ExportError, match=r"cannot write in /sys \(.+\); choose an OUTPUT"):
        export_bundle(_no_model(tmp_path), "/sys/acd-bundle", log=_quiet)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only (0o555) directory; "
                                               "the /sys test covers unwritable parents as root")
def test_an_output_in_a_read_only_directory_is_refused_before_loading(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(ExportError, match="cannot write in .*locked"):
            export_bundle(_no_model(tmp_path), locked / "sub" / "bundle", log=_quiet)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# -- bad checkpoints: a clear ExportError (exit code 2), never a traceback ---------------------------


def _copy_checkpoint(source, target, *, drop=(), truncate=None):
    target.mkdir()
    for f in source.iterdir():
        if f.name not in drop:
            shutil.copy(f, target / f.name)
    if truncate:
        name, size = truncate
        if isinstance(size, float):  # a share of the file: tiny checkpoints are small
            size = int((target / name).stat().st_size * size)
        with open(target / name, "r+b") as f:
            f.truncate(size)
    return target


CHECKPOINT_CASES = {
    "config but no weights": (dict(drop=("model.safetensors",)), "has a config.json but no weights"),
    "truncated safetensors header": (dict(truncate=("model.safetensors", 1000)),
                                     "cannot read the weights of .*truncated or corrupt"),
    "truncated safetensors data": (dict(truncate=("model.safetensors", 0.5)),
                                   "cannot read the weights of .*truncated or corrupt"),
    "no config.json": (dict(drop=("config.json",)), "cannot read a model config from .*no config.json"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
@pytest.mark.parametrize("projection", [None, "SHARED_PROJECTION_DIRECT"])  # detected, or given: another reader
def test_a_broken_checkpoint_is_an_export_error_with_exit_code_2(tiny_checkpoint, tmp_path, capsys, case,
                                                                   projection):
    from autocontrast.cli_support import run_cli

    change, message = CHECKPOINT_CASES[case]
    broken = _copy_checkpoint(tiny_checkpoint("llama", DIRECT), tmp_path / "model", **change)
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(broken), str(out / "bundle")] + (["--projection", projection] if projection else [])
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    _nothing_left(out)


def test_a_truncated_pytorch_bin_is_an_export_error(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    source = tiny_checkpoint("llama", DIRECT)
    broken = _copy_checkpoint(source, tmp_path / "model", drop=("model.safetensors",))
    torch.save(load_file(str(source / "model.safetensors")), broken / "pytorch_model.bin")
    with open(broken / "pytorch_model.bin", "r+b") as f:
        f.truncate((broken / "pytorch_model.bin").stat().st_size // 2)
    for options in (ExportOptions(), ExportOptions(projection="SHARED_PROJECTION_DIRECT")):
        with pytest.raises(ExportError, match="cannot read the weights of .*truncated or corrupt"):
            export_bundle(broken, tmp_path / "bundle", options=options, log=_quiet)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("name", ["emptymodel", "gpt2-copy", "llama"])
def test_the_model_type_comes_from_config_json_never_from_the_folder_name(tmp_path, name):
    empty = tmp_path / name  # transformers would guess 'mpt', 'gpt2', 'llama' from these names
    empty.mkdir()
    with pytest.raises(ExportError, match=rf"cannot read a model config from '.*{name}': it has no config.json"):
        export_bundle(empty, tmp_path / "bundle", log=_quiet)
    (empty / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ExportError, match="its config.json has no model_type"):
        export_bundle(empty, tmp_path / "bundle", log=_quiet)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_mixed_step_graph_is_refused_where_it_cannot_be_built(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match="--mixed-step needs a decoder-only model whose decode graphs write a KV"):
        export_bundle(tiny_checkpoint("gpt2", DIRECT), tmp_path / "bundle", options=ExportOptions(mixed_step=True),
                      log=_quiet)  # GPT-2's decode graphs concatenate their cache
    _nothing_left(tmp_path)
    with pytest.raises(ExportError, match="--tensorrt"):
        ExportOptions(mixed_step=True, tensorrt=True)
    with pytest.raises(ExportError, match="--mixed-step needs"):  # the CLI flag, a concatenated cache asked for
        main([str(tiny_checkpoint("llama", DIRECT)), str(tmp_path / "b"), "--mixed-step", "--kv-layout", "concat"])


def test_a_llama_bundle_with_a_mixed_step_graph_names_the_graph_it_serves(llama_bundle):
    from autocontrast.bundle import DECODE_EXITS, FORMAT_VERSION, MIXED, mixed_graph, read_manifest

    manifest = read_manifest(llama_bundle)
    mixed = manifest.graph(mixed_graph(DECODE_EXITS))
    assert mixed.kind == MIXED and mixed.mixes == DECODE_EXITS and manifest.format_version == FORMAT_VERSION
    assert mixed.exits == manifest.graph(DECODE_EXITS).exits  # the same outputs, one pass for both parts
    assert manifest.validation["graphs"][mixed.name]["exit_logits"] < 1e-3  # checked against PyTorch at export
