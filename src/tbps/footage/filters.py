"""Narrowing a footage search by camera and time, and folding a ranking into one hit per track.

Shared by ``Searcher.search`` (CLI and API), so both validate the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tbps.errors import TBPSError
from tbps.footage.ingest import parse_time


def allowed_rows(metadata: Sequence[dict[str, Any] | None], cameras: Sequence[str] | None = None,
                 time_from: Any = None, time_to: Any = None) -> np.ndarray | None:
    """Gallery rows whose camera is one of ``cameras`` and whose time lies in [time_from, time_to]
    (each bound optional: seconds or ISO 8601); None when nothing narrows the search.

    One-line errors: a filter on an index without footage, an unknown camera (the known ones are
    named), a time that does not parse, a range whose start is after its end.
    """
    cameras = [str(c).strip() for c in cameras or [] if str(c).strip()]
    if not cameras and time_from is None and time_to is None:
        return None
    if not metadata or all(meta is None for meta in metadata):
        raise TBPSError("camera and time filters need an index of footage (tbps index --footage)")
    start = parse_time(time_from, "time-from") if time_from is not None else -np.inf
    end = parse_time(time_to, "time-to") if time_to is not None else np.inf
    if start > end:
        raise TBPSError(f"inverted time range: time-from {time_from} is after time-to {time_to}")
    known = sorted({meta["camera"] for meta in metadata if meta is not None})
    unknown = [c for c in cameras if c not in known]
    if unknown:
        raise TBPSError(f"camera {unknown[0]!r} is not in the index (cameras: {', '.join(known[:20])})")
    wanted = set(cameras) if cameras else None
    rows = [row for row, meta in enumerate(metadata)
            if meta is not None and (wanted is None or meta["camera"] in wanted) and start <= meta["time"] <= end]
    return np.asarray(rows, dtype=np.int64)


def group_by_track(scores: np.ndarray, rows: np.ndarray,
                   metadata: Sequence[dict[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Keep, in ranked order, only the first (best) row of each track; rows without a track stay."""
    seen: set[str] = set()
    keep = []
    for position, row in enumerate(rows):
        meta = metadata[int(row)] if metadata else None
        track = meta.get("track") if meta else None
        if track is not None:
            if track in seen:
                continue
            seen.add(track)
        keep.append(position)
    return scores[keep], rows[keep]
