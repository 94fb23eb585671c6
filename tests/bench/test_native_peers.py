"""The optional native peers of acd-bench, onnxruntime-genai and llama.cpp: a missing package is a
skip with its reason and the bench goes on; a bad --genai-model / --gguf is a clear error (exit 2)
before anything loads; where a package is installed, it runs the real SmolLM2 greedily and its
first tokens match PyTorch's greedy ones. (No speed is asserted.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autocontrast.bench.cli import main
from autocontrast.bench.genai_peer import GENAI_CONFIG, GenaiSystem
from autocontrast.bench.llamacpp_peer import LlamaCppSystem
from autocontrast.bench.report import leading_agreement
from autocontrast.cli_support import run_cli

HIDDEN = ("onnxruntime_genai", "llama_cpp")


@pytest.fixture
def peers_hidden(tmp_path, monkeypatch):
    """A sys.path entry, first in this process and in spawned workers, where importing either peer's
    package fails as it does where the package is not installed."""
    shadow = tmp_path / "shadow"
    for name in HIDDEN:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    monkeypatch.syspath_prepend(str(shadow))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    return shadow


def test_genai_without_its_package_says_how_to_install_it(peers_hidden):
    reason = GenaiSystem("some-folder", threads=1).skip_reason()
    assert "pip install onnxruntime-genai" in reason and "onnxruntime_genai is not installed" in reason


def test_llamacpp_without_its_package_says_how_to_install_it(peers_hidden):
    reason = LlamaCppSystem("model.gguf", threads=1).skip_reason()
    assert "llama-cpp-python" in reason and "llama_cpp is not installed" in reason


def test_bench_goes_on_when_the_peers_are_not_installed(peers_hidden, tiny_bundle, tmp_path, capsys):
    bundle = tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1))
    gguf = _gguf_file(tmp_path / "model.F16.gguf")
    genai = _genai_folder(tmp_path / "genai-int4")
    code = main(["--bundle", str(bundle), "--systems", "ours-original,genai-greedy,llamacpp-greedy",
                 "--genai-model", f"int4={genai}", "--gguf", str(gguf), "--scenarios", "8x4x1",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    assert "skipped: onnxruntime-genai peer needs" in err and "skipped: llama.cpp peer needs" in err
    systems = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"][0]["systems"]
    assert "llama_cpp is not installed" in systems["llamacpp-greedy-f16"]["skipped"]
    assert "onnxruntime_genai is not installed" in systems["genai-greedy-int4"]["skipped"]
    assert systems["ours-original"]["figures"]["agree_tokens"] == 4  # the reference agrees with itself


def test_genai_without_a_folder_is_skipped_saying_which_option_gives_one():
    pytest.importorskip("onnxruntime_genai", reason="without the package the reason is the missing package")
    assert "--genai-model DIR" in GenaiSystem("", threads=1).skip_reason()


def test_peers_are_one_system_per_model_file_named_by_label(tmp_path, capsys):
    genai = [_genai_folder(tmp_path / name) for name in ("fp32", "int4")]
    gguf = _gguf_file(tmp_path / "smollm2.F32.gguf")
    code = main(["--bundle", str(tmp_path), "--systems", "genai-greedy,llamacpp-greedy", "--list-systems",
                 "--genai-model", str(genai[0]), "--genai-model", f"q4={genai[1]}", "--gguf", str(gguf),
                 "--threads", "3"])
    assert code == 0
    lines = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()]
    assert [(name, kind) for name, kind, _ in lines] == [
        ("genai-greedy-fp32", "genai"), ("genai-greedy-q4", "genai"), ("llamacpp-greedy-f32", "llamacpp")]
    assert all("'threads': 3" in params for _, _, params in lines)


@pytest.mark.parametrize(("option", "make", "message"), [
    ("--genai-model", lambda tmp: tmp / "no-such-folder", "no genai_config.json there"),
    ("--genai-model", lambda tmp: tmp, "no genai_config.json there"),
    ("--gguf", lambda tmp: tmp / "missing.gguf", "no such file"),
    ("--gguf", lambda tmp: _file(tmp / "model.gguf", b"not a gguf"), "not a GGUF file"),
])
def test_a_bad_model_path_exits_2_before_anything_loads(tmp_path, capsys, option, make, message):
    path = make(tmp_path)
    code = run_cli(main, ["--bundle", str(tmp_path), "--systems", "ours-original,genai-greedy,llamacpp-greedy",
                          option, str(path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {path}: {message}") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--genai-model", "a={fp32}", "--genai-model", "a={int4}"],
    ["--genai-model", "x="],
    ["--threads", "0"],
])
def test_bad_peer_options_exit_2_with_a_message(tmp_path, capsys, argv):
    folders = {name: _genai_folder(tmp_path / name) for name in ("fp32", "int4")}
    argv = [arg.format(**folders) for arg in argv]
    code = run_cli(main, ["--bundle", str(tmp_path), "--list-systems", *argv])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_llamacpp_refuses_a_batch_it_cannot_decode_together():
    from autocontrast.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="one sequence at a time; batch 2"):
        LlamaCppSystem("model.gguf", threads=1).generate([[1, 2], [3, 4]], 4)


def test_leading_agreement_is_the_least_shared_prefix_over_rows():
    reference = [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert leading_agreement([[5, 6, 7, 8], [1, 2, 3, 4]], reference) == 4
    assert leading_agreement([[5, 6, 0, 8], [1, 2, 3, 4]], reference) == 2  # position 3 on only matches by chance
    assert leading_agreement([[5, 6, 7, 8], [9, 2, 3, 4]], reference) == 0
    assert leading_agreement([[5, 6, 7, 8]], reference) is None  # another batch: nothing to compare
    assert leading_agreement([[5, 6]], []) is None


# --- on the real SmolLM2, where the packages are installed -------------------------------------------------

PROMPT_CHARS = 400
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def real_prompt_and_reference(smollm2_path):
    """A 16-token WikiText-2 prompt and PyTorch's fp32 greedy continuation of it (end-of-sequence ignored)."""
    from tokenizers import Tokenizer

    from autocontrast.config import MultiExitConfiguration
    from tests.conftest import WIKITEXT_VALID
    from tests.runtime.torch_reference import torch_greedy

    text = WIKITEXT_VALID.read_text(encoding="utf-8")[:PROMPT_CHARS]
    prompt = Tokenizer.from_file(str(smollm2_path / "tokenizer.json")).encode(text, add_special_tokens=False).ids[:16]
    reference = torch_greedy(smollm2_path, MultiExitConfiguration(), prompt, NEW_TOKENS,
                             projection="SHARED_PROJECTION_DIRECT")
    return prompt, reference


def genai_fp32_folder() -> Path:
    """Where docs/peers.md's build command puts the fp32 genai folder (or $AUTOCONTRAST_GENAI_FP32)."""
    from autocontrast.models.smollm2 import MODEL_DIR_NAME, cache_dir

    return Path(os.environ.get("AUTOCONTRAST_GENAI_FP32") or cache_dir() / "genai" / f"{MODEL_DIR_NAME}-fp32")


@pytest.fixture
def genai_fp32():
    """The fp32 genai folder, or a skip saying what is missing (asked before the PyTorch reference is computed)."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (an optional peer)")
    folder = genai_fp32_folder()
    if not (folder / GENAI_CONFIG).is_file():
        pytest.skip(f"no onnxruntime-genai fp32 folder at {folder} (docs/peers.md builds one)")
    return folder


@pytest.fixture
def llama_cpp_installed():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (an optional peer)")


@pytest.mark.slow
def test_genai_fp32_greedy_matches_pytorch_on_smollm2(genai_fp32, real_prompt_and_reference):
    prompt, reference = real_prompt_and_reference
    system = GenaiSystem(str(genai_fp32), threads=2)
    system.load()
    timing = system.generate([prompt], NEW_TOKENS)
    assert timing.tokens == (tuple(reference),)
    assert len(timing.step_ends) == NEW_TOKENS and all(d > 0 for d in timing.per_token)


@pytest.mark.slow
def test_llamacpp_greedy_on_the_shipped_gguf_matches_pytorch(llama_cpp_installed, real_prompt_and_reference):
    from autocontrast.models.smollm2 import gguf_path

    prompt, reference = real_prompt_and_reference
    system = LlamaCppSystem(str(gguf_path()), threads=2)
    system.load()
    # The PyTorch model is this GGUF's Q4_1 weights dequantized to fp32; llama.cpp also rounds activations
    # (q8) in its products, so the two may part late in a sequence, but not in its first 8 tokens.
    first, again = system.generate([prompt], NEW_TOKENS), system.generate([prompt], NEW_TOKENS)
    assert first.tokens[0][:8] == tuple(reference[:8])
    assert again.tokens == first.tokens  # the second run recomputes the prompt and gets the same tokens
    assert len(first.step_ends) == NEW_TOKENS and all(d > 0 for d in first.per_token)
    system.close()


def _genai_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / GENAI_CONFIG).write_text("{}")
    return path


def _gguf_file(path: Path) -> Path:
    return _file(path, b"GGUF" + bytes(28))


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
