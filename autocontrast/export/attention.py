"""Decode-graph attention through ONNX Runtime's `com.microsoft.GroupQueryAttention`.

The traced eager attention of transformers repeats keys and values for grouped-query attention
(`repeat_kv`: an Expand per layer), concatenates the past and the new keys/values inside the graph
and reads a padding mask: a step copies the whole cache and costs more as the context grows. This
module swaps it, for the trace only, for one `GroupQueryAttention` node per layer that reads the
grouped heads directly and writes the new keys/values into a preallocated buffer in place:

- past and present are the same buffer, (batch, kv_heads, capacity, head_dim) per layer; the
  runtime binds one `OrtValue` as both (`autocontrast.runtime.kv_buffer`), so a step writes one
  column per row and copies nothing;
- each row's cache is left-aligned with its own length: rows of one batch may hold different
  lengths, and forgetting a row's last tokens is length bookkeeping;
- `seqlens_k` (tokens per row after the step, minus one) and `total_sequence_length` (the widest
  row) come from the 2-D attention mask inside the graph: the mask of row b is 1 in its first
  `T_b` columns. A chunk of new tokens is right-padded: row b's are its first `min(S, T_b)`.

Rotary embeddings, q/k norms and projections stay the model's own traced code: the op receives
the rotated queries and keys, exactly what eager attention would multiply.

>>> with group_query_attention(model, past, attention_mask, sequence_length) as gqa:  # doctest: +SKIP
...     body(input_ids=ids, position_ids=pos, use_cache=False)
>>> present = gqa.present  # [key, value of layer 0, 1, ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

ATTENTION_NAME = "autocontrast_group_query"  # the name registered with transformers' AttentionInterface
OPSET_DOMAIN = "com.microsoft"
CUSTOM_OPSETS = {OPSET_DOMAIN: 1}  # what `torch.onnx.export` needs to emit the op


class _GroupQueryAttentionOp(torch.autograd.Function):
    """Emits one `com.microsoft::GroupQueryAttention` node when traced.

    The Python forward exists for the tracer only: it returns tensors of the op's output shapes
    (the query for the attention output, the past buffers for the presents). What the graph
    computes is ORT's kernel, which export validation checks against the PyTorch model.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor, num_heads: int,
                kv_num_heads: int, scale: float, window: int, softcap: float) -> tuple[torch.Tensor, ...]:
        return query.clone(), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                 total_length: Any, num_heads: int, kv_num_heads: int, scale: float, window: int,
                 softcap: float) -> Any:
        return g.op(f"{OPSET_DOMAIN}::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k,
                    total_length, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, scale_f=scale,
                    local_window_size_i=window, softcap_f=softcap, outputs=3)


@dataclasses.dataclass
class BufferedAttention:
    """What the layers' attention reads during one traced forward, and the presents they leave."""

    past: tuple[torch.Tensor, ...]  # key, value of layer 0, 1, ...: (batch, kv_heads, capacity, head_dim)
    seqlens_k: torch.Tensor  # (batch,) int32: tokens per row after this step, minus one
    total_length: torch.Tensor  # () int32: the widest row after this step
    present: list[torch.Tensor | None] = dataclasses.field(default_factory=list)

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scaling: float | None, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
        """query (batch, heads, seq, head_dim), key/value (batch, kv_heads, seq, head_dim), rotated.

        Returns the attention output (batch, seq, heads * head_dim).
        """
        layer = module.layer_idx
        heads, head_dim, kv_heads = int(query.shape[1]), int(query.shape[3]), int(key.shape[1])  # fixed by the model
        flat = [t.transpose(1, 2).flatten(2) for t in (query, key, value)]  # (batch, seq, n * head_dim)
        out, present_key, present_value = _GroupQueryAttentionOp.apply(
            *flat, self.past[2 * layer], self.past[2 * layer + 1], self.seqlens_k, self.total_length,
            heads, kv_heads, float(scaling if scaling is not None else head_dim ** -0.5),
            int(sliding_window) if sliding_window else -1, float(softcap or 0.0))
        self.present[2 * layer:2 * layer + 2] = [present_key, present_value]
        return out


_ACTIVE: list[BufferedAttention] = []  # the forward being traced (one at a time: the exporter is not reentrant)


def _attention_function(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Any, *, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature over the active `BufferedAttention`."""
    if not _ACTIVE:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside group_query_attention()")
    return _ACTIVE[-1].attend(module, query, key, value, scaling=scaling, sliding_window=sliding_window,
                              softcap=softcap), None


def sequence_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`seqlens_k` (batch,) int32 and `total_sequence_length` () int32 from a left-aligned 2-D mask."""
    seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
    total = torch.tensor(attention_mask.shape[1]).to(torch.int32) if not torch.jit.is_tracing() \
        else torch._shape_as_tensor(attention_mask)[1].to(torch.int32)
    return seqlens_k, total


@contextlib.contextmanager
def group_query_attention(model: Any, past: tuple[torch.Tensor, ...],
                          attention_mask: torch.Tensor) -> Iterator[BufferedAttention]:
    """Run `model`'s attention layers as `GroupQueryAttention` over `past` for the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention_function)
    seqlens_k, total = sequence_lengths(attention_mask)
    state = BufferedAttention(past, seqlens_k, total, [None] * len(past))
    saved = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()
        model.config._attn_implementation = saved


def last_valid(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last new token in a right-padded chunk: (batch, seq, hidden) -> (batch, hidden).

    Row b's new tokens are its first min(seq, T_b), T_b = ones in its mask row.
    """
    seq = torch._shape_as_tensor(hidden)[1] if torch.jit.is_tracing() else torch.tensor(hidden.shape[1])
    index = torch.minimum(attention_mask.sum(dim=1), seq) - 1  # (batch,)
    index = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)
