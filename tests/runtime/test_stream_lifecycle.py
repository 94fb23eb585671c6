"""Streams run in the caller's thread: leaving one stops all computation, and a process (or the CLI)
may end mid-stream cleanly. The real SmolLM2 bundle makes generation long enough (~20 ms a token)
that computation going on after the consumer left would show."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The history of Paris"
LONG = 200  # tokens: ~4 s of work that must not happen once the consumer is gone


def _cli(bundle, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autocontrast.runtime.cli", str(bundle), "--prompt", PROMPT, "--mode", "original",
            "--max-new-tokens", str(LONG), "--ignore-eos", *extra]


def test_an_abandoned_stream_uses_no_cpu_and_leaves_no_thread(smollm2_bundle):
    from autocontrast.runtime import Generator

    generator = Generator(smollm2_bundle, threads=2)
    threads = threading.active_count()
    stream = generator.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
    assert next(stream)  # the first piece of text
    stream.close()
    time.sleep(0.2)  # let onnxruntime's pool stop spinning
    start = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - start < 0.05
    assert threading.active_count() == threads


def test_breaking_out_of_a_stream_stops_it(smollm2_bundle):
    from autocontrast.runtime import Generator

    generator = Generator(smollm2_bundle, threads=2)
    start = time.perf_counter()
    for _ in generator.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True):
        break
    left = time.perf_counter() - start
    whole_start = time.perf_counter()
    generator.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    twenty = time.perf_counter() - whole_start
    assert left < twenty  # one token's work, not LONG tokens'


def test_a_script_ending_mid_stream_exits_zero(smollm2_bundle):
    script = textwrap.dedent(f"""
        from autocontrast.runtime import Generator
        stream = Generator({str(smollm2_bundle)!r}).stream({PROMPT!r}, max_new_tokens={LONG}, ignore_eos=True)
        print(repr(next(stream)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr and proc.stdout.strip()


def test_ctrl_c_in_acd_generate_exits_130_with_one_line(smollm2_bundle):
    proc = subprocess.Popen(_cli(smollm2_bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # streaming has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode().strip() == "interrupted"


def test_a_closed_pipe_ends_acd_generate_quietly(smollm2_bundle):
    proc = subprocess.Popen(_cli(smollm2_bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(3)) == 3  # `| head -c 3`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 141
    assert err.decode() == ""


def test_acd_generate_streams_to_the_end_normally(smollm2_bundle):
    proc = subprocess.run(_cli(smollm2_bundle)[:-3] + ["--max-new-tokens", "8"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
