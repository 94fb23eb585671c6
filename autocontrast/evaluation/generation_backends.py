"""Where evaluation gets tokens and log-probabilities from: a PyTorch model folder or an export bundle.

Both backends offer the same small interface, so `acd-quality` and the lm-eval adapters are written
once: `encode` / `decode` (no special tokens added), `log_probs` (every position's next-token
log-distribution under a `MultiExitConfiguration`) and `generate` (greedy, or nucleus sampling).
`TorchBackend` runs the multi-exit model's own forward (HF `generate` for generation);
`BundleBackend` the runtime (score graph + NumPy contrast for scoring, the runtime's decode loop
for generation) and never imports torch.

>>> backend = load_backend("path/to/bundle-or-model")  # doctest: +SKIP
>>> acd = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 15))
>>> backend.log_probs([backend.encode("Hello world")], acd)[0].shape  # doctest: +SKIP
(2, 49152)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.config import MultiExitConfiguration
from autocontrast.errors import DataError, PromptError


def _strip_after_eos(ids: Sequence[int], eos: frozenset[int]) -> list[int]:
    out = []
    for token in ids:
        if int(token) in eos:
            break
        out.append(int(token))
    return out


class TorchBackend:
    """A PyTorch multi-exit model folder; the configuration is swapped per call (the weights are shared)."""

    name = "pytorch"

    def __init__(self, path: str | Path, *, projection: str = "auto", model: Any = None, tokenizer: Any = None) -> None:
        from transformers import AutoTokenizer

        from autocontrast.evaluation.perplexity import load_torch_model

        self.path = Path(path)
        self.model = model if model is not None else load_torch_model(path, projection=projection)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
        self.base_config = self.model.multi_exit_config
        self.projection_mode = self.base_config.vocab_projection_mode.name
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or [self.tokenizer.eos_token_id]))
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(
            self.eos_token_ids)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", None)
                              or getattr(self.model.config, "n_positions", 2048))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def configure(self, config: MultiExitConfiguration) -> None:
        """Make `config` the model's generation mode (same projection mode and exits as loaded)."""
        config = config.replace(vocab_projection_mode=self.base_config.vocab_projection_mode,
                                lm_head_layer_indices=self.base_config.lm_head_layer_indices)
        config.validate_exits(num_layers=self.model.num_layers, available=self.model.available_exits)
        self.model.multi_exit_config = config

    def log_probs(self, rows: Sequence[Sequence[int]], config: MultiExitConfiguration) -> list[np.ndarray]:
        """[(len(row), vocab)] float64 log-probabilities of the token after each position."""
        import torch

        self.configure(config)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (batch, width), right-padded
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(list(row)), 1
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (batch, width, vocab)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
        return [log_probs[i, :len(row)].numpy() for i, row in enumerate(rows)]

    def generate(self, rows: Sequence[Sequence[int]], config: MultiExitConfiguration, *, max_new_tokens: int,
                 top_p: float | None = None, seed: int = 0, stop_strings: Sequence[str] = (),
                 repetition_penalty: float = 1.0) -> list[list[int]]:
        """Continuations (eos and later dropped), greedy unless `top_p` is given (then nucleus sampling, T=1);
        `repetition_penalty` as HF applies it."""
        import torch

        self.configure(config)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (batch, width), left-padded
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(list(row)), 1
        sampling = {"do_sample": True, "top_p": top_p, "top_k": 0, "temperature": 1.0} if top_p else {
            "do_sample": False, "top_p": None, "top_k": None, "temperature": None}
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.pad_token_id, eos_token_id=sorted(self.eos_token_ids),
                                      repetition_penalty=repetition_penalty, **sampling)
        return [_strip_after_eos(row[width:].tolist(), self.eos_token_ids) for row in out]


class BundleBackend:
    """An export bundle through the runtime (no torch): score graph for scoring, decode loop for generation."""

    name = "onnx-runtime"

    def __init__(self, path: str | Path, *, provider: str = "cpu", fused_contrast: bool = True) -> None:
        from autocontrast.runtime import Generator

        self.path = Path(path)
        self.generator = Generator(path, provider=provider)
        self.fused_contrast = fused_contrast
        self.eos_token_ids = frozenset(self.generator.manifest.eos_token_ids)
        self.max_length = int(self.generator.manifest.max_positions)
        self.projection_mode = self.generator.manifest.projection_mode

    def encode(self, text: str) -> list[int]:
        return list(self.generator.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.generator.decode(ids)

    def log_probs(self, rows: Sequence[Sequence[int]], config: MultiExitConfiguration) -> list[np.ndarray]:
        """[(len(row), vocab)] float64 log-probabilities: the runtime's NumPy contrast on score-graph logits."""
        from autocontrast.runtime.contrast import log_softmax
        from autocontrast.runtime.modes import mode_over_exits
        from autocontrast.runtime.session import StepOutput

        exits = config.required_exits
        mode = mode_over_exits(config, exits)
        result = []
        for logits in self.generator.exit_logits_all_positions([list(r) for r in rows], exits):
            scores = mode.scores(StepOutput(logits.astype(np.float64), None))  # (seq, vocab)
            result.append(log_softmax(np.asarray(scores, dtype=np.float64)))
        return result

    def generate(self, rows: Sequence[Sequence[int]], config: MultiExitConfiguration, *, max_new_tokens: int,
                 top_p: float | None = None, seed: int = 0, stop_strings: Sequence[str] = (),
                 repetition_penalty: float = 1.0) -> list[list[int]]:
        """Continuations (eos dropped), greedy unless `top_p` is given (then nucleus sampling, T=1);
        `repetition_penalty` as HF applies it (the runtime's is held equal to HF's)."""
        fields: dict[str, Any] = {"temperature": 1.0, "top_p": top_p, "seed": seed} if top_p else {}
        fields["repetition_penalty"] = repetition_penalty
        result = self.generator.generate([list(r) for r in rows], multi_exit=config, max_new_tokens=max_new_tokens,
                                         stop_strings=tuple(stop_strings), fused_contrast=self.fused_contrast,
                                         **fields)
        return [_strip_after_eos(ids, self.eos_token_ids) for ids in result.token_ids]


def load_backend(path: str | Path, *, projection: str = "auto", provider: str = "cpu") -> TorchBackend | BundleBackend:
    """A bundle (a folder with a manifest) or a PyTorch model folder (a folder with config.json)."""
    from autocontrast.evaluation.perplexity import is_bundle

    if not Path(path).is_dir():
        raise DataError(f"{path} is neither an export bundle nor a model folder")
    if is_bundle(path):
        return BundleBackend(path, provider=provider)
    return TorchBackend(path, projection=projection)


def check_length(rows: Sequence[Sequence[int]], max_length: int) -> None:
    longest = max(len(r) for r in rows)
    if longest > max_length:
        raise PromptError(f"a sequence of {longest} tokens exceeds the model's maximum positions ({max_length})")
