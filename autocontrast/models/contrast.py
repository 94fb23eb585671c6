"""The ACD contrast in torch: the one implementation the models use and the exporter traces.

Semantics (DESIGN.md, identical to the original library's `calculate_contrasted_logits`):

    pu = softmax(u); pl = softmax(l)
    t  = min(alpha * max(pu), k-th largest pu)        # k = minimum_candidates
    A  = {tokens with pu >= t}
    s  = log pu - log pl on A, -inf elsewhere
    q  = softmax(s) * sum(pu over A)
    out = log(q on A, pu elsewhere)

Numerically safe where the original is not: log-probabilities come from log_softmax, so a
probability that underflows to 0 never yields NaN; a lower-exit logit of -inf inside A gives
s = +inf, resolved as the limit (those tokens share A's mass); a token of zero upper probability
inside A (possible only when t = 0) gets no mass.

>>> import torch
>>> u, l = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
>>> calculate_contrasted_logits(u, l).exp().sum(-1)
tensor([1.0000])
"""

from __future__ import annotations

import math

import torch

from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES, DEFAULT_RELATIVE_TOP


def calculate_contrasted_logits(upper_layer_logits: torch.Tensor, lower_layer_logits: torch.Tensor,
                                minimum_candidates: int = DEFAULT_MINIMUM_CANDIDATES,
                                alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Contrast scores (log-probabilities) of the upper exit against the lower one.

    Works on any leading shape: (..., vocab) -> (..., vocab), computed in float32 at least.
    """
    dtype = torch.promote_types(upper_layer_logits.dtype, torch.float32)
    log_pu = torch.log_softmax(upper_layer_logits.to(dtype), dim=-1)  # (..., vocab)
    log_pl = torch.log_softmax(lower_layer_logits.to(dtype), dim=-1)  # (..., vocab)
    pu = log_pu.exp()

    top = pu.max(dim=-1, keepdim=True).values  # (..., 1)
    # the k-th largest; for k = 1 that is the maximum (no TopK pass over the vocabulary in the graph)
    kth = top if minimum_candidates == 1 else torch.topk(pu, minimum_candidates, dim=-1).values[..., -1:]
    threshold = torch.minimum(top * alpha, kth)
    plausible = pu >= threshold  # (..., vocab): the candidate set A

    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=pu.device)
    scores = log_pu - log_pl
    # off A, and where -inf - -inf left NaN (no upper mass): -inf, in one pass
    scores = torch.where(plausible & ~torch.isnan(scores), scores, minus_inf)
    scores = _infinite_takes_all(scores)
    zero = torch.zeros((), dtype=dtype, device=pu.device)

    mass = torch.where(plausible, pu, zero).sum(dim=-1, keepdim=True)  # (..., 1)
    # log(softmax(s) * mass) in log space: a candidate whose share underflows keeps a finite score
    redistributed = torch.log_softmax(scores, dim=-1) + torch.log(mass)
    return torch.where(plausible, redistributed, log_pu)


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """JSD(p || q) = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2, in nats, over the last axis
    (0 log 0 = 0: a zero probability's 0 * -inf adds nothing). log_p, log_q: (..., vocab) log-probabilities
    -> (...). Summed per token, as the runtime's NumPy twin sums it."""
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log((p + q) * 0.5)
    terms = p * (log_p - log_m) + q * (log_q - log_m)
    return 0.5 * torch.where(torch.isnan(terms), torch.zeros((), dtype=terms.dtype), terms).sum(dim=-1)


def dola_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor,
                relative_top: float = DEFAULT_RELATIVE_TOP) -> torch.Tensor:
    """DoLa (Chuang et al. 2023): the mature layer's log-probabilities minus a premature layer's.

        lf = log_softmax(final); lj = log_softmax(premature[j])
        j* = argmax_j JSD(pf || pj)                     # per row (and position); the first on ties
        kept = {tokens with lf >= max(lf) + log(relative_top)}
        out = lf - lj* on kept, -inf elsewhere

    As the paper defines JSD; Hugging Face's `dola_decoding` instead takes KL(m || .) averaged over the
    vocabulary and picks one layer for the whole batch. A premature log-probability of -inf on a kept
    token (s = +inf) is resolved as the contrast resolves it: those tokens share the choice.
    final_logits: (..., vocab); premature_logits: (candidates, ..., vocab) -> (..., vocab), float32 at least.
    """
    dtype = torch.promote_types(final_logits.dtype, torch.float32)
    log_final = torch.log_softmax(final_logits.to(dtype), dim=-1)  # (..., vocab)
    log_premature = torch.log_softmax(premature_logits.to(dtype), dim=-1)  # (candidates, ..., vocab)
    divergence = jensen_shannon(log_final.unsqueeze(0), log_premature)  # (candidates, ...)
    chosen = divergence.argmax(dim=0)  # (...)
    base = torch.gather(log_premature, 0, chosen.unsqueeze(0).unsqueeze(-1).expand_as(log_premature[:1]))[0]
    kept = log_final >= log_final.max(dim=-1, keepdim=True).values + math.log(relative_top)
    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=log_final.device)
    return _infinite_takes_all(torch.where(kept, log_final - base, minus_inf))


def _infinite_takes_all(scores: torch.Tensor) -> torch.Tensor:
    """A lower exit's log-probability of -inf on a candidate makes its score +inf: in the limit those tokens take
    the whole choice (0 each, every other token -inf) in their row; rows without one are unchanged."""
    infinite = scores == float("inf")
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    minus_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    # a row holds +inf exactly where its maximum is +inf (no NaN reaches here): one max, not a count
    any_infinite = scores.max(dim=-1, keepdim=True).values == float("inf")
    return torch.where(any_infinite, torch.where(infinite, zero, minus_inf), scores)
