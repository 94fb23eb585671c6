"""One ONNX Runtime session over one graph of a bundle: token ids in, exit logits out.

A session knows nothing about sampling; the generator knows nothing about ONNX Runtime. Sessions
are safe to share between threads (ORT's `run` is); everything per call lives in the `KVCache`
and the IO binding created for that step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import (
    ATTENTION_MASK,
    DECODE,
    INPUT_IDS,
    POSITION_IDS,
    TOKEN_INPUTS,
    GraphSpec,
    Manifest,
)
from autocontrast.errors import BundleError
from autocontrast.runtime.kv_cache import KVCache
from autocontrast.runtime.providers import check_session_providers, output_device, resolve_providers


@dataclasses.dataclass(frozen=True)
class StepOutput:
    exit_logits: np.ndarray  # (batch, n_exits, vocab) decode; (batch, seq, n_exits, vocab) score
    contrast: np.ndarray | None  # (batch, vocab) decode; (batch, seq, vocab) score; None without fusion


class ExitSession:
    """`ExitSession(bundle_dir, manifest, graph, provider="cpu")`; `.step(...)` runs one forward."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, graph: GraphSpec, *, provider: str = "cpu",
                 device_id: int = 0, threads: int | None = None) -> None:
        self.graph = graph
        self.manifest = manifest
        self.provider = provider
        trt = (manifest.variant.get("tensorrt") or {}).get("provider_options", {}).get(graph.name)
        providers = resolve_providers(provider, device_id=device_id, trt_options=trt, bundle_dir=bundle_dir)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        path = bundle_dir / graph.file
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # ORT raises its own exception types; name the file and the cause
            raise BundleError(f"onnxruntime cannot load {path}: {err}") from None
        check_session_providers(self.session, provider)
        self.device = output_device(provider)
        self._device_id = device_id
        self._check_signature()

    def _check_signature(self) -> None:
        """The graph must have the inputs and outputs the manifest promises."""
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = set(TOKEN_INPUTS)
        want_out = {self.graph.logits_output}
        if self.graph.kind == DECODE:
            want_in |= set(self.manifest.kv_cache.past_names())
            want_out |= set(self.manifest.kv_cache.present_names())
        if self.graph.contrast is not None:
            want_out.add(self.graph.contrast.output)
        missing = sorted(want_in - inputs) + sorted(want_out - outputs)
        if missing:
            raise BundleError(f"bundle manifest does not match graph {self.graph.file}: the graph lacks "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; re-export the bundle")
        logits = next(o for o in self.session.get_outputs() if o.name == self.graph.logits_output)
        vocab = logits.shape[-1]
        if isinstance(vocab, int) and vocab != self.manifest.vocab_size:
            raise BundleError(f"graph {self.graph.file} returns {vocab} logits per token but the manifest says "
                              f"vocab_size {self.manifest.vocab_size}")

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVCache | None) -> StepOutput:
        """One forward. input_ids/position_ids (batch, seq), attention_mask (batch, past+seq), int64.

        Decode graphs read `cache` as the past and leave the present in it (on the session's device).
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(ATTENTION_MASK, attention_mask)
        binding.bind_cpu_input(POSITION_IDS, position_ids)
        names = [self.graph.logits_output]
        if self.graph.contrast is not None:
            names.append(self.graph.contrast.output)
        for name in names:
            binding.bind_output(name, "cpu")  # only what the loop reads comes back to the host
        if cache is not None:
            cache.bind_inputs(binding)
            for name in cache.output_names:
                binding.bind_output(name, self.device, device_id=self._device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if cache is not None:
            cache.update(outputs[len(names):], input_ids.shape[1])
        contrast = outputs[1].numpy() if self.graph.contrast is not None else None
        return StepOutput(exit_logits=outputs[0].numpy(), contrast=contrast)
