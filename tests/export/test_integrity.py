"""The manifest records a SHA-256 for every file of the bundle; acd-verify and verify=True check them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autocontrast.bundle import MANIFEST_FILE, read_manifest
from autocontrast.errors import BundleError
from autocontrast.export.weights import WEIGHTS_FILE
from tests.runtime.test_torch_free import BLOCKER

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bundle(tiny_bundle, tmp_path):
    """A private copy of the tiny Llama bundle (the cached one must stay intact)."""
    return Path(shutil.copytree(tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1)),
                                tmp_path / "bundle"))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _acd_verify(*args: str) -> subprocess.CompletedProcess:
    """acd-verify as a user runs it, with torch, transformers and optimum unimportable."""
    script = BLOCKER + "import sys, runpy; sys.argv = ['acd-verify', *sys.argv[1:]]; " \
                       "runpy.run_module('autocontrast.verify', run_name='__main__')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_manifest_records_the_sha256_of_every_file_but_itself(bundle):
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    recorded = json.loads((bundle / MANIFEST_FILE).read_text())["files"]
    assert set(recorded) == on_disk and WEIGHTS_FILE in on_disk and "tokenizer.json" in on_disk
    for name, digest in recorded.items():
        assert digest == hashlib.sha256((bundle / name).read_bytes()).hexdigest(), name


def test_acd_verify_passes_an_intact_bundle_without_torch(bundle):
    proc = _acd_verify(str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: {bundle} (") and "SHA-256 match the manifest" in proc.stdout


@pytest.mark.parametrize("damaged", [WEIGHTS_FILE, "decode_exits.onnx", "tokenizer_config.json"])
def test_acd_verify_names_the_file_that_differs_and_exits_2(bundle, damaged):
    _flip_a_byte(bundle / damaged)
    proc = _acd_verify(str(bundle))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: bundle {str(bundle)!r} is damaged: {damaged} differs from the manifest")
    assert "Traceback" not in proc.stderr


def test_verify_names_a_recorded_file_that_is_missing(bundle):
    extra = bundle / "notes" / "export.log"  # any recorded file, also one the graphs do not name
    extra.parent.mkdir()
    extra.write_text("made by hand")
    from autocontrast.bundle import write_manifest

    write_manifest(bundle, read_manifest(bundle))  # re-record: now notes/export.log is part of the bundle
    extra.unlink()
    read_manifest(bundle)  # the graphs and tokenizer are all there
    with pytest.raises(BundleError, match="is damaged: notes/export.log is missing"):
        read_manifest(bundle, verify=True)


def test_opening_without_verify_does_not_hash(bundle):
    _flip_a_byte(bundle / WEIGHTS_FILE)
    assert read_manifest(bundle).files[WEIGHTS_FILE]  # opens: only verify=True reads the files
    with pytest.raises(BundleError, match=f"{WEIGHTS_FILE} differs from the manifest"):
        read_manifest(bundle, verify=True)


def test_files_added_after_the_export_are_not_checked(bundle):
    (bundle / "README.txt").write_text("a note beside the bundle's files")
    assert read_manifest(bundle, verify=True).files  # passes


def test_a_version_1_bundle_opens_but_cannot_be_verified(bundle):
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    del data["files"]
    data["format_version"] = 1
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))
    assert read_manifest(bundle).format_version == 1
    with pytest.raises(BundleError, match="records no file digests .*re-export it"):
        read_manifest(bundle, verify=True)
