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

import torch

from autocontrast.config import DEFAULT_ALPHA, DEFAULT_MINIMUM_CANDIDATES


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
    kth = torch.topk(pu, minimum_candidates, dim=-1).values[..., -1:]  # (..., 1)
    threshold = torch.minimum(top * alpha, kth)
    plausible = pu >= threshold  # (..., vocab): the candidate set A

    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=pu.device)
    scores = log_pu - log_pl
    scores = torch.where(torch.isnan(scores), minus_inf, scores)  # -inf - -inf: no upper mass
    scores = torch.where(plausible, scores, minus_inf)
    # A lower-exit log-prob of -inf makes s = +inf: in the limit those tokens take all of A's mass.
    infinite = scores == float("inf")
    any_infinite = infinite.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=pu.device)
    scores = torch.where(any_infinite, torch.where(infinite, zero, minus_inf), scores)

    mass = torch.where(plausible, pu, zero).sum(dim=-1, keepdim=True)  # (..., 1)
    # log(softmax(s) * mass) in log space: a candidate whose share underflows keeps a finite score
    redistributed = torch.log_softmax(scores, dim=-1) + torch.log(mass)
    return torch.where(plausible, redistributed, log_pu)
