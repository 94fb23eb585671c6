"""The encoder of an encoder-decoder bundle (T5), and the cross-attention KV it hands the decoder.

`EncoderSession.encode` runs the bundle's encoder graph once per prompt batch; its outputs, every
decoder layer's cross-attention keys and values, are a `CrossKV`: per-row decoder inputs that stay
fixed while the rows decode, and follow the rows when rows join or leave the batch, as the
self-attention KV cache does.

>>> encoder = open_encoder(bundle_dir, manifest)  # doctest: +SKIP
>>> cross = encoder.encode([[37, 1782, 19, 1], [8774, 1]])  # doctest: +SKIP
>>> cross.select([1]).batch  # doctest: +SKIP
1
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocontrast.bundle import EncoderDecoderSpec, GraphSpec, Manifest
from autocontrast.errors import BundleError, InferenceError
from autocontrast.runtime.row_reshape import Align, append_rows, gather, pad_ragged, unused_columns
from autocontrast.runtime.session import load_session


class CrossKV:
    """The prompt side of a batch: `mask` (batch, source) and, per decoder layer, key and value
    (batch, kv_heads, source, head_dim). Rows are left-padded to a common source length."""

    def __init__(self, spec: EncoderDecoderSpec, mask: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
        self.spec = spec
        self.mask = np.ascontiguousarray(mask, dtype=np.int64)  # (batch, source)
        self.arrays = [np.ascontiguousarray(a) for a in arrays]  # [(batch, kv_heads, source, head_dim)]

    @classmethod
    def empty(cls, spec: EncoderDecoderSpec, *, num_kv_heads: int, head_dim: int) -> CrossKV:
        blank = np.zeros((0, num_kv_heads, 0, head_dim), np.float32)
        return cls(spec, np.zeros((0, 0), np.int64), [blank] * len(spec.cross_names()))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def feeds(self) -> dict[str, np.ndarray]:
        """The decoder graphs' extra inputs: the prompt mask and every layer's cross keys/values."""
        return {self.spec.encoder_attention_mask: self.mask, **dict(zip(self.spec.cross_names(), self.arrays,
                                                                        strict=True))}

    def select(self, rows: Sequence[int]) -> CrossKV:
        """Only `rows`, in that order; source columns no kept row uses are dropped."""
        index = np.asarray(rows, dtype=np.int64)
        first, _ = unused_columns(self.mask[index])  # leading source columns no kept row uses: dropped
        width = self.mask.shape[1] - first
        return CrossKV(self.spec, gather([(self.mask, index)], axis=1, width=width, align=Align.RIGHT),
                       [gather([(a, index)], axis=2, width=width, align=Align.RIGHT) for a in self.arrays])

    def append(self, other: CrossKV) -> CrossKV:
        """This batch's rows, then `other`'s, left-padded to the longer source (pads are masked out)."""
        return CrossKV(self.spec, append_rows(self.mask, other.mask, axis=1, align=Align.RIGHT),
                       [append_rows(a, b, axis=2, align=Align.RIGHT) for a, b in zip(self.arrays, other.arrays,
                                                                                     strict=True)])


class EncoderSession:
    """The encoder graph of a bundle on one provider; safe to share between threads.

    `open_encoder(bundle_dir, manifest)` builds one from a bundle's manifest.
    """

    def __init__(self, graph_dir: Path, graph: GraphSpec, *, spec: EncoderDecoderSpec, pad_token_id: int = 0,
                 provider: str = "cpu", device_id: int = 0, threads: int | None = None,
                 trt_options: dict[str, Any] | None = None, share_weights: bool = False) -> None:
        self.spec, self.pad_token_id = spec, pad_token_id
        self.session = load_session(graph_dir, graph.file, provider=provider, device_id=device_id,
                                    threads=threads, trt_options=trt_options, share_weights=share_weights)
        missing = sorted(set(spec.cross_names()) - {o.name for o in self.session.get_outputs()})
        if missing:
            raise BundleError(f"bundle manifest does not match graph {graph.file}: it lacks the outputs "
                              f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; re-export the bundle")

    def encode(self, prompts: Sequence[Sequence[int]]) -> CrossKV:
        """Encode prompts (token ids; left-padded together) into their cross-attention KV."""
        ids, mask = pad_ragged(prompts, pad=self.pad_token_id, align=Align.RIGHT)  # (batch, source), left-padded
        try:
            arrays: list[Any] = self.session.run(self.spec.cross_names(), {"input_ids": ids, "attention_mask": mask})
        except Exception as err:  # ORT's own exception types: name the graph and the input's shape
            raise InferenceError(f"onnxruntime failed running the encoder on input_ids {ids.shape}: {err}") from None
        return CrossKV(self.spec, mask, arrays)


def open_encoder(bundle_dir: Path, manifest: Manifest, *, provider: str = "cpu", device_id: int = 0,
                 threads: int | None = None, share_weights: bool = False) -> EncoderSession:
    """The encoder session of an encoder-decoder bundle, with the bundle's recorded TensorRT options."""
    spec = manifest.encoder_decoder
    if spec is None:
        raise BundleError(f"bundle {str(bundle_dir)!r} is decoder-only: it has no encoder graph")
    graph = manifest.graph(spec.encoder_graph)
    trt = (manifest.variant.get("tensorrt") or {}).get("provider_options", {}).get(graph.name)
    return EncoderSession(bundle_dir, graph, spec=spec, pad_token_id=manifest.padding_token_id,
                          provider=provider, device_id=device_id, threads=threads, trt_options=trt,
                          share_weights=share_weights)
