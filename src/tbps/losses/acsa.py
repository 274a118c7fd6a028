"""ACSA's losses: cross-modal projection classification (CMPC) and the cross-scale matching losses.

Notation as in :mod:`tbps.losses`; each function is pure, its formula in its docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.losses import full_precision, matching_kl, matching_target


def cmpc_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, class_weight: Tensor) -> Tensor:
    """Cross-modal projection classification (CMPC, Zhang & Lu, ECCV 2018; used by ACSA).

    Each feature is projected onto the normalised feature of its paired sample in the other
    modality, then classified by a norm-softmax classifier (unit-norm class weights ``w_c``, the
    rows of ``class_weight`` (C, D)), with no bias and no scale, as the ACSA code does::

        v~_i = (v_i . t^_i) t^_i          t^ = t / |t|      (image projected onto its text)
        t~_i = (t_i . v^_i) v^_i          v^ = v / |v|
        L    = CE(W^ v~, y) + CE(W^ t~, y),   W^ = rows of W divided by their L2 norm
    """
    image_feats, text_feats = full_precision(image_feats), full_precision(text_feats)
    image_unit, text_unit = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
    image_proj = (image_feats * text_unit).sum(dim=1, keepdim=True) * text_unit
    text_proj = (text_feats * image_unit).sum(dim=1, keepdim=True) * image_unit
    weight = F.normalize(full_precision(class_weight), dim=1)
    return F.cross_entropy(image_proj @ weight.t(), pids) + F.cross_entropy(text_proj @ weight.t(), pids)

def cross_scale_loss(similarity: Tensor, pids: Tensor, logit_scale: float = 20.0, label_norm: str = "l1",
                     epsilon: float = 1e-8) -> Tensor:
    """ACSA's cross-scale alignment loss: CMPM's matching form on a precomputed similarity matrix.

    ``similarity`` is ``S_ij`` between caption i and image j of the batch (ACSA's cross-attention
    score, in [-1, 1]); it is scaled, turned into a distribution per caption and per image, and
    matched to the normalised same-identity labels::

        p_ij  = softmax_j(tau * S_ij)               (text-to-image)
        p'_ji = softmax_i(tau * S_ij)               (image-to-text)
        q_ij  = Y_ij / |Y_i|_1  (label_norm="l1")  or  Y_ij / |Y_i|_2  ("l2", the ACSA code)
        L     = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
              + 1/B sum_j sum_i p'_ji (log p'_ji - log(q_ji + eps))
    """
    target = matching_target(pids, torch.float32 if similarity.dtype in (torch.float16, torch.bfloat16)
                              else similarity.dtype, label_norm, "cross-scale")
    logits = logit_scale * full_precision(similarity)
    return matching_kl(logits, target, epsilon) + matching_kl(logits.t(), target, epsilon)

def cross_scale_image_rows_loss(i2t: Tensor, t2i: Tensor, pids: Tensor, logit_scale: float = 20.0,
                                label_norm: str = "l2", epsilon: float = 1e-8) -> Tensor:
    """ACSA's cross-scale loss as the authors' code computes it (``utils/metric.py``,
    ``Loss.contrastive_loss``): each direction's score matrix, indexed by image i and caption j, is
    turned into a distribution over the captions of each image and matched to the labels::

        A_ij  = i2t score of image i and caption j    (image scales attend phrases)
        B_ij  = t2i score of image i and caption j    (phrases attend image scales)
        p_ij  = softmax_j(tau * A_ij),   p'_ij = softmax_j(tau * B_ij)
        q_ij  = Y_ij / |Y_i|_2  (label_norm="l2", the code)  or  Y_ij / |Y_i|_1
        L     = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
              + 1/B sum_i sum_j p'_ij (log p'_ij - log(q_ij + eps))

    ``i2t`` and ``t2i`` are given ``(T, G)`` (caption first, as ``cross_scale_similarity`` returns
    them) and transposed here.
    """
    target = matching_target(pids, torch.float32 if i2t.dtype in (torch.float16, torch.bfloat16) else i2t.dtype,
                              label_norm, "cross-scale")
    return (matching_kl(logit_scale * full_precision(i2t).t(), target, epsilon)
            + matching_kl(logit_scale * full_precision(t2i).t(), target, epsilon))
