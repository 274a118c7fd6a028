"""The field's retrieval metrics (R@k, mAP, mINP), exact and in bounded memory.

The protocol (IRRA's evaluator, followed by the whole field): for each query, rank the whole gallery
by similarity, descending; every gallery item with the query's person id is a match.

- R@k: percent of queries with at least one match among the first k.
- AP: mean over the query's matches of precision at each match's rank, ``mean_i (i / r_i)`` where
  ``r_1 < r_2 < ... < r_n`` are the 1-based ranks of its n matches; mAP is the mean over queries.
- INP (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021): ``n / r_n``, the share
  of the list one must read to have seen every match; mINP is the mean over queries.

Ties are broken by gallery index: among equal scores the item listed first in the gallery ranks
first, exactly what a *stable* descending sort gives. (The reference code uses an unstable sort, so
its numbers on tied scores depend on the sort's whims; ours are deterministic.)

Why not sort: the reference sorts the whole (queries x gallery) matrix at once and keeps several
int64 copies of it, which runs out of memory at ICFG-PEDES scale (19,848 x 19,848). Here queries
are processed in chunks, and a match's rank needs no sort at all: it is one plus the number of
gallery items that come before it, i.e. that score strictly higher, or score the same and sit
earlier in the gallery. Two exact ways of counting them, chosen per chunk ("auto"):

- "threshold": only items scoring at least as high as the query's worst match can come before a
  match, and for a trained model they are few (the last match sits at rank n / INP). One
  comparison pass selects them; each is then compared with the query's n matches. Used when the
  (selected items x matches) pairs stay below half the chunk's size; any dtype.
- "count": each score becomes a 64-bit key whose high half orders like the float and whose low
  half is the reversed gallery index, so the keys of a row are distinct and "comes before" is
  "has a larger key". The query's n match keys are sorted, every gallery key is located among them
  by binary search, and a histogram of those positions counts the items ahead of each match:
  O(G log n) per query for a gallery of G. float16, bfloat16 and float32 only.
- "sort": a stable descending sort of each row of the chunk, for float64 and integer scores that
  do not fit the key (and as a plain cross-check). O(G log G) per query.

All three give the same ranks, so the same numbers, bit for bit; peak memory is O(chunk x G).

Image-to-text retrieval is the same computation with the roles swapped: images are the queries and
captions the gallery, ``rank_metrics(similarity.T, gallery_pids, query_pids)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tbps.errors import TBPSError

ScoreFn = Callable[[int, int], Any]

#: Working memory aimed at per chunk when no chunk size is given (scores plus ranking temporaries).
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: Bytes per score of a chunk at the ranking's peak (the chunk's rows and the int64 temporaries).
_BYTES_PER_SCORE = 24
_PACKABLE = (torch.float16, torch.bfloat16, torch.float32)
ALGORITHMS = ("auto", "threshold", "count", "sort")


def default_chunk_size(num_gallery: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Queries per chunk so that one chunk's scores and temporaries stay near ``budget_bytes``."""
    return max(1, int(budget_bytes // (max(1, num_gallery) * _BYTES_PER_SCORE)))


# ----------------------------------------------------------------------------- inputs

def _pid_array(pids: Any, what: str) -> np.ndarray:
    if torch.is_tensor(pids):
        pids = pids.detach().cpu().numpy()
    array = np.asarray(pids)
    if array.ndim != 1:
        raise TBPSError(f"{what} must be a 1-D sequence of person ids, got shape {array.shape}")
    if array.dtype.kind not in "iub":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise TBPSError(f"{what} must hold integer person ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise TBPSError(f"ks must be positive integers (ranks at which to report recall), got {ks!r}")
    return tuple(int(k) for k in ks)


class _GalleryMatches:
    """Where each query's matches sit in the gallery, found once from the person ids.

    Gallery indices are grouped by person id (ascending index within a group), so the matches of a
    chunk of queries form a small padded (queries, max matches) index matrix: no (queries x gallery)
    boolean mask is ever built.
    """

    def __init__(self, query_pids: np.ndarray, gallery_pids: np.ndarray) -> None:
        ids, gallery_group = np.unique(gallery_pids, return_inverse=True)
        self.grouped = np.argsort(gallery_group, kind="stable")
        counts = np.bincount(gallery_group, minlength=len(ids))
        offsets = np.cumsum(counts) - counts
        pos = np.minimum(np.searchsorted(ids, query_pids), len(ids) - 1)
        found = ids[pos] == query_pids
        if not found.all():
            missing = np.flatnonzero(~found)
            first = int(missing[0])
            raise TBPSError(
                f"query {first} (pid {int(query_pids[first])}) has no match in the gallery"
                f"{f' ({len(missing)} queries have none)' if len(missing) > 1 else ''}: every query's "
                "person must appear among the gallery images (check that queries and gallery come "
                "from the same split)"
            )
        self.counts = counts[pos]
        self.offsets = offsets[pos]

    def chunk(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(match gallery indices (q, n_max), number of matches (q,)), padded with index 0."""
        counts = self.counts[start:end]
        n_max = int(counts.max())
        slots = np.arange(n_max)
        valid = slots[None, :] < counts[:, None]
        index = np.where(valid, self.offsets[start:end, None] + slots[None, :], 0)
        match_index = torch.from_numpy(self.grouped[index]).to(device)
        return match_index, torch.from_numpy(counts).to(device)


def _as_chunk(scores: Any, rows: int, num_gallery: int, where: str) -> torch.Tensor:
    """A score block as a tensor on its own device (numpy and memmap blocks are read here)."""
    if isinstance(scores, np.ndarray):
        if scores.dtype.kind not in "fiu":
            raise TBPSError(f"{where}: similarity must be numeric, got dtype {scores.dtype}")
        block = np.ascontiguousarray(scores)
        if not block.flags.writeable:  # a read-only memmap: torch wants its own copy of the block
            block = block.copy()
        scores = torch.from_numpy(block)
    elif not torch.is_tensor(scores):
        raise TBPSError(f"{where}: similarity must be a torch tensor or a numpy array, got {type(scores).__name__}")
    if scores.dim() != 2 or tuple(scores.shape) != (rows, num_gallery):
        raise TBPSError(f"{where}: expected similarity rows of shape ({rows}, {num_gallery}), "
                        f"got {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TBPSError(f"{where}: similarity must be real numbers, got {scores.dtype}")
    return scores.detach()


# ----------------------------------------------------------------------------- ranks of matches

def _match_ranks_by_count(scores: torch.Tensor, match_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each query's matches without sorting the gallery (float16/bfloat16/float32).

    Returns (q, n_max) int64 in ascending key order: padding slots first, the best match last.
    """
    num_gallery = scores.shape[1]
    # float -> int32 with the same order: flip the magnitude bits of negatives; -0.0 -> +0.0 first
    bits = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    torch.add(scores, 0.0, out=bits)  # a contiguous float32 copy, with -0.0 turned into +0.0
    bits = bits.view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF
    keys = bits.to(torch.int64)
    del bits
    reversed_index = torch.arange(num_gallery - 1, -1, -1, device=scores.device, dtype=torch.int64)
    keys.mul_(2**32).add_(reversed_index)  # distinct per row; larger key = earlier in the ranking
    lowest = torch.iinfo(torch.int64).min  # below every real key: a float's key is > -2**63
    match_keys = torch.where(valid, keys.gather(1, match_index), lowest).sort(dim=1).values
    # where every gallery key falls among its query's match keys = how many of them it beats
    beaten = torch.searchsorted(match_keys, keys)
    del keys
    histogram = torch.zeros(match_keys.shape[0], match_keys.shape[1] + 1, dtype=torch.int64,
                            device=scores.device)
    ones = torch.ones((1, 1), dtype=torch.int64, device=scores.device).expand_as(beaten)
    histogram.scatter_add_(1, beaten, ones)
    # items ahead of the match at ascending slot j = items that beat at least j + 1 match keys
    ahead = histogram.flip(1).cumsum(1).flip(1)[:, 1:]
    return ahead + 1


def _best_first(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sort each query's match ranks ascending, padding slots last."""
    return torch.where(valid, ranks, torch.iinfo(torch.int64).max).sort(dim=1).values


def _match_ranks_by_sort(scores: torch.Tensor, match_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The same ranks from a stable descending sort of each row (any real dtype); best match first."""
    q, num_gallery = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(num_gallery, device=scores.device).expand(q, num_gallery))
    del order
    return _best_first(positions.gather(1, match_index) + 1, valid)


def _match_ranks_above_worst(scores: torch.Tensor, match_index: torch.Tensor, valid: torch.Tensor,
                             max_pairs: int | None) -> torch.Tensor | None:
    """The same ranks looking only at items that score at least as high as the query's worst match.

    Only those items can come before a match, and for a trained model they are few (the last match
    of a query sits at rank n / INP), so this costs a comparison pass over the chunk plus work on
    (selected items x matches) pairs. Any real dtype. Returns None when the pairs exceed
    ``max_pairs`` (a poor model, or random scores): the caller then counts over the whole row.
    """
    q, n_max = match_index.shape
    match_scores = scores.gather(1, match_index)
    high = float("inf") if scores.is_floating_point() else torch.iinfo(scores.dtype).max
    worst = match_scores.masked_fill(~valid, high).min(dim=1).values
    selected = scores >= worst[:, None]
    if max_pairs is not None and int(torch.count_nonzero(selected)) * n_max > max_pairs:
        return None
    rows, cols = selected.nonzero(as_tuple=True)
    del selected
    values = scores[rows, cols][:, None]
    other_scores = match_scores[rows]
    # item (row, col) comes before match m: it scores higher, or scores the same and sits earlier
    before = values > other_scores
    before |= (values == other_scores) & (cols[:, None] < match_index[rows])
    ahead = torch.zeros(q, n_max, dtype=torch.int64, device=scores.device)
    ahead.index_add_(0, rows, before.to(torch.int64))
    return _best_first(ahead + 1, valid)


def _chunk_ranks(scores: torch.Tensor, match_index: torch.Tensor, counts: torch.Tensor,
                 algorithm: str) -> torch.Tensor:
    """(q, n_max) ranks of each query's matches, best first; slots past a query's count hold 0."""
    slots = torch.arange(match_index.shape[1], device=match_index.device)
    valid = slots[None, :] < counts[:, None]
    packable = scores.dtype in _PACKABLE
    if algorithm == "count" and not packable:
        raise TBPSError(f"algorithm 'count' needs float16, bfloat16 or float32 scores, got {scores.dtype} "
                        "(use 'auto' or 'sort')")
    ranks = None
    if algorithm in ("auto", "threshold"):
        budget = None if algorithm == "threshold" else scores.numel() // 2
        ranks = _match_ranks_above_worst(scores, match_index, valid, budget)
    if ranks is None and (algorithm == "count" or (algorithm == "auto" and packable)):
        ranks = _match_ranks_by_count(scores, match_index, valid).flip(1)  # best first, padding last
    if ranks is None:
        ranks = _match_ranks_by_sort(scores, match_index, valid)
    return torch.where(valid, ranks, 0)


# ----------------------------------------------------------------------------- public API

def rank_metrics_from_scores(
    score_fn: ScoreFn,
    num_queries: int,
    query_pids: Any,
    gallery_pids: Any,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    *,
    algorithm: str = "auto",
) -> dict[str, float]:
    """R@k, mAP and mINP (percent) from similarity rows produced on demand.

    ``score_fn(start, end)`` returns the (end - start, num_gallery) similarity rows of queries
    ``start:end`` (torch tensor on any device, or numpy array), so an evaluation of any size never
    holds the full matrix: peak memory is one chunk of ``chunk_size`` queries (default: enough to
    use about ``DEFAULT_CHUNK_BYTES``, some 250 MiB). The computation runs on the device of the
    returned rows. ``algorithm``: "auto" (per chunk: "threshold" when few items outrank the worst
    matches, else "count" for float16/bfloat16/float32 and "sort" otherwise), or one of those
    forced; all give identical numbers (see the module docstring).
    """
    ks = _check_ks(ks)
    if algorithm not in ALGORITHMS:
        raise TBPSError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    query_pids = _pid_array(query_pids, "query_pids")
    gallery_pids = _pid_array(gallery_pids, "gallery_pids")
    num_queries = int(num_queries)
    if num_queries != len(query_pids):
        raise TBPSError(f"{num_queries} queries but {len(query_pids)} query pids")
    if num_queries == 0 or len(gallery_pids) == 0:
        raise TBPSError(f"nothing to rank: {num_queries} queries and {len(gallery_pids)} gallery items")
    num_gallery = len(gallery_pids)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_gallery)
    if isinstance(chunk_size, bool) or int(chunk_size) < 1:
        raise TBPSError(f"chunk_size must be a positive number of queries, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    matches = _GalleryMatches(query_pids, gallery_pids)

    # per-query values, summed once at the end: the result does not depend on the chunking
    first_rank = np.empty(num_queries, dtype=np.int64)
    average_precision = np.empty(num_queries, dtype=np.float64)
    inverse_negative_penalty = np.empty(num_queries, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, num_queries, chunk_size):
            end = min(start + chunk_size, num_queries)
            scores = _as_chunk(score_fn(start, end), end - start, num_gallery, f"queries {start}:{end}")
            if scores.is_floating_point():
                if bool(torch.isnan(scores).any()):
                    row = start + int(torch.isnan(scores).any(dim=1).nonzero()[0, 0])
                    raise TBPSError(f"similarity row {row} (query {row}) holds NaN: scores cannot be ranked")
            match_index, counts = matches.chunk(start, end, scores.device)
            ranks = _chunk_ranks(scores, match_index, counts, algorithm)
            del scores
            first, ap, inp = _per_query(ranks, counts)
            first_rank[start:end] = first
            average_precision[start:end] = ap
            inverse_negative_penalty[start:end] = inp

    result = {f"R{k}": 100.0 * int((first_rank <= k).sum()) / num_queries for k in ks}
    result["mAP"] = 100.0 * math.fsum(average_precision) / num_queries
    result["mINP"] = 100.0 * math.fsum(inverse_negative_penalty) / num_queries
    return result


def _per_query(ranks: torch.Tensor, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank of the first match, AP and INP of each query, from its match ranks (best first, 0-padded).

    The precision terms are added left to right (cumsum), so padding never changes a query's AP.
    """
    last_slot = (counts - 1)[:, None]
    ranks_f = ranks.double()
    precision = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64) / ranks_f
    precision = torch.where(ranks > 0, precision, 0.0)
    counts_f = counts.double()
    ap = precision.cumsum(1).gather(1, last_slot).squeeze(1) / counts_f
    inp = counts_f / ranks_f.gather(1, last_slot).squeeze(1)
    return ranks[:, 0].cpu().numpy(), ap.cpu().numpy(), inp.cpu().numpy()


def rank_metrics(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    *,
    algorithm: str = "auto",
) -> dict[str, float]:
    """Text-to-image R@k (one key ``R{k}`` per k), mAP and mINP in percent, as the field reports them.

    ``similarity`` is (num_queries, num_gallery), higher = more similar: a torch tensor (computed
    on its device) or a numpy array, including an ``np.memmap`` read chunk by chunk from disk.
    Ties are broken by gallery index (stable descending sort). A query whose person has no image in
    the gallery is an input error (TBPSError naming it), not a division by zero. For image-to-text,
    pass ``similarity.T`` with the pid lists swapped.
    """
    if isinstance(similarity, np.ndarray) or torch.is_tensor(similarity):
        if similarity.ndim != 2:
            raise TBPSError(f"similarity must be a (queries, gallery) matrix, got shape {tuple(similarity.shape)}")
    else:
        raise TBPSError(f"similarity must be a torch tensor or a numpy array, got {type(similarity).__name__}")
    num_queries, num_gallery = (int(n) for n in similarity.shape)
    num_query_pids = len(_pid_array(query_pids, "query_pids"))
    num_gallery_pids = len(_pid_array(gallery_pids, "gallery_pids"))
    if (num_queries, num_gallery) != (num_query_pids, num_gallery_pids):
        raise TBPSError(
            f"similarity is {num_queries} x {num_gallery} but there are {num_query_pids} query pids and "
            f"{num_gallery_pids} gallery pids (rows are queries, columns gallery items)"
        )

    def rows(start: int, end: int) -> Any:
        return similarity[start:end]

    return rank_metrics_from_scores(rows, num_queries, query_pids, gallery_pids, ks, chunk_size,
                                    algorithm=algorithm)
