"""Every bad input to the runtime raises its typed error with a message that says what was wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import (
    BundleError,
    GenerationParameterError,
    PromptError,
    ProviderUnavailableError,
    UnknownExitError,
)
from autocontrast.runtime import GenerationParams, Generator


def test_empty_prompt(llama_generator):
    with pytest.raises(PromptError, match="empty"):
        llama_generator.generate("   ")


def test_prompt_plus_new_tokens_beyond_maximum_positions(llama_generator):
    limit = llama_generator.manifest.max_positions
    with pytest.raises(PromptError, match=rf"exceeds the model's maximum positions \({limit}\)"):
        llama_generator.generate([5] * (limit - 4), max_new_tokens=8)


def test_token_id_outside_the_vocabulary(llama_generator):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        llama_generator.generate([5, 10**7])


def test_exit_outside_the_model(llama_generator):
    with pytest.raises(UnknownExitError, match=r"outside 0\.\.4"):
        llama_generator.generate("Hi", multi_exit=MultiExitConfiguration(use_original_head=False, output_layer_index=9))


def test_contrast_of_exits_the_bundle_lacks(tiny_bundle):
    # the bundle exports exits 1..4 (and original): exit 0, the embeddings, is not in it
    generator = Generator(tiny_bundle("llama", "SHARED_PROJECTION_DIRECT", fuse_contrast=(3, 1)))
    with pytest.raises(UnknownExitError, match="no decode graph returning exit"):
        generator.generate("Hi", multi_exit=MultiExitConfiguration(use_original_head=False,
                                                                   contrast_layer_indices=(3, 0)))


@pytest.mark.parametrize("fields,message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_generation_parameters_out_of_range(fields, message):
    with pytest.raises(GenerationParameterError, match=message):
        GenerationParams(**fields)


def test_unknown_generation_parameter(llama_generator):
    with pytest.raises(GenerationParameterError, match="unknown generation parameter"):
        llama_generator.generate("Hi", beams=3)


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Generator(tmp_path / "nothing")


def _copy(bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_corrupt_manifest(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        Generator(bundle)


def test_newer_format_version_is_refused_by_name(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99"):
        Generator(bundle)


def test_missing_graph_file(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    (bundle / "decode_original.onnx").unlink()
    with pytest.raises(BundleError, match="missing decode_original.onnx"):
        Generator(bundle)


def test_manifest_that_does_not_match_its_graph(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["kv_cache"]["num_layers"] = 5  # the graphs have 4 layers of cache
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="does not match graph"):
        Generator(bundle)


def test_corrupt_graph_file(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    (bundle / "decode_original.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="cannot load"):
        Generator(bundle)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_gpu_is_an_error_not_a_fallback(llama_bundle, provider):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the missing-provider error cannot happen")
    with pytest.raises(ProviderUnavailableError, match=provider):
        Generator(llama_bundle, provider=provider)


def test_cli_prints_the_message_without_a_traceback(llama_bundle):
    proc = subprocess.run([sys.executable, "-m", "autocontrast.runtime.cli", str(llama_bundle), "--prompt", "Hi",
                           "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: top_p (2.0) must be within (0, 1]"


def test_generator_verify_names_a_damaged_file(llama_bundle, tmp_path):
    bundle = _copy(llama_bundle, tmp_path)
    weights = bundle / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    Generator(bundle)  # opening does not hash: a changed weight still loads
    with pytest.raises(BundleError, match="is damaged: weights.bin differs from the manifest"):
        Generator(bundle, verify=True)
