"""PCC's losses: the hardest-negative ranking loss and the commonality-based margin (CMR) on parts.

Notation as in :mod:`tbps.losses`; each function is pure, its formula in its docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.losses import full_precision, same_identity


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
    similarity = full_precision(similarity)
    positives = same_identity(pids, torch.bool)
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
    image_norm = F.normalize(full_precision(image_parts), dim=-1)
    text_norm = F.normalize(full_precision(text_parts), dim=-1)
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
        negatives = ~same_identity(pids, torch.bool)
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
        image_norm = F.normalize(full_precision(image_parts.detach()), dim=-1)
        text_norm = F.normalize(full_precision(text_parts.detach()), dim=-1)
        commonality = (torch.einsum("akd,bkd->kab", image_norm, image_norm)
                       + torch.einsum("akd,bkd->kab", text_norm, text_norm)) / 2
        return margin * (1 - commonality.clamp(0.0, 1.0))

CMR_COMMONALITY = ("batch", "pair")

def cmr_loss(image_parts: Tensor, text_parts: Tensor, pids: Tensor, margin: float,
             adaptive: bool = True, negatives: str = "hardest", commonality: str = "batch") -> Tensor:
    """Commonality-based margin ranking (CMR) loss on fine part embeddings (PCC, Park et al. 2024).

    Our reading of the method (the paper's formula is not in our sources; see ``models/methods/pcc.py``):
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
