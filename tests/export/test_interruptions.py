"""An interrupted export leaves nothing behind: signals unwind it, and what SIGKILL left the next export removes.

The exports run in a subprocess (`python -m autocontrast.export.cli`, this checkout first on the
path) and are signalled once their temporary directory exists, i.e. mid-export.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autocontrast.config import VocabularyProjectionMode
from autocontrast.export import ExportOptions, export_bundle
from autocontrast.export.output import remove_stale_work

DIRECT = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
REPO = Path(__file__).resolve().parents[2]


def _default_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # not inherited as ignored (nohup, CI runners)
        signal.signal(s, signal.SIG_DFL)


def _start_export(checkpoint: Path, output: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "autocontrast.export.cli", str(checkpoint), str(output),
                             "--exits", "2,1", "--fuse-contrast", "2,1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def _partials(parent: Path, name: str = "bundle") -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


def _wait_for_partial(proc: subprocess.Popen, parent: Path, timeout: float = 240.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _partials(parent)
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the export ended before it could be interrupted:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the export never made its temporary directory")


@pytest.mark.parametrize("signum, returncode", [
    (signal.SIGINT, 130),                   # Ctrl-C: KeyboardInterrupt, acd-export exits 130
    (signal.SIGTERM, -signal.SIGTERM),      # timeout, docker stop, systemd: ends killed by SIGTERM
    (signal.SIGHUP, -signal.SIGHUP),        # a closed terminal or ssh session
], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signalled_export_removes_its_partial_directory(tiny_checkpoint, tmp_path, signum, returncode):
    proc = _start_export(tiny_checkpoint("llama", DIRECT), tmp_path / "bundle")
    _wait_for_partial(proc, tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == returncode, err
    assert f"interrupted ({signal.Signals(signum).name}): removed the unfinished export" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no bundle, no .partial-*


def test_what_a_killed_export_left_is_removed_by_the_next_export_and_said_once(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("llama", DIRECT)
    proc = _start_export(checkpoint, tmp_path / "bundle")
    partial = _wait_for_partial(proc, tmp_path)
    said: list[str] = []
    remove_stale_work(tmp_path / "bundle", log=said.append)
    assert partial.is_dir() and said == []  # its process still runs: not stale
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    assert partial.is_dir()

    export_bundle(checkpoint, tmp_path / "bundle", options=ExportOptions(exits=(2,), score_graph=False),
                  log=said.append)
    stale = [line for line in said if "interrupted export" in line]
    assert len(stale) == 1 and stale[0].startswith(f"removed {partial}:") and f"process {proc.pid}" in stale[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_partials_of_other_outputs_and_other_hosts_are_left_alone(tmp_path):
    other_host = tmp_path / ".bundle.partial-some-other-host-1-abcdefgh"
    other_output = tmp_path / ".bundle2.partial-host-999999999-abcdefgh"
    unowned = tmp_path / ".bundle.partial-k3x_9a0q"  # an older acd-export's: no host or process recorded
    not_ours = tmp_path / ".bundle.partial-by-hand"
    for directory in (other_host, other_output, unowned, not_ours):
        directory.mkdir()
    said: list[str] = []
    remove_stale_work(tmp_path / "bundle", log=said.append)
    assert all(d.is_dir() for d in (other_host, other_output, unowned, not_ours))
    assert said == [f"left {unowned} alone: an older acd-export made it and did not record its process "
                    "(remove it yourself if no export to this output is running)",
                    f"left {other_host} alone: an export on host some-other-host made it "
                    "(remove it yourself if it is stale)"]


def test_a_signal_during_the_rename_into_place_waits_for_it(tmp_path):
    """Held: the signal arrives mid-step, the step finishes, then the cleanup runs and the process ends."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from autocontrast.export.output import TerminationGuard
        root = Path({str(tmp_path)!r})
        with TerminationGuard(lambda signum: print("cleanup", signal.Signals(signum).name, flush=True)) as guard:
            with guard.hold():
                os.kill(os.getpid(), signal.SIGTERM)
                (root / "work").mkdir()
                (root / "work").rename(root / "bundle")
                print("renamed", flush=True)
            print("not reached", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
                          preexec_fn=_default_signals)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["renamed", "cleanup SIGTERM"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
