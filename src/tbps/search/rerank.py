"""The second stage: the method's own similarity re-ranks the global shortlist.

Methods with a fine-grained score (local features, cross-scale terms, ...) override
``TBPSModel.similarity``; the retrieval contract (``docs/architecture.md``) lets it be called on any
subset of gallery rows. Two-stage retrieval (shortlist by the global cosine, re-rank the top k with
the expensive score) is how the fine-grained methods are deployed in practice; with a shortlist as
large as the gallery it ranks exactly as the evaluator does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from tbps.models.base import TBPSModel

Features = dict[str, torch.Tensor]


def has_fine_similarity(model: torch.nn.Module) -> bool:
    """True when the model scores by more than the global cosine (it overrides ``similarity``)."""
    method = getattr(type(model), "similarity", None)
    return method is not None and method is not TBPSModel.similarity


def rerank(model: torch.nn.Module, text_feats: Features, gather: Callable[[str, np.ndarray], np.ndarray],
           keys: list[str], shortlists: list[np.ndarray], device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
    """For query i, ``(scores, rows)`` of ``shortlists[i]`` sorted by ``model.similarity``, best first.

    ``gather(key, rows)`` reads gallery feature ``key`` for those rows. Ties keep the shortlist's
    order (the global ranking).
    """
    results = []
    for i, rows in enumerate(shortlists):
        if len(rows) == 0:
            results.append((np.zeros(0, dtype=np.float32), rows))
            continue
        image_feats = {key: torch.from_numpy(gather(key, rows)).to(device) for key in keys}
        query = {key: value[i:i + 1] for key, value in text_feats.items()}
        scores = model.similarity(query, image_feats)[0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        results.append((scores[order], rows[order]))
    return results
