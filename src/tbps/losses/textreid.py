"""TextReID's losses (Han et al., BMVC 2021): instance loss, global alignment, and the
MoCo-style queue InfoNCE of its momentum encoders.

Notation as in :mod:`tbps.losses`; each function is pure, its formula in its docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.losses import full_precision, same_identity


def instance_loss(image_feats: Tensor, text_feats: Tensor, projection: Tensor, pids: Tensor,
                  epsilon: float = 0.1) -> Tensor:
    """Instance loss of TextReID (Han et al., BMVC 2021): identity classification through one
    projection shared by both modalities, with normalised class columns and label smoothing.

    The features are not normalised (as the authors' code); only the columns of ``projection``
    ``W`` (D, C) are, so every identity is a unit direction both modalities are pulled towards::

        W~_c  = W_c / |W_c|
        q_c   = (1 - eps) [c = y] + eps / C                 (label smoothing, eps = 0.1)
        CE(z) = -sum_c q_c log softmax(z)_c
        L     = 1/B sum_i CE(v_i W~) + 1/B sum_i CE(t_i W~)  (a sum over modalities, not a mean)
    """
    weight = F.normalize(full_precision(projection), dim=0)
    image_logits = full_precision(image_feats) @ weight
    text_logits = full_precision(text_feats) @ weight
    return (F.cross_entropy(image_logits, pids, label_smoothing=epsilon)
            + F.cross_entropy(text_logits, pids, label_smoothing=epsilon))

def global_align_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, alpha: float = 0.6,
                      beta: float = 0.4, scale_pos: float = 10.0, scale_neg: float = 40.0) -> Tensor:
    """Global alignment loss of TextReID (Han et al., BMVC 2021), a binomial-deviance form.

    Cosine similarities of every image-text pair in the batch are pushed above ``alpha`` for the
    same identity and below ``beta`` otherwise, with a steeper slope on the negatives::

        S_ij = cos(v_i, t_j)
        L    = 2/B [ sum_{Y_ij=1} log(1 + exp(-scale_pos (S_ij - alpha)))
                   + sum_{Y_ij=0} log(1 + exp( scale_neg (S_ij - beta))) ]
    """
    image_norm = F.normalize(full_precision(image_feats), dim=-1)
    text_norm = F.normalize(full_precision(text_feats), dim=-1)
    similarity = image_norm @ text_norm.t()
    positive = same_identity(pids, similarity.dtype).bool()
    loss_pos = F.softplus(-scale_pos * (similarity - alpha))  # log(1 + exp(x)), stable
    loss_neg = F.softplus(scale_neg * (similarity - beta))
    total = torch.where(positive, loss_pos, loss_neg).sum()
    return 2.0 * total / pids.numel()

def queue_infonce_loss(queries: Tensor, positive_keys: Tensor, queue: Tensor, query_pids: Tensor,
                       queue_pids: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE of a query against its paired key and a queue of keys (MoCo, He et al. 2020), with
    the same-identity entries of the queue removed from the negatives (TextReID's cross-modal
    momentum contrast: image queries against text keys, or the reverse).

    ``queries`` (B, D) and ``positive_keys`` (B, D) are L2-normalised, row i of each the same pair;
    ``queue`` (K, D) holds normalised keys of earlier batches and ``queue_pids`` (K,) their person
    ids, -1 for a slot not filled yet (never a negative)::

        l+_i  = q_i . k_i / T
        N_i   = {j : queue_pid_j != y_i and queue_pid_j >= 0}
        L     = 1/B sum_i -log( exp(l+_i) / (exp(l+_i) + sum_{j in N_i} exp(q_i . Q_j / T)) )

    With no negative left a row's loss is 0. Call it once per direction.
    """
    queries, positive_keys = full_precision(queries), full_precision(positive_keys)
    positive = (queries * positive_keys.to(queries.dtype)).sum(dim=1, keepdim=True)
    negative = queries @ queue.to(queries.dtype).t()
    excluded = (queue_pids.view(1, -1) == query_pids.view(-1, 1)) | (queue_pids.view(1, -1) < 0)
    negative = negative.masked_fill(excluded, float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
