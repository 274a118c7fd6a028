"""Training losses of text-based person search, one pure function per loss.

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


def _same_identity(pids: Tensor, dtype: torch.dtype) -> Tensor:
    """``Y_ij = [y_i == y_j]`` as floats: the true matching pattern of a batch."""
    pids = pids.reshape(-1)
    return (pids.unsqueeze(1) == pids.unsqueeze(0)).to(dtype)


def _full_precision(x: Tensor) -> Tensor:
    """Half-precision features (under AMP) are scored in fp32: a x50 scale amplifies rounding."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _matching_kl(logits: Tensor, target: Tensor, epsilon: float) -> Tensor:
    """``mean_i sum_j p_ij (log p_ij - log(q_ij + eps))`` with ``p = softmax_j(logits)``.

    ``q`` is not required to sum to one (CMPM's L2-normalised labels do not), which is why this is
    written out instead of calling ``F.kl_div``.
    """
    log_p = F.log_softmax(_full_precision(logits), dim=1)  # autocast may hand back half logits
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
    image_norm = F.normalize(_full_precision(image_feats), dim=-1)
    text_norm = F.normalize(_full_precision(text_feats), dim=-1)
    i2t = logit_scale * image_norm @ text_norm.t()
    labels = _same_identity(pids, image_norm.dtype)
    target = labels / labels.sum(dim=1, keepdim=True)  # Y is symmetric: the same target both ways
    return _matching_kl(i2t, target, epsilon) + _matching_kl(i2t.t(), target, epsilon)


def id_loss(image_logits: Tensor, text_logits: Tensor, pids: Tensor) -> Tensor:
    """Identity classification with one classifier shared by both modalities (IRRA's ID loss).

    Sharing the classifier pulls image and text features of a person towards the same class
    weight::

        L = (CE(W v, y) + CE(W t, y)) / 2
    """
    return (F.cross_entropy(_full_precision(image_logits), pids)
            + F.cross_entropy(_full_precision(text_logits), pids)) / 2


def itc_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: float | Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE image-text contrastive loss (Radford et al. 2021).

    Only the paired caption is a positive; other captions of the same person are negatives::

        s_ij = tau * cos(v_i, t_j)
        L    = ( 1/B sum_i -log softmax_j(s_ij)[j=i] + 1/B sum_j -log softmax_i(s_ij)[i=j] ) / 2
    """
    image_norm = F.normalize(_full_precision(image_feats), dim=-1)
    text_norm = F.normalize(_full_precision(text_feats), dim=-1)
    logits = logit_scale * image_norm @ text_norm.t()
    logits = _full_precision(logits)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _matching_target(pids: Tensor, dtype: torch.dtype, label_norm: str, loss: str) -> Tensor:
    """CMPM's true matching distribution q: the same-identity matrix with each row normalised to
    unit L1 ("l1", the CMPM paper) or L2 norm ("l2", the ACSA code)."""
    labels = _same_identity(pids, dtype)
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
    image_feats, text_feats = _full_precision(image_feats), _full_precision(text_feats)
    target = _matching_target(pids, image_feats.dtype, label_norm, "cmpm")
    image_proj_text = logit_scale * image_feats @ F.normalize(text_feats, dim=-1).t()
    text_proj_image = logit_scale * text_feats @ F.normalize(image_feats, dim=-1).t()
    return _matching_kl(image_proj_text, target, epsilon) + _matching_kl(text_proj_image, target, epsilon)


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
    weight = F.normalize(_full_precision(projection), dim=0)
    image_logits = _full_precision(image_feats) @ weight
    text_logits = _full_precision(text_feats) @ weight
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
    image_norm = F.normalize(_full_precision(image_feats), dim=-1)
    text_norm = F.normalize(_full_precision(text_feats), dim=-1)
    similarity = image_norm @ text_norm.t()
    positive = _same_identity(pids, similarity.dtype).bool()
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
    queries, positive_keys = _full_precision(queries), _full_precision(positive_keys)
    positive = (queries * positive_keys.to(queries.dtype)).sum(dim=1, keepdim=True)
    negative = queries @ queue.to(queries.dtype).t()
    excluded = (queue_pids.view(1, -1) == query_pids.view(-1, 1)) | (queue_pids.view(1, -1) < 0)
    negative = negative.masked_fill(excluded, float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


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
    p = F.normalize(_full_precision(pred), dim=-1)
    t = F.normalize(_full_precision(target), dim=-1)
    p_neg = F.normalize(_full_precision(pred_negative_text), dim=-1)
    d_pos = (p - t).norm(dim=-1)
    text_term = F.relu(margin + d_pos - (p_neg - t).norm(dim=-1))
    if negative_text_valid is not None:
        text_term = text_term * negative_text_valid.to(text_term.dtype)
    different = ~_same_identity(pids, torch.float32).bool()
    if negative_image is None:
        distances = torch.cdist(p, t)  # (B, B): d(p_i, t_j)
        hardest = distances.masked_fill(~different, float("inf")).min(dim=1).values
        has_negative = different.any(dim=1)
    else:
        hardest = (p - t[negative_image]).norm(dim=-1)
        has_negative = different.gather(1, negative_image.view(-1, 1)).squeeze(1)
    image_term = F.relu(margin + d_pos - torch.where(has_negative, hardest, d_pos + margin))
    return (text_term + image_term).sum() / p.shape[0]


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

    ``m = margin`` (0.1) and ``tau`` (0.015) are CFFA's. ``c = negative_scale``: tau when None (the
    paper's smooth maximum), ``mal_negative_scale(B)`` in CFFA's code. A query without negatives
    (the whole batch is one person) contributes 0.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mal_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    image_norm = F.normalize(_full_precision(image_feats), dim=-1)
    text_norm = F.normalize(_full_precision(text_feats), dim=-1)
    scores = text_norm @ image_norm.t()
    positive = _same_identity(pids, scores.dtype).bool()
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
    return per_query.sum() if reduction == "sum" else per_query.mean()


def ranking_loss(similarity: Tensor, pids: Tensor, margin: float | Tensor, negatives: str = "hardest") -> Tensor:
    """Bidirectional ranking (triplet) loss on an image-text similarity matrix.

    Every same-identity pair is a positive; each is compared with the negatives of its image (the
    captions of other people) and of its caption (the images of other people). ``"hardest"``: the
    most similar negative only, as in VSE++ and the part-level TBPS methods (PCC's "ranking loss")::

        s_ij = similarity of image i and caption j           P = {(i, j) : y_i == y_j}
        h_i  = max_{l : y_l != y_i} s_il                     (hardest caption for image i)
        g_j  = max_{l : y_l != y_j} s_lj                     (hardest image for caption j)
        L    = 1/(2|P|) sum_{(i,j) in P} ([m - s_ij + h_i]_+ + [m - s_ij + g_j]_+)

    ``"all"``: the mean hinge over every negative instead of the hardest one (VSE++'s "sum of
    hinges", more gradient early in training from random weights)::

        L    = 1/(2|P|) sum_{(i,j) in P} (mean_{l : y_l != y_i} [m - s_ij + s_il]_+
                                          + mean_{l : y_l != y_j} [m - s_ij + s_lj]_+)

    ``margin`` m is a scalar (a 0-d tensor is allowed, e.g. CMR's per-part margin) or a ``(B, B)``
    matrix ``M[a, b]``: the margin of the negative pair (image a, caption b), as CMR's per-pair
    commonality gives. Then the image term of positive (i, j) against caption l uses ``M[i, l]``,
    the text term against image l uses ``M[l, j]``, and "hardest" is the most violating negative,
    ``max_l (s_il + M[i, l])`` (for a scalar m the same negative as ``max_l s_il``). A row without
    any negative contributes nothing.
    """
    similarity = _full_precision(similarity)
    positives = _same_identity(pids, torch.bool)
    negative = ~positives
    has_text = negative.any(dim=1)
    has_image = negative.any(dim=0)
    violation = similarity + margin  # s + m of every (image, caption) pair, read at the negatives
    if negatives == "hardest":
        lowest = torch.finfo(similarity.dtype).min
        hardest_text = torch.where(negative, violation, lowest).amax(dim=1)  # h_i + m, per image row
        hardest_image = torch.where(negative, violation, lowest).amax(dim=0)  # g_j + m, per caption column
        image_term = F.relu(hardest_text.unsqueeze(1) - similarity) * has_text.unsqueeze(1)
        text_term = F.relu(hardest_image.unsqueeze(0) - similarity) * has_image.unsqueeze(0)
    elif negatives == "all":
        weight = negative.to(similarity.dtype)
        # [i, j, l]: positive (i, j) against caption l of image i / image l of caption j
        image_hinge = F.relu(violation.unsqueeze(1) - similarity.unsqueeze(2))
        image_term = (image_hinge * weight.unsqueeze(1)).sum(dim=2) / weight.sum(dim=1, keepdim=True).clamp(min=1)
        text_hinge = F.relu(violation.t().unsqueeze(0) - similarity.unsqueeze(2))
        text_term = (text_hinge * weight.t().unsqueeze(0)).sum(dim=2) / weight.sum(dim=0).unsqueeze(0).clamp(min=1)
    else:
        raise ValueError(f"ranking negatives must be 'hardest' or 'all', got {negatives!r}")
    per_pair = (image_term + text_term) * positives
    return per_pair.sum() / (2 * positives.sum().clamp(min=1))


def part_similarities(image_parts: Tensor, text_parts: Tensor) -> Tensor:
    """``S^k_ij = cos(v_i^k, t_j^k)``: ``(K, B, B)`` from ``(B, K, D)`` image and caption parts."""
    image_norm = F.normalize(_full_precision(image_parts), dim=-1)
    text_norm = F.normalize(_full_precision(text_parts), dim=-1)
    return torch.einsum("ikd,jkd->kij", image_norm, text_norm)


def cmr_margins(part_similarity: Tensor, pids: Tensor, margin: float) -> Tensor:
    """Per-part margins of the commonality-based margin ranking loss, ``(K,)``, without gradient.

    The commonality of part k is how alike that part is across *different* people in the batch;
    a common part (everyone's black shoes) gets a small margin, a distinctive one the full margin::

        N   = {(i, j) : y_i != y_j}
        c_k = clamp(1/|N| sum_{(i,j) in N} S^k_ij, 0, 1)
        m_k = m0 * (1 - c_k)

    With no negative pair in the batch, c_k = 0 (the full margin).
    """
    with torch.no_grad():
        negatives = ~_same_identity(pids, torch.bool)
        count = negatives.sum().clamp(min=1)
        commonality = (part_similarity.detach() * negatives).sum(dim=(1, 2)) / count
        return margin * (1 - commonality.clamp(0.0, 1.0))


def cmr_pair_margins(image_parts: Tensor, text_parts: Tensor, margin: float) -> Tensor:
    """Per-part, per-pair margins of CMR (``method.cmr_commonality=pair``), ``(K, B, B)``, no gradient.

    The commonality of part k between person a and person b is how alike that part is *within*
    each modality (their images' stripe k, their captions' part k), and only their negative pair
    gets the smaller margin, not the whole batch::

        c^k_ab = (cos(v_a^k, v_b^k) + cos(t_a^k, t_b^k)) / 2
        M^k_ab = m0 * (1 - clamp(c^k_ab, 0, 1))          (margin of the negative pair image a, caption b)

    Row a of ``image_parts`` and of ``text_parts`` is one image-caption pair of the batch.
    """
    with torch.no_grad():
        image_norm = F.normalize(_full_precision(image_parts.detach()), dim=-1)
        text_norm = F.normalize(_full_precision(text_parts.detach()), dim=-1)
        commonality = (torch.einsum("akd,bkd->kab", image_norm, image_norm)
                       + torch.einsum("akd,bkd->kab", text_norm, text_norm)) / 2
        return margin * (1 - commonality.clamp(0.0, 1.0))


CMR_COMMONALITY = ("batch", "pair")


def cmr_loss(image_parts: Tensor, text_parts: Tensor, pids: Tensor, margin: float,
             adaptive: bool = True, negatives: str = "hardest", commonality: str = "batch") -> Tensor:
    """Commonality-based margin ranking (CMR) loss on fine part embeddings (PCC, Park et al. 2024).

    Our reading of the method (the paper's formula is not in our sources; see ``models/pcc.py``):
    a ranking loss per part k whose margin shrinks where part k is common across identities::

        S^k_ij = cos(v_i^k, t_j^k)                     (image part k of i, caption part k of j)
        m_k    = cmr_margins(S, y, m0)                 commonality="batch": one margin a part
        M^k    = cmr_pair_margins(v, t, m0)            commonality="pair": one a part and negative pair
        L      = 1/K sum_k ranking_loss(S^k, y, m_k or M^k)   (``negatives``: hardest or all, as there)

    ``adaptive=False`` is the fixed-margin ranking loss (m0 everywhere). ``image_parts`` and
    ``text_parts`` are ``(B, K, D)``.
    """
    if commonality not in CMR_COMMONALITY:
        raise ValueError(f"CMR commonality must be one of {CMR_COMMONALITY}, got {commonality!r}")
    similarity = part_similarities(image_parts, text_parts)
    if not adaptive:
        margins = similarity.new_full((similarity.shape[0],), float(margin))
    elif commonality == "batch":
        margins = cmr_margins(similarity, pids, margin)
    else:
        margins = cmr_pair_margins(image_parts, text_parts, margin)
    losses = [ranking_loss(similarity[k], pids, margins[k], negatives) for k in range(similarity.shape[0])]
    return torch.stack(losses).mean()


def cmpc_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, class_weight: Tensor) -> Tensor:
    """Cross-modal projection classification (CMPC, Zhang & Lu, ECCV 2018; used by ACSA).

    Each feature is projected onto the normalised feature of its paired sample in the other
    modality, then classified by a norm-softmax classifier (unit-norm class weights ``w_c``, the
    rows of ``class_weight`` (C, D)), with no bias and no scale, as the ACSA code does::

        v~_i = (v_i . t^_i) t^_i          t^ = t / |t|      (image projected onto its text)
        t~_i = (t_i . v^_i) v^_i          v^ = v / |v|
        L    = CE(W^ v~, y) + CE(W^ t~, y),   W^ = rows of W divided by their L2 norm
    """
    image_feats, text_feats = _full_precision(image_feats), _full_precision(text_feats)
    image_unit, text_unit = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
    image_proj = (image_feats * text_unit).sum(dim=1, keepdim=True) * text_unit
    text_proj = (text_feats * image_unit).sum(dim=1, keepdim=True) * image_unit
    weight = F.normalize(_full_precision(class_weight), dim=1)
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
    target = _matching_target(pids, torch.float32 if similarity.dtype in (torch.float16, torch.bfloat16)
                              else similarity.dtype, label_norm, "cross-scale")
    logits = logit_scale * _full_precision(similarity)
    return _matching_kl(logits, target, epsilon) + _matching_kl(logits.t(), target, epsilon)


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
    target = _matching_target(pids, torch.float32 if i2t.dtype in (torch.float16, torch.bfloat16) else i2t.dtype,
                              label_norm, "cross-scale")
    return (_matching_kl(logit_scale * _full_precision(i2t).t(), target, epsilon)
            + _matching_kl(logit_scale * _full_precision(t2i).t(), target, epsilon))
