"""CFFA's multi-association learning (MAL) loss and its negative-term scale.

Notation as in :mod:`tbps.losses`; each function is pure, its formula in its docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.losses import full_precision, same_identity


def mal_negative_scale(batch_size: int) -> float:
    """CFFA's code scales MAL's negative term by ``floor(1000 / B) / 1000`` (1/B floored to three
    decimals), not by tau: 0.015 = tau at B = 64, 0.031 at B = 32, 0.007 at B = 128."""
    return math.floor(1000 / batch_size) / 1000

def mal_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, margin: float = 0.1, tau: float = 0.015,
             reduction: str = "mean", negative_scale: float | None = None) -> Tensor:
    """Multi-association learning (MAL, CFFA): a soft-positive, smooth-hardest-negative ranking loss.

    Every same-identity pair is a positive, weighted by how well it already matches (a softmax over
    the positives, without gradient), and the negatives enter through a smooth maximum, so the
    hardest negatives dominate without discarding the rest::

        s_ij      = cos(t_i, v_j)                       (text i against image j)
        P_i, N_i  = {j : y_j == y_i},  {j : y_j != y_i}
        a_ij      = softmax_{j in P_i}(s_ij / tau)       (no gradient)
        L_t2i(i)  = [ m - sum_{j in P_i} a_ij s_ij + c * log sum_{j in N_i} exp(s_ij / tau) ]_+
        L_i2t(i)  = the same on s transposed (image i against the texts)
        L         = 1/B sum_i (L_t2i(i) + L_i2t(i))     (reduction="mean")
                  =     sum_i (L_t2i(i) + L_i2t(i))     (reduction="sum", CFFA's code)
                  =     [L_t2i(i) + L_i2t(i)]_i          (reduction="none": which pairs still pull)

    ``m = margin`` (0.1) and ``tau`` (0.015) are CFFA's. ``c = negative_scale``: tau when None (the
    paper's smooth maximum), ``mal_negative_scale(B)`` in CFFA's code. A query without negatives
    (the whole batch is one person) contributes 0.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"mal_loss reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    image_norm = F.normalize(full_precision(image_feats), dim=-1)
    text_norm = F.normalize(full_precision(text_feats), dim=-1)
    scores = text_norm @ image_norm.t()
    positive = same_identity(pids, scores.dtype).bool()
    scale = tau if negative_scale is None else float(negative_scale)

    def one_direction(s: Tensor) -> Tensor:
        logits = s / tau
        alpha = torch.softmax(logits.masked_fill(~positive, float("-inf")), dim=1).detach()
        has_negative = (~positive).any(dim=1)
        # rows without negatives: a finite placeholder keeps logsumexp's gradient free of NaN
        negative_logits = logits.masked_fill(positive, float("-inf"))
        negative_logits = torch.where(has_negative.unsqueeze(1), negative_logits, torch.zeros_like(logits))
        cost = (margin - (alpha * s).sum(dim=1) + scale * torch.logsumexp(negative_logits, dim=1)).clamp(min=0)
        return torch.where(has_negative, cost, torch.zeros_like(cost))

    per_query = one_direction(scores) + one_direction(scores.t())
    if reduction == "none":
        return per_query
    return per_query.sum() if reduction == "sum" else per_query.mean()
