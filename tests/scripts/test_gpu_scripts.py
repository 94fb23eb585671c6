"""scripts/gpu_prepare.sh and scripts/gpu_check.sh up to where a GPU is needed: parts under the size
limit, checksums that are the real SHA-256, reassembly byte for byte, and refusal of a corrupt,
missing or foreign part, naming it. Also the summary of a partial run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREPARE, CHECK = ROOT / "scripts" / "gpu_prepare.sh", ROOT / "scripts" / "gpu_check.sh"
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash and coreutils (sha256sum, split)")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture()
def packed(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A payload of two 'wheels' and a text, packed into 1 MiB parts; returns (dir, files by relative path)."""
    rng = __import__("random").Random(0)
    files = {"wheels/a-1.0-py3-none-any.whl": rng.randbytes(int(1.6 * MIB)),
             "wheels/b-2.0-py3-none-any.whl": rng.randbytes(700_000),
             "text/test.txt": b"some real text\n" * 1000}
    source = tmp_path / "prepared"
    for rel, data in files.items():
        (source / "payload" / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / "payload" / rel).write_bytes(data)
    proc = _run(str(PREPARE), "--pack-only", str(source), env={"ACD_PART_MIB": "1"})
    assert proc.returncode == 0, proc.stderr
    return source, files


def _machine(source: Path, tmp_path: Path) -> Path:
    """What the GPU machine holds after the calls: the parts and SHA256SUMS only."""
    target = tmp_path / "gpu-machine"
    target.mkdir()
    for path in source.iterdir():
        if path.name == "SHA256SUMS" or path.name.startswith("payload.tar.part-"):
            shutil.copy(path, target / path.name)
    return target


def test_parts_are_under_the_limit_and_their_checksums_are_sha256(packed):
    source, files = packed
    parts = sorted(source.glob("payload.tar.part-*"))
    assert len(parts) >= 3 and all(p.stat().st_size <= MIB for p in parts)
    sums = dict(reversed(line.split()) for line in (source / "SHA256SUMS").read_text().splitlines())
    for part in parts:
        assert sums[part.name] == hashlib.sha256(part.read_bytes()).hexdigest()
    whole = b"".join(p.read_bytes() for p in parts)
    assert sums["payload.tar"] == hashlib.sha256(whole).hexdigest()
    assert not (source / "payload.tar").exists()  # only the parts travel


def test_parts_reassemble_to_the_payload_byte_for_byte(packed, tmp_path):
    source, files = packed
    machine = _machine(source, tmp_path)
    proc = _run(str(CHECK), "--dry-run", str(machine), env={"ACD_GPU_OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel, data in files.items():
        assert (machine / "payload" / rel).read_bytes() == data, rel
    again = _run(str(CHECK), "--dry-run", str(machine), env={"ACD_GPU_OUT": str(tmp_path / "out")})
    assert again.returncode == 0 and "already unpacked" in again.stdout


def test_a_corrupt_part_is_refused_by_name(packed, tmp_path):
    source, _ = packed
    machine = _machine(source, tmp_path)
    part = machine / "payload.tar.part-01"
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = _run(str(CHECK), "--dry-run", str(machine), env={"ACD_GPU_OUT": str(tmp_path / "out")})
    assert proc.returncode == 4
    assert "CORRUPT payload.tar.part-01" in proc.stdout and "carry" in proc.stdout
    assert not (machine / "payload").exists()


def test_a_missing_part_is_named_and_status_says_what_to_carry(packed, tmp_path):
    source, _ = packed
    machine = _machine(source, tmp_path)
    (machine / "payload.tar.part-02").unlink()
    proc = _run(str(CHECK), "--status", str(machine), env={"ACD_GPU_OUT": str(tmp_path / "out")})
    assert proc.returncode == 3
    assert "MISSING payload.tar.part-02" in proc.stdout and "ok      payload.tar.part-00" in proc.stdout


def test_parts_that_do_not_make_the_checksummed_whole_are_refused(packed, tmp_path):
    source, _ = packed
    machine = _machine(source, tmp_path)
    sums = machine / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    lines[0] = "0" * 64 + "  payload.tar"  # every part matches its own line, the whole does not
    sums.write_text("\n".join(lines) + "\n")
    proc = _run(str(CHECK), "--dry-run", str(machine), env={"ACD_GPU_OUT": str(tmp_path / "out")})
    assert proc.returncode == 4 and "REFUSED" in proc.stdout
    assert not (machine / "payload").exists() and not (machine / "payload.tar").exists()


def test_summary_of_a_partial_run_lists_steps_and_tables(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "steps.tsv").write_text("step\tstatus\texit\tnote\nparts\tok\t0\t3 s\nexport-fp32\ttimeout\t124\t300 s\n")
    bench = {"command": "acd-bench ...", "repeats": 3, "warmup": 1, "machine": {"gpus": [{"name": "NVIDIA H200"}]},
             "scenarios": [{"name": "p16-n64-b1", "prompt_tokens": 16, "new_tokens": 64, "batch": 1, "systems": {
                 "ours-original": {"figures": {"tpot_ms": 9.876, "ttft_ms": 20.4}},
                 "ours-original-fp32-cuda": {"skipped": "failed to load: no GPU"}}}]}
    (results / "bench-cpu-cuda.json").write_text(json.dumps(bench))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(results)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (results / "summary.md").read_text()
    assert "| export-fp32 | timeout | 124 | 300 s |" in text
    assert "| ours-original | 9.88 (20) |" in text and "skipped: failed to load: no GPU" in text
    assert "NVIDIA H200" in text and "pytest did not run" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shell_scripts_are_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(PREPARE), str(CHECK)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
