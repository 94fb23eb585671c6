"""The CUDA provider for real: greedy tokens equal PyTorch's, batches equal one-by-one, and the KV
cache stays on the device between steps. Skipped, saying why, where there is no onnxruntime-gpu
or no GPU (run them with `pytest -m gpu`; scripts/gpu_check.sh does on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from tests.runtime.conftest import CONTRAST
from tests.runtime.test_tiny_parity import NEW_TOKENS, PROMPTS, _torch_tokens


def cuda_missing() -> str | None:
    """Why the CUDA provider cannot run here, or None where it can."""
    from autocontrast.errors import ProviderUnavailableError
    from autocontrast.export.tensorrt import cuda_device_count
    from autocontrast.runtime.providers import resolve_providers

    try:
        resolve_providers("cuda")
    except ProviderUnavailableError as err:
        return str(err)
    if cuda_device_count() == 0:
        return "onnxruntime-gpu is installed but the driver reports no CUDA GPU"
    return None


MISSING = cuda_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=f"needs CUDA: {MISSING}")]

FIELDS = {
    "original": dict(),
    "exit": dict(use_original_head=False, output_layer_index=2),
    "contrast": dict(use_original_head=False, contrast_layer_indices=CONTRAST),
}
MODES = {name: MultiExitConfiguration(**fields) for name, fields in FIELDS.items()}
PROJECTION = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT


@pytest.fixture(scope="module")
def cuda_generator(tiny_bundle):
    """float32 on CUDA: the concatenated cache (GroupQueryAttention's CUDA kernels are float16)."""
    from autocontrast.runtime import Generator

    return Generator(tiny_bundle("llama", PROJECTION.name, fuse_contrast=CONTRAST, kv_layout="concat"), provider="cuda")


def test_cuda_session_runs_on_the_cuda_provider(cuda_generator):
    session = cuda_generator.session(cuda_generator.mode(MODES["original"]).graph)
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_greedy_tokens_equal_pytorch(cuda_generator, tiny_checkpoint, mode):
    checkpoint = tiny_checkpoint("llama", PROJECTION)
    for prompt in PROMPTS:
        ids = cuda_generator.encode(prompt)
        want = _torch_tokens(checkpoint, PROJECTION, FIELDS[mode], ids)
        for fused in ((True, False) if mode == "contrast" else (True,)):
            got = cuda_generator.generate(ids, multi_exit=MODES[mode], max_new_tokens=NEW_TOKENS,
                                          fused_contrast=fused).token_ids[0]
            assert got == want, f"{mode} fused={fused} {prompt!r}"


def test_cuda_batch_equals_one_by_one(cuda_generator):
    config = MODES["contrast"]
    batch = cuda_generator.generate(list(PROMPTS), multi_exit=config, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, got in zip(PROMPTS, batch.token_ids, strict=True):
        alone = cuda_generator.generate(prompt, multi_exit=config, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert got == alone.token_ids[0]


def _cache_devices(state) -> set[str]:
    return state.cache.devices()


def test_kv_cache_stays_on_the_device_between_steps(cuda_generator):
    generator = cuda_generator
    state = generator.decode_state(generator.mode(MODES["contrast"]).graph)
    out = state.extend([generator.encode(p) for p in PROMPTS])
    for _ in range(3):
        out = state.advance(out.exit_logits[:, 0].argmax(-1))  # (batch,)
        # The cache holds ORT's own present outputs on the GPU, never NumPy copies on the host.
        assert _cache_devices(state) == {"cuda"}
    assert isinstance(out.exit_logits, np.ndarray)  # only the logits come back to the host


def test_kv_cache_is_back_on_the_device_one_step_after_a_row_leaves(cuda_generator):
    generator = cuda_generator
    state = generator.decode_state(generator.mode(MODES["original"]).graph)
    out = state.extend([generator.encode(p) for p in PROMPTS])
    state.keep([1])  # a row leaves: the cache is cut on the host (one copy) ...
    state.advance(out.exit_logits[1:, 0].argmax(-1))
    assert _cache_devices(state) == {"cuda"}  # ... and the next step's cache is on the device again


def test_share_weights_leaves_cuda_sessions_on_their_device_copies(llama_bundle, cuda_generator):
    from autocontrast.runtime import Generator

    shared = Generator(llama_bundle, provider="cuda", share_weights=True)
    session = shared.session(shared.mode(MODES["original"]).graph)
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"
    assert session.session.shared_initializers is None  # device memory: nothing to map
    for mode in MODES.values():
        want = cuda_generator.generate(PROMPTS, multi_exit=mode, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert shared.generate(PROMPTS, multi_exit=mode, max_new_tokens=NEW_TOKENS,
                               ignore_eos=True).token_ids == want.token_ids
