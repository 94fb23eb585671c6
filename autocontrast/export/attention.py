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

The rotary embedding runs inside the op too (`do_rotary`, from cos/sin tables the model's own
rotary module computes once for every position, `rotary_tables`), which takes ~14 small nodes per
layer out of the step; where the op cannot rotate as the model does (a partial rotary dimension,
a length-dependent scaling), the model's traced rotation stays and the op gets rotated queries
and keys. Projections and q/k norms stay the model's own traced code.

>>> with group_query_attention(model, past, mask, pos, rotary_tables(model)) as gqa:  # doctest: +SKIP
...     body(input_ids=ids, position_ids=pos, use_cache=False)
>>> present = gqa.present  # [key, value of layer 0, 1, ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

import torch

ATTENTION_NAME = "autocontrast_group_query"  # the name registered with transformers' AttentionInterface
OPSET_DOMAIN = "com.microsoft"
CUSTOM_OPSETS = {OPSET_DOMAIN: 1}  # what `torch.onnx.export` needs to emit the op
ROTARY_HEAD_MULTIPLE = 16  # the op rotates only heads whose size is a multiple of this


class _GroupQueryAttentionOp(torch.autograd.Function):
    """Emits one `com.microsoft::GroupQueryAttention` node when traced.

    The Python forward exists for the tracer only: it returns tensors of the op's output shapes
    (the query for the attention output, the past buffers for the presents). What the graph
    computes is ORT's kernel, which export validation checks against the PyTorch model.
    `cos`, `sin`, `positions` None: the queries and keys come rotated.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor,
                cos: torch.Tensor | None, sin: torch.Tensor | None, positions: torch.Tensor | None, num_heads: int,
                kv_num_heads: int, scale: float, window: int, softcap: float) -> tuple[torch.Tensor, ...]:
        return query.clone(), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                 total_length: Any, cos: Any, sin: Any, positions: Any, num_heads: int, kv_num_heads: int,
                 scale: float, window: int, softcap: float) -> Any:
        inputs = [query, key, value, past_key, past_value, seqlens_k, total_length]
        rotary = cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone())
        if rotary:
            inputs += [cos, sin, positions]
        outputs = g.op(f"{OPSET_DOMAIN}::GroupQueryAttention", *inputs, num_heads_i=num_heads,
                       kv_num_heads_i=kv_num_heads, scale_f=scale, local_window_size_i=window, softcap_f=softcap,
                       do_rotary_i=int(rotary), rotary_interleaved_i=0, outputs=3)
        for output, like in zip(outputs, (query, past_key, past_value), strict=True):
            output.setType(like.type())  # (batch, seq, hidden) and the buffers' own shapes
        return outputs


@dataclasses.dataclass(frozen=True)
class RotaryTables:
    """What GroupQueryAttention rotates with: cos and sin of every position, (max_positions, head_dim / 2)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotary_tables(model: Any) -> RotaryTables | None:
    """The model's own rotary embedding as tables for every position, or None where the op cannot
    rotate as the model does (no rotary module, a length-dependent scaling, a partial rotary
    dimension, a layout other than rotate-half, or heads not a multiple of 16)."""
    rope = getattr(model.base_model, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") in ("dynamic", "longrope"):
        return None
    family, config = model.family, model.config
    head_dim, positions = family.head_dim(config), family.max_positions(config)
    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])  # (1, positions, dim)
    half = head_dim // 2
    if head_dim % ROTARY_HEAD_MULTIPLE or cos.shape[-1] != head_dim or not torch.equal(cos[..., :half], cos[..., half:]):
        return None
    return RotaryTables(cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())


def _unrotated(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_pos_emb` while the op rotates: queries and keys pass through."""
    return q, k


@dataclasses.dataclass
class BufferedAttention:
    """What the layers' attention reads during one traced forward, and the presents they leave."""

    past: tuple[torch.Tensor, ...]  # key, value of layer 0, 1, ...: (batch, kv_heads, capacity, head_dim)
    seqlens_k: torch.Tensor  # (batch,) int32: tokens per row after this step, minus one
    total_length: torch.Tensor  # () int32: the widest row after this step
    rotary: RotaryTables | None  # None: the model's own code rotates
    positions: torch.Tensor  # (batch, seq) int64: the new tokens' positions (for the op's rotation)
    present: list[torch.Tensor | None] = dataclasses.field(default_factory=list)

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scaling: float | None, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
        """query (batch, heads, seq, head_dim), key/value (batch, kv_heads, seq, head_dim), rotated unless
        the op rotates (`rotary`).

        Returns the attention output (batch, seq, heads * head_dim).
        """
        heads, head_dim, kv_heads = int(query.shape[1]), int(query.shape[3]), int(key.shape[1])  # fixed by the model
        flat = [t.transpose(1, 2).flatten(2) for t in (query, key, value)]  # (batch, seq, n * head_dim)
        return self.attend_flat(module, *flat, heads=heads, kv_heads=kv_heads, head_dim=head_dim, scaling=scaling,
                                sliding_window=sliding_window, softcap=softcap)

    def attend_flat(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, heads: int,
                    kv_heads: int, head_dim: int, scaling: float | None, sliding_window: int | None,
                    softcap: float | None) -> torch.Tensor:
        """`attend` on queries, keys and values already (batch, seq, n * head_dim)."""
        layer = module.layer_idx
        rotary = (self.rotary.cos, self.rotary.sin, self.positions) if self.rotary else (None, None, None)
        out, present_key, present_value = _GroupQueryAttentionOp.apply(
            query, key, value, self.past[2 * layer], self.past[2 * layer + 1], self.seqlens_k, self.total_length,
            *rotary, heads, kv_heads, float(scaling if scaling is not None else head_dim ** -0.5),
            int(sliding_window) if sliding_window else -1, float(softcap or 0.0))
        self.present[2 * layer:2 * layer + 2] = [present_key, present_value]
        return out


# the forward being traced, a BufferedAttention or MixedAttention (one at a time: the exporter is not reentrant)
_ACTIVE: list[Any] = []


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
    total = torch._shape_as_tensor(attention_mask)[1].to(torch.int32)  # a graph value, not a traced constant
    return seqlens_k, total


@dataclasses.dataclass
class MixedAttention:
    """Attention of a mixed step (`ExitGraph` kind MIXED): the flat sequence's first `rows` tokens are the
    decode rows' (one each, over `decode`'s buffers), the rest one prompt's chunk (over `chunk`'s). Every
    other op of the layer runs once over the whole flat sequence."""

    decode: BufferedAttention
    chunk: BufferedAttention  # one row
    rows: int  # decode rows: a traced size

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """query (1, heads, N, head_dim), key/value (1, kv_heads, N, head_dim) -> (1, N, heads * head_dim)."""
        sizes = {"heads": int(query.shape[1]), "kv_heads": int(key.shape[1]), "head_dim": int(query.shape[3])}
        flat = [t.transpose(1, 2).flatten(2) for t in (query, key, value)]  # (1, N, n * head_dim)
        one = [t[:, :self.rows].transpose(0, 1) for t in flat]  # (rows, 1, n * head_dim)
        many = [t[:, self.rows:] for t in flat]  # (1, tokens, n * head_dim)
        decoded = self.decode.attend_flat(module, *one, **sizes, **kwargs)  # (rows, 1, heads * head_dim)
        chunked = self.chunk.attend_flat(module, *many, **sizes, **kwargs)  # (1, tokens, heads * head_dim)
        return torch.cat([decoded.transpose(0, 1), chunked], dim=1)


@contextlib.contextmanager
def _attention_as(model: Any, state: BufferedAttention | MixedAttention, rotary: RotaryTables | None) -> Iterator[None]:
    """Run `model`'s attention layers through `state` for the block; with `rotary`, the op rotates and the
    model's own `apply_rotary_pos_emb` passes queries and keys through."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention_function)
    modules = {sys.modules[type(layer.self_attn).__module__] for layer in getattr(
        model.base_model, model.family.layers_attr)} if rotary else set()
    saved_rotation = {m: m.apply_rotary_pos_emb for m in modules}
    saved = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    for module in modules:
        module.apply_rotary_pos_emb = _unrotated
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()
        model.config._attn_implementation = saved
        for module, function in saved_rotation.items():
            module.apply_rotary_pos_emb = function


def _buffered(past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, positions: torch.Tensor,
              rotary: RotaryTables | None) -> BufferedAttention:
    seqlens_k, total = sequence_lengths(attention_mask)
    return BufferedAttention(past, seqlens_k, total, rotary, positions, [None] * len(past))


@contextlib.contextmanager
def group_query_attention(model: Any, past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor,
                          positions: torch.Tensor, rotary: RotaryTables | None) -> Iterator[BufferedAttention]:
    """Run `model`'s attention layers as `GroupQueryAttention` over `past` for the block; with
    `rotary`, the op rotates and the model's own `apply_rotary_pos_emb` passes queries and keys through."""
    state = _buffered(past, attention_mask, positions, rotary)
    with _attention_as(model, state, rotary):
        yield state


@contextlib.contextmanager
def mixed_query_attention(model: Any, decode: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor],
                          chunk: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor],
                          rotary: RotaryTables | None) -> Iterator[MixedAttention]:
    """`group_query_attention` for a mixed step: `decode` and `chunk` are each (past buffers, 2-D mask,
    positions) of their rows; the model runs over their tokens flat, decode rows' first."""
    state = MixedAttention(_buffered(*decode, rotary), _buffered(*chunk, rotary), decode[2].shape[0])
    with _attention_as(model, state, rotary):
        yield state


def last_valid(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last new token in a right-padded chunk: (batch, seq, hidden) -> (batch, hidden).

    Row b's new tokens are its first min(seq, T_b), T_b = ones in its mask row.
    """
    seq = torch._shape_as_tensor(hidden)[1]  # a graph value, not a traced constant
    index = torch.minimum(attention_mask.sum(dim=1), seq) - 1  # (batch,)
    index = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)
