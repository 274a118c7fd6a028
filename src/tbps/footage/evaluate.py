"""Measures on synthetic footage: person detection AP@0.5, and end-to-end text -> person-in-footage
recall (for a caption of person X, is a crop of X among the top k of the indexed footage?)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tbps.footage.detect import Detector, FrameRef
from tbps.footage.scenes import load_annotations


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (x1/y1 exclusive)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_ap(detections: list[list[tuple[Sequence[float], float]]], truths: list[list[Sequence[float]]],
                 ignored: list[list[Sequence[float]]] | None = None, iou: float = 0.5) -> float:
    """Average precision of one class over frames (PASCAL VOC, all points).

    Detections of all frames are taken best score first; each is a true positive when its best-IoU
    unmatched truth of its frame reaches ``iou``, else a false positive, except that a detection
    matching an *ignored* truth (hidden or cut-off person) is dropped. AP = sum over recall steps of
    (r_i - r_{i-1}) * max precision at recall >= r_i, in percent.
    """
    ignored = ignored or [[] for _ in truths]
    total = sum(len(t) for t in truths)
    if total == 0:
        return float("nan")
    order = sorted(((score, f, tuple(box)) for f, frame in enumerate(detections) for box, score in frame),
                   key=lambda item: -item[0])
    used = [np.zeros(len(t), dtype=bool) for t in truths]
    flags: list[int] = []
    for _, f, box in order:
        ious = [box_iou(box, t) for t in truths[f]]
        best = int(np.argmax(ious)) if ious else -1
        if best >= 0 and ious[best] >= iou and not used[f][best]:
            used[f][best] = True
            flags.append(1)
        elif any(box_iou(box, t) >= iou for t in ignored[f]):
            continue
        else:
            flags.append(0)
    if not flags:
        return 0.0
    tp = np.cumsum(flags)
    precision = tp / np.arange(1, len(flags) + 1)
    recall = tp / total
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    previous = np.concatenate([[0.0], recall[:-1]])
    return float(100.0 * np.sum((recall - previous) * envelope))


def detector_ap(detector: Detector, scenes: str | os.PathLike, iou: float = 0.5) -> dict[str, Any]:
    """AP@``iou`` of ``detector`` on every frame of a scenes folder; also recall and boxes per frame."""
    from PIL import Image

    root = Path(scenes)
    data = load_annotations(root)
    detections, truths, ignored = [], [], []
    for record in data["frames"]:
        with Image.open(root / record["image"]) as img:
            found = detector(img.convert("RGB"), FrameRef(record["camera"], int(record["index"])))
        detections.append([(d.box, d.score) for d in found])
        truths.append([p["box"] for p in record["people"] if not p["ignore"]])
        ignored.append([p["box"] for p in record["people"] if p["ignore"]])
    ap = detection_ap(detections, truths, ignored, iou)
    hits = sum(any(box_iou(d, t) >= iou for d, _ in dets) for dets, ts in zip(detections, truths) for t in ts)
    total = sum(len(t) for t in truths)
    return {"AP50": ap, "recall": 100.0 * hits / max(1, total), "truths": total,
            "detections_per_frame": sum(len(d) for d in detections) / max(1, len(detections)),
            "frames": len(detections)}


def crop_identities(metadata: list[dict[str, Any] | None], scenes: str | os.PathLike,
                    iou: float = 0.5) -> list[int | None]:
    """The scene identity each indexed crop shows: the truth box of its camera and frame it overlaps
    with IoU >= ``iou`` (hidden people included), else None (a false detection)."""
    data = load_annotations(scenes)
    people = {(r["camera"], int(r["index"])): r["people"] for r in data["frames"]}
    found: list[int | None] = []
    for meta in metadata:
        if meta is None:
            found.append(None)
            continue
        candidates = people.get((meta["camera"], int(meta["frame_number"])), [])
        scored = [(box_iou(meta["box"], p["box"]), p["pid"]) for p in candidates]
        best = max(scored, default=(0.0, None))
        found.append(int(best[1]) if best[0] >= iou else None)
    return found


def footage_recall(searcher: Any, scenes: str | os.PathLike, ks: Sequence[int] = (1, 5, 10),
                   group_tracks: bool = False) -> dict[str, float]:
    """R@k of text -> person-in-footage: every caption of every identity in the scenes is a query,
    and a query scores at k when a crop of that identity is among its top k (in percent)."""
    data = load_annotations(scenes)
    owners = crop_identities(searcher.index.metadata, scenes)
    queries, pids = [], []
    for pid, entry in data["identities"].items():
        for caption in entry["captions"]:
            queries.append(caption)
            pids.append(int(pid))
    results = searcher.search(queries, top_k=max(ks), group_tracks=group_tracks)
    out: dict[str, float] = {}
    for k in ks:
        hits = sum(any(owners[r["index"]] == pid for r in ranked[:k]) for pid, ranked in zip(pids, results))
        out[f"R{k}"] = 100.0 * hits / max(1, len(queries))
    out["queries"] = float(len(queries))
    out["crops"] = float(searcher.size)
    out["false_crops"] = float(sum(o is None for o in owners))
    return out
