"""The traceable modules behind a T5 bundle: the encoder (prompt -> cross-attention KV) and the decoder.

The decoder is written out over the Hugging Face modules' own weights (`q`, `k`, `v`, `o`, norms,
feed-forward) instead of calling `T5Stack.forward`, because that forward reads an
`EncoderDecoderCache` whose "cross KV already computed?" flag becomes data-dependent control flow
(an ONNX `If`, which TensorRT rejects), and computes the relative position bias from the cache
length rather than from the query's position. Here:
- the encoder graph computes every decoder layer's cross-attention keys and values once;
- the decoder graphs take them as inputs, with the self-attention past, and compute the relative
  position bias of each row from its `position_ids` (queries) and `attention_mask` (keys).
Export validation compares both with the Hugging Face model's own forward.

>>> keys_values = T5EncoderGraph(model)(input_ids, attention_mask)  # doctest: +SKIP
>>> exit_logits, *present = T5DecoderGraph(model, (4, 2), kind="decode")(ids, mask, pos, enc_mask,
...                                                                       *keys_values, *past)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autocontrast.bundle import DECODE
from autocontrast.config import Exit
from autocontrast.export.graph import ExitGraph


def _heads(x: torch.Tensor, attention: Any) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)"""
    return x.view(x.shape[0], -1, attention.n_heads, attention.key_value_proj_dim).transpose(1, 2)


def _attend(attention: Any, query_input: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """T5 attention (no 1/sqrt(d) scaling) of queries from `query_input` over given keys/values.

    query_input: (batch, seq, d_model); key, value: (batch, heads, keys, head_dim);
    bias: broadcastable to (batch, heads, seq, keys) -> (batch, seq, d_model)
    """
    query = _heads(attention.q(query_input), attention)  # (batch, heads, seq, head_dim)
    scores = torch.matmul(query, key.transpose(3, 2)) + bias  # (batch, heads, seq, keys)
    weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (batch, seq, heads, head_dim)
    return attention.o(out.view(out.shape[0], -1, attention.inner_dim))


def cross_key_values(model: Any, encoder_output: torch.Tensor) -> list[torch.Tensor]:
    """Key and value of every decoder layer's cross-attention, [k0, v0, k1, v1, ...].

    encoder_output: (batch, source, d_model) -> each (batch, heads, source, head_dim)
    """
    flat = []
    for block in model.decoder.block:
        attention = block.layer[1].EncDecAttention
        flat.extend([_heads(attention.k(encoder_output), attention), _heads(attention.v(encoder_output), attention)])
    return flat


class T5EncoderGraph(nn.Module):
    """(input_ids, attention_mask) of the prompt -> every decoder layer's cross-attention (key, value)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return tuple(cross_key_values(self.model, encoded.last_hidden_state))


def self_attention_bias(model: Any, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's relative position bias plus its causal/padding mask: (batch, heads, seq, past+seq).

    attention_mask: (batch, past+seq) 1 for real tokens; position_ids: (batch, seq) of the queries.
    A key's position is its count of real tokens before it, so rows may be left-padded.
    """
    first = model.decoder.block[0].layer[0].SelfAttention  # only the first layer holds the bias table
    key_positions = torch.cumsum(attention_mask, dim=-1) - 1  # (batch, total)
    relative = key_positions[:, None, :] - position_ids[:, :, None]  # (batch, seq, total)
    buckets = first._relative_position_bucket(relative, bidirectional=False,
                                              num_buckets=first.relative_attention_num_buckets,
                                              max_distance=first.relative_attention_max_distance)
    bias = first.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # (batch, heads, seq, total)
    visible = (attention_mask[:, None, :] > 0) & (relative <= 0)  # (batch, seq, total): real and not ahead
    blocked = torch.finfo(bias.dtype).min
    return bias + torch.where(visible, 0.0, blocked).to(bias.dtype)[:, None, :, :]


def cross_attention_bias(encoder_attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, source) prompt mask -> (batch, 1, 1, source): 0 on real tokens, the dtype's min on pads."""
    return torch.where(encoder_attention_mask[:, None, None, :] > 0, 0.0, torch.finfo(dtype).min).to(dtype)


class T5DecoderGraph(ExitGraph):
    """The T5 decoder as a function of flat tensors, exits projected as `ExitGraph` does.

    kind DECODE: (input_ids, attention_mask, position_ids, encoder_attention_mask, *cross, *past) ->
        (exit_logits (batch, n_exits, vocab) of the last position, [contrast], *present)
    kind SCORE: (input_ids, attention_mask, position_ids, encoder_attention_mask, *cross) ->
        (exit_logits (batch, seq, n_exits, vocab), [contrast (batch, seq, vocab)])
    cross: key, value per decoder layer (batch, heads, source, head_dim); past/present likewise
    over the decoder's own tokens (batch, heads, past[+seq], head_dim).
    """

    def __init__(self, model: Any, exits: tuple[Exit, ...], *, kind: str,
                 contrast: tuple[Exit, Exit, float, int] | None = None) -> None:
        super().__init__(model, exits, kind=kind, contrast=contrast)
        self.rescale = model.model_dim ** -0.5 if model.config.tie_word_embeddings else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                encoder_attention_mask: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.num_layers
        cross, past = kv[:2 * layers], kv[2 * layers:]
        decoder = self.model.decoder
        hidden = decoder.embed_tokens(input_ids)  # (batch, seq, d_model)
        bias = self_attention_bias(self.model, attention_mask, position_ids).to(hidden.dtype)
        cross_bias = cross_attention_bias(encoder_attention_mask, hidden.dtype)
        recorded, present = [hidden], []
        for i, block in enumerate(decoder.block):
            own, enc_dec, feed_forward = block.layer[0], block.layer[1], block.layer[2]
            attention = own.SelfAttention
            normed = own.layer_norm(hidden)
            key, value = _heads(attention.k(normed), attention), _heads(attention.v(normed), attention)
            if self.kind == DECODE:
                key = torch.cat([past[2 * i], key], dim=2)  # (batch, heads, past+seq, head_dim)
                value = torch.cat([past[2 * i + 1], value], dim=2)
                present.extend([key, value])
            hidden = hidden + _attend(attention, normed, key, value, bias)
            hidden = hidden + _attend(enc_dec.EncDecAttention, enc_dec.layer_norm(hidden), cross[2 * i],
                                      cross[2 * i + 1], cross_bias)
            hidden = feed_forward(hidden)
            recorded.append(hidden)
        recorded[-1] = decoder.final_layer_norm(hidden)  # HF records the top layer after the final norm
        keep = self._keeper(attention_mask)
        final = keep(recorded[-1])  # (batch, [seq,] d_model)
        if self.rescale is not None:  # T5 rescales before its tied head
            final = final * self.rescale
        return tuple(self.project(final, recorded, keep) + present)
