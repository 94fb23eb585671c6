"""The export cache shared by several processes (two checkouts, two test runs): a bundle handed to a
process is never pruned while that process lives, and another code's export goes only after a day unused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autocontrast.bundle import MANIFEST_FILE
from autocontrast.export import cache

DAY = cache.PRUNE_AFTER_S


@pytest.fixture
def exports(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_HELD", {})
    return tmp_path / "exports"


def _entry(exports, name, *, age_s):
    entry = exports / name
    entry.mkdir(parents=True)
    (entry / MANIFEST_FILE).write_text("{}")
    stamp = time.time() - age_s
    os.utime(entry, (stamp, stamp))
    return entry


def test_an_export_of_other_code_unused_for_a_day_is_pruned(exports):
    stale = _entry(exports, "model-aaaa-key1", age_s=2 * DAY)
    assert cache.prune("model", "bbbb") == [stale] and not stale.exists()


def test_an_export_of_other_code_used_within_the_day_is_kept(exports):
    recent = _entry(exports, "model-aaaa-key1", age_s=3600)
    assert cache.prune("model", "bbbb") == [] and recent.is_dir()


def test_this_codes_exports_and_other_models_are_never_pruned(exports):
    own = _entry(exports, "model-bbbb-key1", age_s=2 * DAY)
    other_model = _entry(exports, "model-x-aaaa-key1", age_s=2 * DAY)  # slug 'model-x', not 'model'
    assert cache.prune("model", "bbbb") == [] and own.is_dir() and other_model.is_dir()


def test_a_use_stamps_the_entry_so_an_old_bundle_in_use_today_is_kept(exports):
    entry = _entry(exports, "model-aaaa-key1", age_s=2 * DAY)
    cache.hold(entry)
    cache._HELD.clear()  # as if another process had used it: only the stamp protects it now
    assert time.time() - cache.last_used(entry) < 60
    assert cache.prune("model", "bbbb") == [] and entry.is_dir()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autocontrast.export import cache
    entry = Path(sys.argv[1])
    cache.hold(entry)
    import os
    os.utime(cache._lock_file(entry), (time.time() - 3 * cache.PRUNE_AFTER_S,) * 2)  # look a day stale
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
""")


def test_a_bundle_another_process_holds_is_never_pruned(exports):
    entry = _entry(exports, "model-aaaa-key1", age_s=3 * DAY)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        os.utime(entry, (time.time() - 3 * DAY,) * 2)
        assert cache.prune("model", "bbbb") == [] and (entry / MANIFEST_FILE).is_file()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert cache.prune("model", "bbbb") == [entry]  # released when its holder exited


TWO_CHECKOUTS = textwrap.dedent("""
    import sys
    from autocontrast.export import cache
    from autocontrast.export.exporter import ExportOptions
    cache.source_hash = lambda: sys.argv[2] * 64  # this 'checkout's code
    path = cache.cached_bundle(sys.argv[1], ExportOptions(projection="SHARED_PROJECTION_DIRECT"), identity="tiny-shared")
    print(path, flush=True)
    sys.stdin.read()
    from autocontrast.runtime import Generator
    print(Generator(path).generate([5, 6, 7], max_new_tokens=3).token_ids[0], flush=True)
""")


def _backdate(entry, days):
    stamp = time.time() - days * DAY
    for path in (entry, cache._lock_file(entry)):
        os.utime(path, (stamp, stamp))


def test_two_processes_of_different_code_sharing_one_cache_both_finish(exports, plain_llama):
    env = {**os.environ, "AUTOCONTRAST_CACHE": str(exports.parent), "PYTHONPATH": os.getcwd()}
    procs, paths = [], []
    try:
        for code in "ab":
            proc = subprocess.Popen([sys.executable, "-c", TWO_CHECKOUTS, str(plain_llama), code],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(proc)
            paths.append(Path(proc.stdout.readline().strip()))
            _backdate(paths[-1], 3)  # looks stale to the next process's prune: only the hold keeps it
        assert paths[0] != paths[1] and all((p / MANIFEST_FILE).is_file() for p in paths)
        outputs = []
        for proc in procs:
            proc.stdin.close()
            outputs.append(proc.stdout.read())
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            proc.kill()
    assert all(out.strip().startswith("[") for out in outputs) and len(set(outputs)) == 1
