"""Training losses of text-based person search, one pure function per loss: the shared ones here
(SDM, ID, ITC, CMPM, MLM and their helpers), each method's own in ``tbps.losses.<method>``.

Every function takes tensors and returns a scalar tensor; weighting, logging and which losses a
method uses are the method's business. Notation: a batch of B image features ``v_i``, B text
features ``t_j`` (row i of each is the same pair), person ids ``y_i``, and the same-identity matrix
``Y_ij = [y_i == y_j]`` (more than one positive per row when an identity sampler is used).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def same_identity(pids: Tensor, dtype: torch.dtype) -> Tensor:
    """``Y_ij = [y_i == y_j]`` as floats: the true matching pattern of a batch."""
    pids = pids.reshape(-1)
    return (pids.unsqueeze(1) == pids.unsqueeze(0)).to(dtype)

def full_precision(x: Tensor) -> Tensor:
    """Half-precision features (under AMP) are scored in fp32: a x50 scale amplifies rounding."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

def matching_kl(logits: Tensor, target: Tensor, epsilon: float) -> Tensor:
    """``mean_i sum_j p_ij (log p_ij - log(q_ij + eps))`` with ``p = softmax_j(logits)``.

    ``q`` is not required to sum to one (CMPM's L2-normalised labels do not), which is why this is
    written out instead of calling ``F.kl_div``.
    """
    log_p = F.log_softmax(full_precision(logits), dim=1)  # autocast may hand back half logits
    p = log_p.exp()
    return (p * (log_p - torch.log(target + epsilon))).sum(dim=1).mean()

def sdm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, logit_scale: float | Tensor,
             epsilon: float = 1e-8) -> Tensor:
    """Similarity distribution matching (IRRA, Jiang & Ye, CVPR 2023).

    Matches the distribution of scaled cosine similarities to the normalised identity labels, so
    that every same-identity pair in the batch counts as a positive (InfoNCE would treat them as
    negatives)::

        s_ij   = tau * cos(v_i, t_j)                    tau = logit_scale (1/0.02 in IRRA)
        p_ij   = softmax_j(s_ij)                        (image-to-text)
        q_ij   = Y_ij / sum_k Y_ik
        L_i2t  = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
        L_t2i  = the same with s transposed (text-to-image)
        L      = L_i2t + L_t2i
    """
    image_norm = F.normalize(full_precision(image_feats), dim=-1)
    text_norm = F.normalize(full_precision(text_feats), dim=-1)
    i2t = logit_scale * image_norm @ text_norm.t()
    labels = same_identity(pids, image_norm.dtype)
    target = labels / labels.sum(dim=1, keepdim=True)  # Y is symmetric: the same target both ways
    return matching_kl(i2t, target, epsilon) + matching_kl(i2t.t(), target, epsilon)

def id_loss(image_logits: Tensor, text_logits: Tensor, pids: Tensor) -> Tensor:
    """Identity classification with one classifier shared by both modalities (IRRA's ID loss).

    Sharing the classifier pulls image and text features of a person towards the same class
    weight::

        L = (CE(W v, y) + CE(W t, y)) / 2
    """
    return (F.cross_entropy(full_precision(image_logits), pids)
            + F.cross_entropy(full_precision(text_logits), pids)) / 2

def itc_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: float | Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE image-text contrastive loss (Radford et al. 2021).

    Only the paired caption is a positive; other captions of the same person are negatives::

        s_ij = tau * cos(v_i, t_j)
        L    = ( 1/B sum_i -log softmax_j(s_ij)[j=i] + 1/B sum_j -log softmax_i(s_ij)[i=j] ) / 2
    """
    image_norm = F.normalize(full_precision(image_feats), dim=-1)
    text_norm = F.normalize(full_precision(text_feats), dim=-1)
    logits = logit_scale * image_norm @ text_norm.t()
    logits = full_precision(logits)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2

def matching_target(pids: Tensor, dtype: torch.dtype, label_norm: str, loss: str) -> Tensor:
    """CMPM's true matching distribution q: the same-identity matrix with each row normalised to
    unit L1 ("l1", the CMPM paper) or L2 norm ("l2", the ACSA code)."""
    labels = same_identity(pids, dtype)
    if label_norm == "l1":
        return labels / labels.sum(dim=1, keepdim=True)
    if label_norm == "l2":
        return labels / labels.norm(dim=1, keepdim=True)
    raise ValueError(f"{loss} label_norm must be 'l1' or 'l2', got {label_norm!r}")

def cmpm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, logit_scale: float | Tensor = 1.0,
              label_norm: str = "l1", epsilon: float = 1e-8) -> Tensor:
    """Cross-modal projection matching (CMPM, Zhang & Lu, ECCV 2018).

    Each feature is projected onto the normalised features of the other modality (the scalar
    projection keeps the feature's own norm, unlike a cosine)::

        s_ij  = tau * v_i . t_j / |t_j|            (image-to-text; tau = 1 in the paper)
        p_ij  = softmax_j(s_ij)
        q_ij  = Y_ij / |Y_i|_1   (label_norm="l1", the paper)
              = Y_ij / |Y_i|_2   (label_norm="l2", IRRA's code; not a distribution, sums to sqrt(n_i))
        L_i2t = 1/B sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
        L_t2i = the same with t_i . v_j / |v_j|
        L     = L_i2t + L_t2i
    """
    image_feats, text_feats = full_precision(image_feats), full_precision(text_feats)
    target = matching_target(pids, image_feats.dtype, label_norm, "cmpm")
    image_proj_text = logit_scale * image_feats @ F.normalize(text_feats, dim=-1).t()
    text_proj_image = logit_scale * text_feats @ F.normalize(image_feats, dim=-1).t()
    return matching_kl(image_proj_text, target, epsilon) + matching_kl(text_proj_image, target, epsilon)

def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked-token prediction (IRRA's implicit relation reasoning; BERT's MLM objective).

    Cross-entropy over the vocabulary at the corrupted positions only::

        L = 1/|M| sum_{k in M} -log softmax(z_k)[x_k],   M = {k : labels_k != ignore_index}

    ``logits`` is ``(..., V)`` and ``labels`` the matching ``(...)``. With no corrupted position the
    loss is a zero that still carries the graph, so a step never divides by zero.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    per_token = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none")
    count = (flat_labels != ignore_index).sum().clamp(min=1)  # no host sync, unlike a Python check
    return per_token.sum() / count
