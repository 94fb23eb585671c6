"""The traceable module behind every exported graph: flat tensors in, exit logits out.

`ExitGraph` wraps a multi-exit model so that `torch.onnx.export` sees only flat tensors:
`input_ids`, `attention_mask`, `position_ids` and, for decode graphs, the past KV cache as
2 * num_layers tensors (key, value of layer 0, 1, ...). It rebuilds a `DynamicCache` inside
(transformers >= 4.5x speaks Cache objects, not tuples) and returns the present cache flat again.

Exits that share one projection matrix (the model's own head in the shared modes) are stacked
and projected in one matrix product: `(batch, n_exits, hidden) @ (hidden, vocab)`.

With `buffered=True` (the Llama family's decode graphs) attention is ORT's GroupQueryAttention over
a KV buffer shared by past and present (see `autocontrast.export.attention`): the past inputs are
buffers of any capacity, each row's cache left-aligned with its own length taken from the mask,
and a chunk of new tokens right-padded; the presents are the same buffers, written in place.

An early-exit graph (`layers=k`) runs only the first k decoder layers: the layers above k and the
final norm are taken off the model while it runs (`first_layers`), so the trace never sees them,
and its KV cache has k layers.

>>> graph = ExitGraph(model, (30, 15), kind="decode", contrast=(30, 15, 0.1, 1))  # doctest: +SKIP
>>> exit_logits, contrast_scores, *present = graph(ids, mask, positions, *past)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from autocontrast.bundle import DECODE, MIXED, SCORE
from autocontrast.config import Exit
from autocontrast.export.attention import (
    group_query_attention,
    last_valid,
    mixed_query_attention,
    rotary_tables,
)
from autocontrast.export.plan import FusedContrast, FusedDola
from autocontrast.models.contrast import calculate_contrasted_logits, dola_scores


def projection_groups(model: Any, exits: tuple[Exit, ...]) -> list[tuple[nn.Linear, tuple[Exit, ...]]]:
    """Exits grouped by the head that projects them (one matrix product per group), order kept."""
    groups: dict[int, tuple[nn.Linear, list[Exit]]] = {}
    for exit_ in exits:
        head = model.lm_head if model.uses_original_logits(exit_) else model.exit_head(exit_)
        groups.setdefault(id(head), (head, []))[1].append(exit_)
    return [(head, tuple(members)) for head, members in groups.values()]


def graph_exit_order(model: Any, exits: tuple[Exit, ...]) -> tuple[Exit, ...]:
    """The order in which a graph returns `exits`: grouped by projection, first-seen order."""
    return tuple(e for _, members in projection_groups(model, exits) for e in members)


@contextlib.contextmanager
def first_layers(model: Any, layers: int | None) -> Iterator[None]:
    """Run `model` with only its first `layers` decoder layers and no final norm (None: unchanged).

    The top recorded hidden state is then layer `layers`' own output, which the exit normalises
    itself (`exit_hidden`), exactly as in the full model.
    """
    if layers is None or layers == model.num_layers:
        yield
        return
    family, body = model.family, model.base_model
    stack, norm = getattr(body, family.layers_attr), getattr(body, family.final_norm_attr)
    setattr(body, family.layers_attr, nn.ModuleList(list(stack)[:layers]))
    setattr(body, family.final_norm_attr, nn.Identity())
    try:
        yield
    finally:
        setattr(body, family.layers_attr, stack)
        setattr(body, family.final_norm_attr, norm)


class ExitGraph(nn.Module):
    """A multi-exit model as a function of flat tensors (what the ONNX graph computes).

    kind DECODE: (input_ids, attention_mask, position_ids, *past) ->
        (exit_logits (batch, n_exits, vocab) of the last position, [contrast (batch, vocab)], [DoLa (batch, vocab)],
         *present)
    kind SCORE: (input_ids, attention_mask, position_ids) -> exit_logits (batch, seq, n_exits, vocab)
    kind MIXED (buffered only): (input_ids (rows, 1), attention_mask, position_ids, chunk_input_ids (1, tokens),
        chunk_attention_mask, chunk_position_ids, *past, *chunk_past) -> (exit_logits (rows + 1, n_exits, vocab):
        the decode rows', then the chunk's last token, [contrast], [DoLa], *present, *chunk_present): one decode
        step of a batch and one prompt's chunk with one pass over the weights (every op but attention runs over
        their tokens as one flat sequence)
    `layers=k`: only the first k layers run (an early exit; every exit must be a layer <= k), and
    the past and present caches have k layers. `buffered`: GroupQueryAttention over in-place KV
    buffers (decode graphs only).
    """

    def __init__(self, model: Any, exits: tuple[Exit, ...], *, kind: str,
                 contrast: FusedContrast | None = None, layers: int | None = None,
                 buffered: bool = False, dola: FusedDola | None = None) -> None:
        super().__init__()
        if kind not in (DECODE, SCORE, MIXED):
            raise ValueError(f"unknown graph kind {kind!r}")
        if kind == MIXED and not buffered:
            raise ValueError("a mixed-step graph attends through KV buffers (buffered=True)")
        if layers is not None and not all(isinstance(e, int) and not model.uses_original_logits(e) and e <= layers
                                          for e in exits):
            raise ValueError(f"a graph of the first {layers} layers cannot return exits {exits}")
        self.model = model
        self.kind = kind
        self.groups = projection_groups(model, exits)
        self.exits = tuple(e for _, members in self.groups for e in members)
        self.contrast = contrast
        self.dola = dola  # (mature exit, premature candidates, relative_top)
        self.layers = layers
        self.buffered = buffered and kind in (DECODE, MIXED)
        self.rotary = rotary_tables(model) if self.buffered else None  # the op rotates where it can
        self.num_layers = model.num_layers if layers is None else layers  # layers computed (and cached)
        self.needs_hidden = any(not model.uses_original_logits(e) for e in self.exits)
        # A new Module is in training mode, and the exporter restores the mode it found: stay in eval
        # so dropout never runs (in the trace or in the model afterwards).
        self.eval()

    def _cache(self, past: tuple[torch.Tensor, ...]) -> DynamicCache:
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)  # (batch, kv_heads, past, head_dim)
        return cache

    def _prepared_hidden(self, exit_: Exit, final: torch.Tensor, hidden_states: Any,
                         keep: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What exit `exit_`'s head multiplies: (batch, [seq,] hidden)."""
        if self.model.uses_original_logits(exit_):
            return final
        return self.model.exit_hidden(exit_, keep(hidden_states[exit_]))

    def _keeper(self, attention_mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The positions a graph projects: a decode graph only each row's last new token
        ((batch, seq, hidden) -> (batch, hidden)); a score graph every position."""
        if self.kind != DECODE:
            return lambda hidden: hidden
        if self.buffered:  # right-padded chunk: row b's last new token is at min(seq, T_b) - 1
            return lambda hidden: last_valid(hidden, attention_mask)
        return lambda hidden: hidden[:, -1, :]  # left-padded: every row ends at the last column

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kind == MIXED:
            return self._mixed(input_ids, attention_mask, position_ids, *past)
        body = self.model.base_model
        keep = self._keeper(attention_mask)
        if self.buffered:
            with first_layers(self.model, self.layers), \
                    group_query_attention(self.model, past, attention_mask, position_ids, self.rotary) as attention:
                out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                           output_hidden_states=self.needs_hidden, return_dict=True)
            return tuple(self.project(keep(out.last_hidden_state), out.hidden_states, keep) + attention.present)
        cache = self._cache(past) if self.kind == DECODE else None
        with first_layers(self.model, self.layers):
            out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=self.kind == DECODE,
                       output_hidden_states=self.needs_hidden, return_dict=True)
        results = self.project(keep(out.last_hidden_state), out.hidden_states, keep)
        if self.kind == DECODE:
            results.extend(_flat_present(out.past_key_values, self.num_layers))
        return tuple(results)

    def _mixed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               chunk_ids: torch.Tensor, chunk_mask: torch.Tensor, chunk_positions: torch.Tensor,
               *buffers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A MIXED graph's forward: the decode rows' tokens, then the chunk's, as one flat sequence."""
        rows, caches = input_ids.shape[0], len(buffers) // 2
        flat_ids = torch.cat([input_ids.reshape(1, -1), chunk_ids], dim=1)  # (1, N)
        flat_positions = torch.cat([position_ids.reshape(1, -1), chunk_positions], dim=1)

        def keep(hidden: torch.Tensor) -> torch.Tensor:  # (1, N, hidden) -> (rows + 1, hidden)
            return torch.cat([hidden[0, :rows], last_valid(hidden[:, rows:], chunk_mask)])

        with first_layers(self.model, self.layers), mixed_query_attention(
                self.model, (buffers[:caches], attention_mask, position_ids),
                (buffers[caches:], chunk_mask, chunk_positions), self.rotary) as attention:
            out = self.model.base_model(input_ids=flat_ids, position_ids=flat_positions, use_cache=False,
                                        output_hidden_states=self.needs_hidden, return_dict=True)
        return tuple(self.project(keep(out.last_hidden_state), out.hidden_states, keep)
                     + attention.decode.present + attention.chunk.present)

    def project(self, final: torch.Tensor, hidden_states: Any,
                keep: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """[exit logits, (contrast), (DoLa)] from the top's output and every layer's recorded hidden state.

        final: (batch, [seq,] hidden), what the original head multiplies; hidden_states[i]: (batch, seq, hidden),
        of which `keep` takes the positions the graph projects
        """
        stacked = []
        for head, members in self.groups:
            hidden = torch.stack([self._prepared_hidden(e, final, hidden_states, keep) for e in members],
                                 dim=-2)  # (batch, [seq,] n_group, hidden)
            stacked.append(head(hidden.to(head.weight.dtype)))  # (batch, [seq,] n_group, vocab)
        logits = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=-2)
        # every head's logits scaled as the model's own head scales them (Granite's logits_scaling)
        logits = self.model.family.scale_logits(self.model.config, logits.float())
        results = [logits]
        if self.contrast is not None:
            upper, lower, alpha, k = self.contrast
            u = logits.select(-2, self.exits.index(upper))  # (batch, [seq,] vocab)
            lo = logits.select(-2, self.exits.index(lower))
            results.append(calculate_contrasted_logits(u, lo, minimum_candidates=k, alpha=alpha))
        if self.dola is not None:
            mature, candidates, relative_top = self.dola
            premature = torch.stack([logits.select(-2, self.exits.index(e)) for e in candidates])  # (n, batch, [seq,] vocab)
            results.append(dola_scores(logits.select(-2, self.exits.index(mature)), premature, relative_top=relative_top))
        return results


def _flat_present(cache: Any, num_layers: int) -> list[torch.Tensor]:
    flat = []
    for layer in range(num_layers):
        layer_cache = cache.layers[layer]
        flat.extend([layer_cache.keys, layer_cache.values])  # (batch, kv_heads, past+seq, head_dim)
    return flat
