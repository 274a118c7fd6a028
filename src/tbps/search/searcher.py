"""``Searcher``: text queries against a gallery index, in two stages.

1. The query's global embedding shortlists gallery rows by cosine (``tbps.search.ann``: exact, or
   FAISS for large galleries).
2. When the method has a fine-grained similarity, it re-ranks the shortlist
   (``tbps.search.rerank``); ``rerank=False`` returns the first stage as is.

The model is loaded from the checkpoint the index records (or one given), and refused unless its
weights have the index's fingerprint: embeddings of two models are not comparable.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbps.errors import TBPSError
from tbps.inference import Embedder
from tbps.search.ann import FaissIndex, ensure_ann, exact_topk, resolve_backend
from tbps.search.index import GalleryIndex, model_fingerprint
from tbps.search.rerank import has_fine_similarity, rerank as rerank_shortlists

log = logging.getLogger(__name__)

QUERY_BATCH = 256


class Searcher:
    """Search an index folder by text. ``search(["a woman in a red coat"])`` -> ranked results.

    ``image_root``: where the gallery lives now, when it has moved since ``tbps index`` (the index
    stores paths relative to the gallery folder).

    Attributes: ``paths`` (gallery image paths, row order), ``size``, ``model_name``, ``has_rerank``
    (the method re-ranks the shortlist), ``backend`` (exact | faiss-hnsw | faiss-ivf, resolved),
    ``last_timing`` (seconds of the last search per stage: ``embed``, ``shortlist``, ``rerank``).
    """

    def __init__(self, index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 device: str = "auto", backend: str | None = None,
                 image_root: str | os.PathLike | None = None) -> None:
        from tbps.engine.checkpoint import load_model_from_checkpoint
        from tbps.engine.distributed import resolve_device

        self.index = GalleryIndex(index_dir, image_root=image_root)
        manifest = self.index.manifest
        if self.index.size and not Path(self.index.paths[0]).is_file():
            log.warning("%s: gallery image %s is missing; if the gallery has moved, pass its new folder as "
                        "the image root (--image-root)", index_dir, self.index.paths[0])
        checkpoint = Path(checkpoint if checkpoint is not None else manifest["checkpoint"])
        if not checkpoint.is_file():
            raise TBPSError(f"{checkpoint}: the index's model checkpoint is not found (pass the checkpoint "
                            "it was built with)")
        self.device = resolve_device(device)
        self.model, self.cfg, self.tokenizer = load_model_from_checkpoint(checkpoint, self.device)
        self.embedder = Embedder(self.model, self.tokenizer, device=self.device, batch_size=QUERY_BATCH)
        fingerprint = model_fingerprint(self.model, self.cfg)
        if fingerprint != self.index.fingerprint:
            raise TBPSError(f"{checkpoint}: not the model this index was built with (fingerprint "
                            f"{fingerprint[:12]}, index {self.index.fingerprint[:12]}); rebuild the index")
        self.checkpoint = str(checkpoint)
        self.paths: list[str] = self.index.paths
        self.size: int = self.index.size
        self.model_name: str = self.cfg.model.name
        self.has_rerank: bool = has_fine_similarity(self.model)
        self.backend: str = resolve_backend(backend or manifest.get("backend", "auto"), self.size)
        self._ann: FaissIndex | None = None
        if self.backend != "exact" and self.size:
            self._ann = ensure_ann(self.index, self.backend)
        self.last_timing: dict[str, float] = {}

    # ------------------------------------------------------------------ stages
    def embed_queries(self, queries: list[str]) -> dict[str, torch.Tensor]:
        """The model's query features (float32), batch first, on the model's device."""
        return self.embedder.embed_texts(queries)

    def shortlist(self, query_global: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First stage: ``(scores, rows)`` ``(Q, k)`` by the global embedding (rows -1 = none)."""
        if self._ann is not None:
            return self._ann.search(query_global, k)
        return exact_topk(query_global, self.index.blocks("global"), k)

    @torch.inference_mode()
    def search(self, queries: list[str], top_k: int = 10, rerank: bool = True,
               shortlist: int = 100, cameras: list[str] | None = None, time_from: Any = None,
               time_to: Any = None, group_tracks: bool = False) -> list[list[dict[str, Any]]]:
        """For each query, the ``top_k`` best images as ``{"rank", "path", "score", "index"}``.

        ``shortlist``: how many first-stage candidates the method's similarity re-ranks (raised to
        ``top_k``); unused when the method has none or ``rerank`` is False.
        Footage indexes (``tbps index --footage``): results also carry ``camera``, ``time``, ``box``,
        ``frame_number`` and ``track``; ``cameras`` and ``time_from``/``time_to`` (seconds or ISO
        8601, inclusive) narrow the search to those crops, and ``group_tracks`` keeps the best crop
        of each track, so the top k is k different sightings rather than one person k times.
        """
        from tbps.footage.filters import allowed_rows, group_by_track

        allowed = allowed_rows(self.index.metadata, cameras, time_from, time_to)
        if isinstance(queries, str):
            queries = [queries]
        queries = [str(q).strip() for q in queries]
        if not queries or any(not q for q in queries):
            raise TBPSError("a query is empty: give a text description")
        if top_k < 1:
            raise TBPSError(f"top-k must be at least 1, got {top_k}")
        if shortlist < 1:
            raise TBPSError(f"shortlist must be at least 1, got {shortlist}")
        candidates = self.size if allowed is None else len(allowed)
        if candidates == 0:
            return [[] for _ in queries]
        use_rerank = rerank and self.has_rerank
        wanted = top_k * 10 if group_tracks else top_k  # room for the crops that grouping folds away
        k = min(max(wanted, shortlist) if use_rerank else wanted, candidates)
        start = time.perf_counter()
        text_feats = self.embed_queries(queries)
        embedded = time.perf_counter()
        if allowed is None:
            scores, rows = self.shortlist(text_feats["global"].cpu().numpy(), k)
        else:  # exact over the allowed rows only: a filter never empties a global top k
            scores, rows = exact_topk(text_feats["global"].cpu().numpy(), [self.index.gather("global", allowed)], k)
            rows = np.where(rows >= 0, allowed[np.clip(rows, 0, None)], -1)
        shortlisted = time.perf_counter()
        ranked = [(s[r >= 0], r[r >= 0]) for s, r in zip(scores, rows)]
        if use_rerank:
            ranked = rerank_shortlists(self.model, text_feats, self.index.gather, self.index.feature_keys,
                            [r for _, r in ranked], self.device)
        self.last_timing = {"embed": embedded - start, "shortlist": shortlisted - embedded,
                            "rerank": time.perf_counter() - shortlisted if use_rerank else 0.0}
        if group_tracks:
            ranked = [group_by_track(s, r, self.index.metadata) for s, r in ranked]
        return [[{"rank": rank, "path": self.paths[int(row)], "score": float(score), "index": int(row),
                  **self.footage_fields(int(row))}
                 for rank, (score, row) in enumerate(zip(s[:top_k], r[:top_k]), start=1)]
                for s, r in ranked]

    def footage_fields(self, index: int) -> dict[str, Any]:
        """``camera``, ``time``, ``box``, ``frame_number``, ``track`` of a footage crop; {} for an image."""
        meta = self.index.metadata[index] if self.index.metadata else None
        if meta is None:
            return {}
        fields = {key: meta[key] for key in ("camera", "time", "box", "frame_number", "track") if key in meta}
        if meta.get("absolute_time"):
            fields["time_iso"] = datetime.datetime.fromtimestamp(meta["time"], datetime.timezone.utc).isoformat()
        return fields

    def frame_path(self, index: int) -> str:
        """The frame a footage crop was cut from (TBPSError when ``index`` is no footage crop)."""
        self.image_path(index)
        meta = self.index.metadata[int(index)]
        if meta is None or "frame" not in meta:
            raise TBPSError(f"image {index} is not a crop of footage: it has no frame")
        return str(self.index.root / meta["frame"]) if not os.path.isabs(meta["frame"]) else meta["frame"]

    def image_path(self, index: int) -> str:
        """The path of gallery row ``index``; only images in the index (anything else: TBPSError)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.size:
            raise TBPSError(f"image {index!r} is not in the index (0..{self.size - 1})")
        return self.paths[int(index)]
