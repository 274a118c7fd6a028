"""The first stage: the top rows of a gallery by the global embedding, exact or approximate.

- ``exact``: ``text["global"] @ image["global"].T`` as a chunked matrix product over the
  memory-mapped shards, keeping a running top k, so memory stays bounded for any gallery size. It is
  the same score the evaluator ranks by for a method without a fine-grained similarity.
- ``faiss-hnsw`` / ``faiss-ivf``: FAISS ``IndexHNSWFlat`` / ``IndexIVFFlat`` with inner product on
  L2-normalised vectors (cosine), the two standard CPU choices (the FAISS wiki's "Guidelines to choose
  an index"): HNSW for the best recall at low latency when the vectors fit in memory, IVF when build
  time and memory matter more. ``auto`` uses exact search below ``AUTO_FAISS_MIN`` images, where
  one matrix product is already fast, and HNSW above.

A FAISS index is saved in the index folder (``ann.faiss`` + ``ann.json``) and rebuilt when stale:
when the gallery has grown, the model's fingerprint changed, or another kind or setting is asked for.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tbps.errors import TBPSError
from tbps.extras import available, require
from tbps.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "faiss-hnsw", "faiss-ivf")
AUTO_FAISS_MIN = 100_000  # galleries at least this large use FAISS HNSW under backend=auto
ANN_FILE = "ann.faiss"
ANN_META = "ann.json"

HNSW_M = 32                # graph degree
HNSW_EF_CONSTRUCTION = 80  # build-time beam width
HNSW_EF_SEARCH = 128       # search-time beam width (raised to k when k is larger)
IVF_NPROBE_FRACTION = 1 / 8  # share of the IVF lists visited per query (at least IVF_MIN_NPROBE)
IVF_MIN_NPROBE = 32
IVF_TRAIN_PER_LIST = 64  # k-means training points per list


def resolve_backend(backend: str, size: int) -> str:
    """``auto`` -> ``exact`` or ``faiss-hnsw`` by gallery size; other names are checked and returned.

    Without FAISS installed (the ``faiss`` extra), ``auto`` stays exact at any size (slower on a large
    gallery, never less accurate) and says so once; naming a FAISS backend is an error naming the extra."""
    if backend not in BACKENDS:
        raise TBPSError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if size < AUTO_FAISS_MIN:
            return "exact"
        if not available("faiss"):
            _warn_no_faiss(size)
            return "exact"
        return "faiss-hnsw"
    return backend


@functools.cache
def _warn_no_faiss(size: int) -> None:
    log.warning("%d images: exact search, as FAISS is not installed (pip install 'tbps[faiss]' for the faster "
                "HNSW first stage)", size)


def _merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id), sorted by score descending then id ascending."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((ids, -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def exact_topk(queries: np.ndarray, blocks: Sequence[np.ndarray], k: int,
               chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of shape ``(Q, min(k, N))``: the k highest ``queries @ gallery.T`` per query.

    ``blocks`` are consecutive row blocks of the gallery (the shards). Scores are kept for about
    ``chunk_rows`` gallery rows at a time and then folded into the running top k, so memory stays
    bounded and the selection runs once per chunk, not once per (small) shard.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_queries = len(queries)
    best_scores = np.zeros((num_queries, 0), dtype=np.float32)
    best_ids = np.zeros((num_queries, 0), dtype=np.int64)
    pending: list[np.ndarray] = []
    pending_start = pending_rows = 0

    def fold() -> None:
        nonlocal best_scores, best_ids, pending, pending_start, pending_rows
        if not pending:
            return
        ids = np.broadcast_to(np.arange(pending_start, pending_start + pending_rows, dtype=np.int64),
                              (num_queries, pending_rows))
        best_scores, best_ids = _merge_topk(np.concatenate([best_scores, *pending], axis=1),
                                            np.concatenate([best_ids, ids], axis=1), k)
        pending, pending_start, pending_rows = [], pending_start + pending_rows, 0

    for block in blocks:
        for start in range(0, len(block), chunk_rows):
            chunk = np.asarray(block[start:start + chunk_rows], dtype=np.float32)
            pending.append(queries @ chunk.T)
            pending_rows += len(chunk)
            if pending_rows >= chunk_rows:
                fold()
    fold()
    return best_scores, best_ids


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` with unit L2 rows (zero rows stay zero)."""
    vectors = np.array(vectors, dtype=np.float32, copy=True)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def _faiss():
    return require("faiss", "faiss", "the FAISS backends (faiss-hnsw, faiss-ivf)")


def ivf_lists(size: int) -> int:
    """IVF list count: sqrt(N), at most N / 39 so k-means has enough points per centroid.

    The FAISS guideline is 4-16 sqrt(N) for the best speed at a given recall; sqrt(N) keeps the
    k-means build of a million-image gallery within minutes on one CPU thread, and visiting 1/8
    of the lists scans ~12% of the gallery per query.
    """
    return max(1, min(int(math.sqrt(size)), size // 39))


class FaissIndex:
    """A FAISS inner-product index over L2-normalised global embeddings, with its settings."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        self.index = index
        self.kind = kind
        self.params = params

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str, *, hnsw_m: int = HNSW_M,
              ef_construction: int = HNSW_EF_CONSTRUCTION, nlist: int | None = None, seed: int = 0) -> "FaissIndex":
        faiss = _faiss()
        vectors = normalize_rows(vectors)
        size, dim = vectors.shape
        if kind == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(vectors)
            params = {"m": hnsw_m, "ef_construction": ef_construction}
        elif kind == "faiss-ivf":
            nlist = nlist or ivf_lists(size)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            sample = vectors
            if size > nlist * IVF_TRAIN_PER_LIST:  # k-means on a random subset (FAISS: 39-256 per list)
                sample = vectors[np.random.default_rng(seed).choice(size, nlist * IVF_TRAIN_PER_LIST, replace=False)]
            index.train(sample)
            index.add(vectors)
            params = {"nlist": nlist}
        elif kind == "faiss-flat":
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
            params = {}
        else:
            raise TBPSError(f"unknown FAISS index kind {kind!r} (faiss-hnsw, faiss-ivf)")
        return cls(index, kind, params)

    def search(self, queries: np.ndarray, k: int, *, ef_search: int | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the k nearest by cosine; rows of -1 (too few results) are dropped
        by the caller. ``ef_search`` (HNSW) and ``nprobe`` (IVF) trade speed for recall."""
        k = min(k, self.size)
        queries = normalize_rows(queries)
        if self.kind == "faiss-hnsw":
            self.index.hnsw.efSearch = max(ef_search or HNSW_EF_SEARCH, k)
        elif self.kind == "faiss-ivf":
            nlist = int(self.index.nlist)
            self.index.nprobe = min(nlist, nprobe or max(IVF_MIN_NPROBE, int(nlist * IVF_NPROBE_FRACTION)))
        scores, rows = self.index.search(queries, k)
        return scores, rows.astype(np.int64)

    def save(self, path: str | Path) -> None:
        faiss = _faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | Path, kind: str, params: dict[str, Any]) -> "FaissIndex":
        return cls(_faiss().read_index(str(path)), kind, params)


def ensure_ann(gallery, kind: str, progress: bool = False) -> FaissIndex:
    """The saved FAISS index of ``gallery`` (a ``GalleryIndex``), brought up to date and saved.

    Same kind and model but fewer rows (the gallery was appended to): the new rows are added to
    the saved index, as HNSW and IVF allow (IVF keeps the lists it was trained with). Another kind,
    model or setting: rebuilt. A read-only index folder keeps the result in memory only.
    """
    root: Path = gallery.root
    meta_path, index_path = root / ANN_META, root / ANN_FILE
    want = {"kind": kind, "rows": gallery.size, "fingerprint": gallery.fingerprint}
    meta: dict[str, Any] = {}
    if meta_path.is_file() and index_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
        if all(meta.get(key) == value for key, value in want.items()):
            return FaissIndex.load(index_path, kind, meta.get("params", {}))
    started = time.perf_counter()
    same_model = meta.get("kind") == kind and meta.get("fingerprint") == gallery.fingerprint
    if same_model and isinstance(meta.get("rows"), int) and 0 < meta["rows"] < gallery.size:
        ann = FaissIndex.load(index_path, kind, meta.get("params", {}))
        if ann.size == meta["rows"]:
            if progress:
                log.info("adding %d images to the %s first stage", gallery.size - ann.size, kind)
            ann.index.add(normalize_rows(gallery.matrix("global")[ann.size:]))
        else:
            ann = None
    else:
        ann = None
    if ann is None:
        if progress:
            log.info("building the %s first stage over %d images", kind, gallery.size)
        ann = FaissIndex.build(gallery.matrix("global"), kind)
    try:
        meta_path.unlink(missing_ok=True)  # a kill while saving must not leave a matching meta
        ann.save(index_path)
        write_text_atomic(meta_path, json.dumps({**want, "params": ann.params,
                                                 "seconds": round(time.perf_counter() - started, 3)}) + "\n")
    except OSError as exc:
        log.warning("%s: cannot save the %s first stage (%s); using it from memory", root, kind, exc)
    return ann
