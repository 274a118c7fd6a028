"""FCSA's cross-modal reconstruction-and-swap (CMRS) triplet loss.

Notation as in :mod:`tbps.losses`; each function is pure, its formula in its docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.losses import full_precision, same_identity


def cmrs_triplet_loss(pred: Tensor, target: Tensor, pred_negative_text: Tensor, pids: Tensor,
                      margin: float = 0.5, negative_text_valid: Tensor | None = None,
                      negative_image: Tensor | None = None) -> Tensor:
    """FCSA's image-side cross-modal reconstruction loss (CMRS): a triplet loss on reconstructions.

    ``pred`` p_i: the masked patches of image i predicted from its caption, pooled; ``target`` t_i:
    the original patch features at the same positions, pooled; ``pred_negative_text`` p~_i: the
    same prediction made from the hardest negative caption. All three are L2-normalised, d is the
    Euclidean distance, m the margin::

        d_pos_i  = d(p_i, t_i)
        L_text_i = [m + d_pos_i - d(p~_i, t_i)]_+                  a wrong caption must reconstruct worse
        L_img_i  = [m + d_pos_i - min_{j: y_j != y_i} d(p_i, t_j)]_+   hardest negative image's target
        L        = 1/B sum_i (L_text_i + L_img_i)

    A row without another identity in the batch has no L_img term; ``negative_text_valid`` (B,)
    bool drops L_text where no negative caption existed.

    ``negative_image`` (B,) long, when given, names the negative image n_i of each row instead of
    the hardest reconstruction above (FCSA's code: the other identity's image that scores highest
    for caption i by global text-to-image cosine), and then::

        L_img_i  = [m + d_pos_i - d(p_i, t_{n_i})]_+          (rows where n_i is another identity)
    """
    p = F.normalize(full_precision(pred), dim=-1)
    t = F.normalize(full_precision(target), dim=-1)
    p_neg = F.normalize(full_precision(pred_negative_text), dim=-1)
    d_pos = (p - t).norm(dim=-1)
    text_term = F.relu(margin + d_pos - (p_neg - t).norm(dim=-1))
    if negative_text_valid is not None:
        text_term = text_term * negative_text_valid.to(text_term.dtype)
    different = ~same_identity(pids, torch.float32).bool()
    if negative_image is None:
        distances = torch.cdist(p, t)  # (B, B): d(p_i, t_j)
        hardest = distances.masked_fill(~different, float("inf")).min(dim=1).values
        has_negative = different.any(dim=1)
    else:
        hardest = (p - t[negative_image]).norm(dim=-1)
        has_negative = different.gather(1, negative_image.view(-1, 1)).squeeze(1)
    image_term = F.relu(margin + d_pos - torch.where(has_negative, hardest, d_pos + margin))
    return (text_term + image_term).sum() / p.shape[0]
