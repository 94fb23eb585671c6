"""Reference tokens from the PyTorch multi-exit model (HF `generate`, greedy): what the runtime must match."""

from __future__ import annotations

from pathlib import Path

import torch

from autocontrast.config import MultiExitConfiguration
from autocontrast.models.auto import AutoMultiExitModel


def torch_greedy(model_dir: Path, config: MultiExitConfiguration, prompt: list[int], new_tokens: int, *,
                 projection: str, exits: tuple | None = None) -> list[int]:
    """Greedy tokens of the PyTorch multi-exit model, end-of-sequence ignored (not suppressed: no
    min_new_tokens, whose processor would forbid the EOS token the runtime may legitimately pick)."""
    mec = config.replace(vocab_projection_mode=projection, lm_head_layer_indices=exits)
    model = AutoMultiExitModel.from_pretrained(model_dir, mec)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
