"""One ONNX Runtime session over one graph of a bundle: token ids in, exit logits out.

A session knows nothing about sampling; the stepping engine knows nothing about ONNX Runtime.
Sessions are safe to share between threads (ORT's `run` is); everything per batch lives in the
batch's cache (`KVCache`, or `KVBuffer`, which also keeps the IO binding of its buffers).

Weights: by default each session loads its own initializers and ORT pre-packs its MatMul weights
(the fastest step; one copy of the weights per session). `share_weights=True` (CPU) gives every
session views of one read-only memory map of the bundle's weights file instead, with pre-packing
off: one copy for all the graphs a Generator opens, at a slower step (`autocontrast.runtime.weights`;
figures in the README). CUDA and TensorRT sessions always hold their own device copies.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from autocontrast.bundle import (
    BUFFER_LAYOUT,
    CHUNK_TOKEN_INPUTS,
    DECODE,
    EXITS_METADATA_KEY,
    MIXED,
    TOKEN_INPUTS,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    chunk_name,
    exits_metadata,
    output_switch,
)
from autocontrast.errors import BundleError, InferenceError
from autocontrast.runtime.huge_pages import huge_pages_for_new_memory, page_out_files
from autocontrast.runtime.kv_store import KVStore
from autocontrast.runtime.providers import (
    CPU,
    check_session_providers,
    normalize_provider,
    output_device,
    resolve_providers,
)
from autocontrast.runtime.weights import shared_initializers


@dataclasses.dataclass(frozen=True)
class StepOutput:
    exit_logits: np.ndarray  # (batch, n_exits, vocab) decode; (batch, seq, n_exits, vocab) score
    contrast: np.ndarray | None  # (batch, vocab) decode; (batch, seq, vocab) score; None without fusion
    dola: np.ndarray | None = None  # fused DoLa, shaped as `contrast`; None without it

    def rows(self, index: np.ndarray | slice) -> StepOutput:
        """The outputs of some rows of the batch."""
        return StepOutput(self.exit_logits[index], *(None if a is None else a[index] for a in (self.contrast, self.dola)))

    @staticmethod
    def concat(parts: list[StepOutput]) -> StepOutput:
        """Outputs of several runs, rows one after another."""
        if len(parts) == 1:
            return parts[0]
        fused = [None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts])
                 for f in ("contrast", "dola")]
        return StepOutput(np.concatenate([p.exit_logits for p in parts]), *fused)

    def by_output(self, graph: GraphSpec) -> dict[str, np.ndarray]:
        """The arrays under `graph`'s output names (what validation compares)."""
        named = {graph.logits_output: self.exit_logits}
        if graph.contrast is not None:
            named[graph.contrast.output] = self.contrast
        if graph.dola is not None:
            named[graph.dola.output] = self.dola
        return named


# A session's intra-op threads stop spinning when its run returns. By default ONNX Runtime's threads spin for a
# while after each run; a process stepping two sessions in turn (greedy on decode_original, ACD on
# decode_exits: one server, one Generator) then started each step while the other session's threads still
# spun on the same cores: SmolLM2-135M's demo bundle on 2 cores took 26-29 ms a step alternating, 14-16 ms
# either graph alone; stopped, alternating costs what each graph alone does, and one graph's steps are as
# quick as before (they spin within a run). `benchmarks/alternating_sessions.py --keep-spinning` measures it.
STOP_SPINNING_AFTER_RUN = True


def load_session(graph_dir: Path, file: str, *, provider: str = "cpu", device_id: int = 0, threads: int | None = None,
                 trt_options: dict[str, Any] | None = None, share_weights: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session of one graph file of a bundle, on exactly the provider asked for (never a
    quiet fallback); TensorRT cache paths in `trt_options` are relative to `graph_dir`.

    `share_weights` (CPU only; other providers ignore it): the session reads its external
    initializers from the process's one memory map of the weights file, without pre-packing.
    """
    path = Path(graph_dir) / file
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if STOP_SPINNING_AFTER_RUN:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    providers = resolve_providers(provider, device_id=device_id, trt_options=trt_options, bundle_dir=Path(graph_dir))
    cpu = normalize_provider(provider) == CPU
    shared = None
    if share_weights and cpu:
        shared = shared_initializers(path)
        for name, value in shared.values.items():
            options.add_initializer(name, value)  # used in place (add_external_initializers would copy)
        if not shared.prepack:  # a pre-packed weight is a copy of the session's own: packing would undo the sharing
            options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        # on CPU, the session's own (pre-packed) weights go into 2 MiB pages: fewer TLB misses per step
        with huge_pages_for_new_memory(active=cpu and shared is None) as huge:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises its own exception types; name the file and the cause
        raise BundleError(f"onnxruntime cannot load {path}: {err}") from None
    check_session_providers(session, provider)
    if cpu and shared is None:  # the weights it mapped but pre-packed (or reads in part) need not stay resident
        page_out_files(str(graph_dir))
    session.shared_initializers = shared  # ORT only borrows these buffers: they live as long as the session
    session.huge_page_bytes = huge.collapsed_bytes
    return session


class ExitSession:
    """`ExitSession(graph_dir, graph, kv=..., vocab_size=...)`; `.step(...)` runs one forward.

    `open_session(bundle_dir, manifest, graph)` builds one from a bundle's manifest.
    """

    def __init__(self, graph_dir: Path, graph: GraphSpec, *, kv: KVCacheSpec, vocab_size: int, provider: str = "cpu",
                 device_id: int = 0, threads: int | None = None, trt_options: dict[str, Any] | None = None,
                 extra_inputs: tuple[str, ...] = (), share_weights: bool = False,
                 session: ort.InferenceSession | None = None) -> None:
        self.graph, self.kv, self.vocab_size, self.provider = graph, kv, vocab_size, provider
        resolve_providers(provider, device_id=device_id)  # a provider this machine lacks is said first
        check_attention_kernels(graph, kv, provider)
        self.extra_inputs = extra_inputs  # required beyond tokens and past (an encoder-decoder's prompt mask)
        # `session`: the graph file's session, already open (the entries of one switched graph share it)
        self.session = session or load_session(graph_dir, graph.file, provider=provider, device_id=device_id,
                                               threads=threads, trt_options=trt_options, share_weights=share_weights)
        self.switches = {name: np.array(value) for name, value in graph.switches}
        self.device = output_device(provider)
        self.device_id = device_id
        self.input_names = frozenset(i.name for i in self.session.get_inputs())
        # fused outputs a run may skip (a graph fusing the contrast and DoLa): output -> its switch input
        self.gates = {o: output_switch(o) for o in fused_output_names(graph) if output_switch(o) in self.input_names}
        self._check_signature()

    def _check_signature(self) -> None:
        """The graph must have the inputs, outputs and exits the manifest promises."""
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = set(TOKEN_INPUTS) | set(self.extra_inputs) | set(self.switches)
        want_out = {self.graph.logits_output}
        if self.graph.kind in (DECODE, MIXED):
            want_in |= set(self.kv.past_names())
            want_out |= set(self.kv.present_names())
        if self.graph.kind == MIXED:
            want_in |= set(CHUNK_TOKEN_INPUTS) | set(self.kv.chunk_past_names())
            want_out |= set(self.kv.chunk_present_names())
        want_out |= set(fused_output_names(self.graph))
        missing = sorted(want_in - inputs) + sorted(want_out - outputs)
        if missing:
            raise BundleError(f"bundle manifest does not match graph {self.graph.file}: the graph lacks "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; re-export the bundle")
        logits = next(o for o in self.session.get_outputs() if o.name == self.graph.logits_output)
        vocab = logits.shape[-1]
        if isinstance(vocab, int) and vocab != self.vocab_size:
            raise BundleError(f"graph {self.graph.file} returns {vocab} logits per token but the manifest says "
                              f"vocab_size {self.vocab_size}")
        recorded = self.session.get_modelmeta().custom_metadata_map.get(EXITS_METADATA_KEY)
        if recorded is not None and not self.switches and recorded != exits_metadata(self.graph.exits):
            raise BundleError(f"bundle manifest does not match graph {self.graph.file}: the manifest says it returns "
                              f"exits {[str(e) for e in self.graph.exits]}, the graph returns {json.loads(recorded)}; "
                              "re-export the bundle (or restore its manifest.json)")

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVStore | None, *, extra: dict[str, np.ndarray] | None = None,
             fused: Collection[str] | None = None) -> StepOutput:
        """One forward. input_ids/position_ids (batch, seq), attention_mask (batch, past+seq), int64.

        Decode graphs read `cache` as the past and leave the present in it (on the session's device).
        `extra`: more inputs by name (an encoder-decoder's cross-attention KV); those the graph does
        not declare are left out (a graph whose exits lie below a layer never reads its cross KV).
        `fused`: the fused outputs (by name) the caller reads; a graph that can skip the others does,
        and they come back None (default: every one).
        """
        if cache is None:
            binding = self.session.io_binding()
        else:  # the cache's outputs come first
            binding = cache.binding(self.session, device=self.device, device_id=self.device_id)
        _bind_tokens(binding, TOKEN_INPUTS, input_ids, attention_mask, position_ids)
        for name, value in (extra or {}).items():
            if name in self.input_names:
                binding.bind_cpu_input(name, value)
        first = 0 if cache is None else len(cache.output_names)
        out, outputs = self._run(binding, first, fused,
                                 f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}")
        if cache is not None:
            cache.update(outputs[:first], input_ids.shape[1])
        return out

    def step_mixed(self, decode: tuple[np.ndarray, np.ndarray, np.ndarray, KVBufferLike],
                   chunk: tuple[np.ndarray, np.ndarray, np.ndarray, KVBufferLike], *,
                   fused: Collection[str] | None = None) -> StepOutput:
        """One forward of a MIXED graph: `decode` and `chunk` are each (input_ids, attention_mask, position_ids,
        KV buffer) as `step` takes them (the decode rows one token each; the chunk one row). Both buffers are
        written in place. Returns the decode rows' outputs, then the chunk's last token's."""
        binding = self.session.io_binding()
        for (ids, mask, positions, buffer), names, rename in ((decode, TOKEN_INPUTS, None),
                                                              (chunk, CHUNK_TOKEN_INPUTS, chunk_name)):
            buffer.bind(binding, rename=rename)
            _bind_tokens(binding, names, ids, mask, positions)
        return self._run(binding, 2 * len(self.kv.present_names()), fused,
                         f"decode input_ids {tuple(decode[0].shape)}, chunk input_ids {tuple(chunk[0].shape)}")[0]

    def _run(self, binding: ort.IOBinding, presents: int, fused: Collection[str] | None,
             inputs: str) -> tuple[StepOutput, list[ort.OrtValue]]:
        """Bind the switches and outputs after `presents` bound outputs, run; the outputs read, and every output."""
        for name, value in self.switches.items():
            binding.bind_cpu_input(name, value)
        skipped = {o for o in self.gates if fused is not None and o not in fused}
        for output, switch in self.gates.items():
            binding.bind_cpu_input(switch, np.array(output not in skipped))
        names = fused_output_names(self.graph)
        for name in [self.graph.logits_output, *names]:
            binding.bind_output(name, "cpu")  # only what the loop reads comes back to the host
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:  # ORT's own exception types: name the graph and the inputs' shapes
            raise InferenceError(f"onnxruntime failed running graph {self.graph.name!r} on {inputs}: {err}") from None
        outputs = binding.get_outputs()
        arrays = dict(zip(names, (o.numpy() for o in outputs[presents + 1:presents + 1 + len(names)]), strict=True))
        contrast, dola = self.graph.contrast, self.graph.dola
        return StepOutput(exit_logits=outputs[presents].numpy(),
                          contrast=arrays[contrast.output] if contrast is not None and contrast.output not in skipped
                          else None,
                          dola=arrays[dola.output] if dola is not None and dola.output not in skipped else None), outputs


class KVBufferLike(Protocol):
    """What `step_mixed` binds: a KV buffer (`autocontrast.runtime.kv_buffer.KVBuffer`)."""

    def bind(self, binding: ort.IOBinding, *, rename: Callable[[str], str] | None = None) -> None: ...


def _bind_tokens(binding: ort.IOBinding, names: tuple[str, str, str], input_ids: np.ndarray,
                 attention_mask: np.ndarray, position_ids: np.ndarray) -> None:
    for name, value in zip(names, (input_ids, attention_mask, position_ids), strict=True):
        binding.bind_cpu_input(name, value)


def fused_output_names(graph: GraphSpec) -> list[str]:
    """The fused outputs a graph returns after its logits, in order: the contrast, then DoLa."""
    return [spec.output for spec in (graph.contrast, graph.dola) if spec is not None]


def check_attention_kernels(graph: GraphSpec, kv: KVCacheSpec, provider: str) -> None:
    """GroupQueryAttention (a `BUFFER_LAYOUT` graph) has CPU kernels in float32 and float16 but CUDA
    kernels in float16 only: refuse a float32 buffer graph on the GPU rather than run it split
    across devices."""
    if graph.kind in (DECODE, MIXED) and kv.layout == BUFFER_LAYOUT and kv.dtype == "float32" and \
            normalize_provider(provider) != CPU:
        raise BundleError(f"graph {graph.name!r} attends through GroupQueryAttention in float32, which "
                          f"{normalize_provider(provider)} cannot run (its kernels are float16); export the model "
                          "with --dtype float16 for the GPU, or with --kv-layout concat to keep float32")


def shared_file_session(opened: Iterable[ExitSession], graph: GraphSpec) -> ort.InferenceSession | None:
    """The ONNX Runtime session one of `opened` holds for `graph`'s file, if any: entries naming one
    (switched) graph file share it, so its weights are in memory once."""
    return next((s.session for s in opened if s.graph.file == graph.file), None)


def open_session(bundle_dir: Path, manifest: Manifest, graph: GraphSpec, *, provider: str = "cpu",
                 device_id: int = 0, threads: int | None = None, share_weights: bool = False,
                 session: ort.InferenceSession | None = None) -> ExitSession:
    """The session of one graph of a bundle, with the bundle's recorded TensorRT options (`session`: its
    file's ONNX Runtime session, when another entry of the same file has it open)."""
    trt = (manifest.variant.get("tensorrt") or {}).get("provider_options", {}).get(graph.name)
    extra = (manifest.encoder_decoder.encoder_attention_mask,) if manifest.encoder_decoder else ()
    return ExitSession(bundle_dir, graph, kv=manifest.kv_for(graph), vocab_size=manifest.vocab_size, provider=provider,
                       device_id=device_id, threads=threads, trt_options=trt, extra_inputs=extra,
                       share_weights=share_weights, session=session)
