"""The systems a user would otherwise pick: PyTorch `generate()` (plain, and the original library's
multi-exit ACD path) and optimum's `ORTModelForCausalLM`. Each is optional: without torch,
transformers or optimum, it reports why it is skipped. Imported only inside worker processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bench.stats import RunTiming, token_rows
from autocontrast.config import DEFAULT_ALPHA


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch, max_len) ids and attention mask, left-padded."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class _HFGenerateTimer:
    """Times every step of an HF `generate()` call through a stopping criterion (called once per token)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ends: list[float] = []

    def criterion(self) -> Any:
        import torch
        from transformers import StoppingCriteria

        timer = self

        class _Stamp(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                timer.ends.append(time.perf_counter() - timer.start)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return _Stamp()


def run_hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> RunTiming:
    import torch
    from transformers import StoppingCriteriaList

    ids, mask = left_pad(prompts, pad_id)
    timer = _HFGenerateTimer()
    criteria = StoppingCriteriaList([timer.criterion()])
    with torch.inference_mode():
        timer.start = time.perf_counter()
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_id, stopping_criteria=criteria)
    sequences = out.sequences if hasattr(out, "sequences") else out  # (batch, width + new_tokens)
    return RunTiming(step_ends=tuple(timer.ends), batch=len(prompts), tokens=token_rows(sequences[:, ids.shape[1]:]))


class TorchSystem:
    """HF `generate()` on the PyTorch model: plain (`acd=False`) or the multi-exit ACD path."""

    def __init__(self, model_dir: str, *, contrast: tuple[Any, int] | None = None,
                 alpha: float = DEFAULT_ALPHA, threads: int | None = None) -> None:
        self.model_dir, self.contrast, self.alpha, self.threads = model_dir, contrast, alpha, threads
        self.model: Any = None
        self.pad_id = 0

    def skip_reason(self) -> str | None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            return f"PyTorch peer needs torch and transformers ({err.name} is not installed)"
        if not Path(self.model_dir, "config.json").is_file():
            return f"no PyTorch model folder at {self.model_dir}"
        return None

    def load(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.contrast is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        else:
            from autocontrast.config import ORIGINAL, configuration_for_mode
            from autocontrast.models.auto import AutoMultiExitModel

            exits = tuple(e for e in self.contrast if e != ORIGINAL)
            mec = configuration_for_mode("contrast", self.contrast, alpha=self.alpha, lm_head_layer_indices=exits,
                                         vocab_projection_mode="SHARED_PROJECTION_DIRECT")
            self.model = AutoMultiExitModel.from_pretrained(self.model_dir, mec)
        self.pad_id = int(self.model.generation_config.pad_token_id or self.model.config.eos_token_id or 0)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        return run_hf_generate(self.model, prompts, new_tokens, self.pad_id)


class OptimumSystem:
    """optimum's ORTModelForCausalLM, plain greedy (IO binding on GPU), exported once and cached."""

    def __init__(self, model_dir: str, *, cache_dir: str, provider: str = "CPUExecutionProvider",
                 threads: int | None = None) -> None:
        self.model_dir, self.cache_dir, self.provider, self.threads = model_dir, cache_dir, provider, threads
        self.model: Any = None
        self.pad_id = 0

    def skip_reason(self) -> str | None:
        try:
            import optimum.onnxruntime  # noqa: F401
        except ImportError as err:
            return f"optimum peer needs optimum-onnx ({err.name} is not installed)"
        if not Path(self.model_dir, "config.json").is_file():
            return f"no PyTorch model folder at {self.model_dir} to export with optimum"
        return None

    def load(self) -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        target = Path(self.cache_dir)
        use_io_binding = self.provider == "CUDAExecutionProvider"
        if not (target / "model.onnx").is_file():
            model = ORTModelForCausalLM.from_pretrained(self.model_dir, export=True)
            model.save_pretrained(target)
        self.model = ORTModelForCausalLM.from_pretrained(target, provider=self.provider, use_io_binding=use_io_binding,
                                                         session_options=options)
        self.pad_id = int(self.model.config.pad_token_id or self.model.config.eos_token_id or 0)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> RunTiming:
        return run_hf_generate(self.model, prompts, new_tokens, self.pad_id)
