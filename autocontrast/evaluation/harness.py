"""lm-eval-harness model adapters: `multi_exit_hf` (PyTorch multi-exit model) and `acd_onnx` (export bundle).

Importing this module registers both names with lm_eval's model registry. The multi-exit settings
come in `--model_args` as the original library's were given (lm-eval splits model_args on commas,
so a contrast is written with ';'):

    lm_eval --model multi_exit_hf --model_args pretrained=PATH,use_original_head=False,\
contrast_layer_indices='original;12',alpha=0.1 --tasks ...

Log-likelihoods are every position's log-distribution under the configured mode (original head,
one exit, or the contrast, whose scores are a normalised log-distribution), summed over the
continuation tokens; tokenization, context truncation and rolling windows follow lm-eval's HFLM.
Generation is greedy unless the task asks for sampling.

>>> import lm_eval
>>> import autocontrast.evaluation.harness  # registers the adapters
>>> lm_eval.simple_evaluate(model="acd_onnx", model_args="pretrained=bundle,use_original_head=False,"
...                         "output_layer_index=15", tasks=["wikitext_local"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, MultiExitConfiguration
from autocontrast.errors import ConfigurationError
from autocontrast.evaluation.generation_backends import BundleBackend, TorchBackend


def _config(*, use_original_head: Any = True, output_layer_index: Any = None, contrast_layer_indices: Any = None,
            alpha: Any = DEFAULT_ALPHA, minimum_candidates: Any = DEFAULT_MINIMUM_CANDIDATES,
            vocab_projection_mode: Any = None) -> MultiExitConfiguration:
    fields = dict(use_original_head=use_original_head, output_layer_index=output_layer_index,
                  contrast_layer_indices=None if contrast_layer_indices in (None, "") else str(contrast_layer_indices),
                  alpha=alpha, minimum_candidates=minimum_candidates)
    if vocab_projection_mode is not None:
        fields["vocab_projection_mode"] = vocab_projection_mode
    return MultiExitConfiguration(**fields)


class _MultiExitLM(TemplateLM):
    """Shared lm-eval logic over a backend with encode/decode/log_probs/generate."""

    def __init__(self, backend: Any, config: MultiExitConfiguration, *, batch_size: Any = 1,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.backend, self.config = backend, config
        self.batch_size = 1 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or backend.max_length)
        self._eot = min(backend.eos_token_ids)
        # fail now, by name, on an exit the model or bundle lacks
        backend.log_probs([[self._eot, self._eot]], config)

    # -- tokens --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.backend.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.backend.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        rows, spans = [], []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append(whole[:-1])  # the input; position i predicts whole[i + 1]
            spans.append(whole[-min(len(continuation), len(whole) - 1):])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths batch together
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            picked = order[start: start + self.batch_size]
            scored = self.backend.log_probs([rows[i] for i in picked], self.config)  # [(len, vocab)]
            for i, log_probs in zip(picked, scored, strict=True):
                targets = np.asarray(spans[i])
                tail = log_probs[-len(targets):]  # (n_continuation, vocab)
                total = float(np.sum(tail[np.arange(len(targets)), targets]))
                results[i] = (total, bool(np.all(tail.argmax(-1) == targets)))
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            if not disable_tqdm:
                print(f"\rscored {min(start + self.batch_size, len(order))}/{len(order)} requests", end="",
                      file=sys.stderr)
        if not disable_tqdm:
            print(file=sys.stderr)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of max_length tokens (as HFLM)."""
        totals = []
        for request in requests:
            (string,) = request.args
            windows = [(None, *lm_utils.make_disjoint_window(w)) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            totals.append(total)
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, if the task asks, sampled) continuations cut at the first `until` string."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            if eot and eot not in until:
                until.append(eot)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            sample = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature", 1.0) or 0.0) > 0
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            generated = self.backend.generate([ids], self.config, max_new_tokens=max_new,
                                              top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0) if sample else None,
                                              seed=int(gen_kwargs.get("seed", 0) or 0), stop_strings=tuple(until))[0]
            text = self.tok_decode(generated)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
            if self.cache_hook is not None:
                self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return outputs


@register_model("multi_exit_hf")
class MultiExitHFLM(_MultiExitLM):
    """A PyTorch multi-exit model folder (`pretrained=`), any mode of `MultiExitConfiguration`."""

    def __init__(self, pretrained: str, *, vocab_projection_mode: str = "auto", use_original_head: Any = True,
                 output_layer_index: Any = None, contrast_layer_indices: Any = None, alpha: Any = DEFAULT_ALPHA,
                 minimum_candidates: Any = DEFAULT_MINIMUM_CANDIDATES, batch_size: Any = 1,
                 max_length: int | None = None, device: str | None = None, **ignored: Any) -> None:
        if device not in (None, "cpu"):
            raise ConfigurationError(f"multi_exit_hf runs on the CPU here; device={device!r} is not supported")
        backend = TorchBackend(pretrained, projection=vocab_projection_mode)
        config = _config(use_original_head=use_original_head, output_layer_index=output_layer_index,
                         contrast_layer_indices=contrast_layer_indices, alpha=alpha,
                         minimum_candidates=minimum_candidates)
        super().__init__(backend, config, batch_size=batch_size, max_length=max_length)


@register_model("acd_onnx")
class AcdOnnxLM(_MultiExitLM):
    """An export bundle (`pretrained=`) run by the torch-free runtime; scoring uses its score graph."""

    def __init__(self, pretrained: str, *, provider: str = "cpu", use_original_head: Any = True,
                 output_layer_index: Any = None, contrast_layer_indices: Any = None, alpha: Any = DEFAULT_ALPHA,
                 minimum_candidates: Any = DEFAULT_MINIMUM_CANDIDATES, fused_contrast: Any = True,
                 batch_size: Any = 1, max_length: int | None = None, device: str | None = None,
                 **ignored: Any) -> None:
        backend = BundleBackend(pretrained, provider=provider, fused_contrast=str(fused_contrast) != "False")
        config = _config(use_original_head=use_original_head, output_layer_index=output_layer_index,
                         contrast_layer_indices=contrast_layer_indices, alpha=alpha,
                         minimum_candidates=minimum_candidates)
        super().__init__(backend, config, batch_size=batch_size, max_length=max_length)
