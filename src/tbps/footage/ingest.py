"""Footage -> person crops with camera, time and box: what ``tbps index --footage`` embeds.

Sources are video files and folders of frames, found under the footage path. Each source has a
camera id: from a manifest (``footage.json`` in the footage folder, or ``--manifest``), else from
the folder layout (the first folder under the footage path; a video directly in it is its own
camera, named by its file stem). A manifest, when there is one, must list every source::

    {"sources": {"cam01.mp4": {"camera": "lobby", "start": "2026-01-05T08:00:00+00:00"},
                 "cam02":     {"camera": "gate", "start": "2026-01-05T08:00:00+00:00", "fps": 4}}}

``start`` (ISO 8601; UTC when no zone is given) makes times absolute (seconds since 1970, UTC);
without it a time is seconds from the source's start. ``fps`` is the frame rate of a frames
folder (default ``--frame-rate``); a video's own timestamps are used.

Frames are sampled at ``sample_fps``, the detector finds people, and each crop is written under
the index folder (``crops/``); for videos the sampled frame that holds people is kept too
(``frames/``), so the page can show a hit in its frame. Crops of one source that overlap in
consecutive samples are linked into tracks (greedy, by centre distance), so search can return one hit per track.

Progress is one line per finished source in ``footage/sources.jsonl`` (its crops included), so a
killed run redoes only the source it was in, and new footage appends. An unreadable video or frame
is skipped, counted and named in a warning.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from tbps.data.images import IMAGE_EXTENSIONS, load_image
from tbps.errors import TBPSError
from tbps.footage.detect import Detector, FrameRef, clip_box
from tbps.io import atomic_path, read_json

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
MANIFEST_NAME = "footage.json"
PROGRESS = "footage/sources.jsonl"


@dataclass
class Source:
    """One video file or one folder of frames, with its camera and clock."""

    path: Path
    rel: str  # relative to the footage root ("." for the root itself)
    kind: str  # "video" | "frames"
    camera: str
    start: float | None  # epoch seconds of its first frame, when known
    fps: float | None = None  # frames folders only
    frames: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- manifest and sources

def parse_time(value: Any, what: str) -> float:
    """Seconds since 1970 (UTC) from a number or an ISO 8601 time; one-line error otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TBPSError(f"{what}: {text[:40]!r} is not a time (seconds, or ISO 8601 like 2026-01-05T08:00:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def read_footage_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``sources`` of a footage manifest, each checked (camera, start, fps)."""
    path = Path(path)
    data = read_json(path, "footage manifest")
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, dict):
        raise TBPSError(f"{path}: a footage manifest is {{\"sources\": {{\"<video or folder>\": {{\"camera\": ...}}}}}}")
    for rel, entry in sources.items():
        if not isinstance(entry, dict) or not str(entry.get("camera", "")).strip():
            raise TBPSError(f"{path}: source {rel!r} has no 'camera'")
        if "start" in entry:
            entry["start_epoch"] = parse_time(entry["start"], f"{path}: source {rel!r} 'start'")
        if "fps" in entry and not (isinstance(entry["fps"], (int, float)) and entry["fps"] > 0):
            raise TBPSError(f"{path}: source {rel!r}: 'fps' must be a positive number")
    return sources


def _camera_from_layout(root: Path, path: Path, kind: str) -> str:
    rel = path.relative_to(root).parts
    if len(rel) > 1 or (kind == "frames" and len(rel) == 1):
        return rel[0]
    if kind == "video":
        return path.stem if rel else root.stem
    return root.name


def find_sources(footage: str | os.PathLike, manifest: str | os.PathLike | None = None,
                 frame_rate: float = 1.0) -> list[Source]:
    """Every video file and every folder holding frames under ``footage`` (or the one video it is)."""
    root = Path(footage).expanduser()
    if not root.exists():
        raise TBPSError(f"{root}: no such footage folder or video")
    if frame_rate <= 0:
        raise TBPSError(f"frame rate must be positive, got {frame_rate}")
    if root.is_file():
        if root.suffix.lower() not in VIDEO_EXTENSIONS:
            raise TBPSError(f"{root}: not a video ({', '.join(VIDEO_EXTENSIONS)}) or a folder of footage")
        found = [(root, "video")]
        base = root.parent
    else:
        base = root
        found = []
        folders: dict[Path, list[Path]] = {}
        for path in sorted(root.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                found.append((path, "video"))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                folders.setdefault(path.parent, []).append(path)
        found += [(folder, "frames") for folder in sorted(folders)]
    if not found:
        raise TBPSError(f"{root}: no videos ({', '.join(VIDEO_EXTENSIONS)}) or frames found")
    manifest_path = Path(manifest) if manifest else (root / MANIFEST_NAME if root.is_dir() else None)
    entries = read_footage_manifest(manifest_path) if manifest_path and (manifest or manifest_path.is_file()) else None
    sources = []
    for path, kind in found:
        rel = path.relative_to(base).as_posix() if path != base else "."
        if entries is not None:
            entry = entries.get(rel)
            if entry is None:
                raise TBPSError(f"{manifest_path}: no entry for {rel!r} (the manifest must name the camera of every "
                                "video and frames folder)")
            camera, start, fps = str(entry["camera"]).strip(), entry.get("start_epoch"), entry.get("fps")
        else:
            camera, start, fps = _camera_from_layout(base, path, kind), None, None
        source = Source(path=path.resolve(), rel=rel, kind=kind, camera=camera, start=start,
                        fps=float(fps or frame_rate) if kind == "frames" else None)
        if kind == "frames":
            source.frames = sorted(p.resolve() for p in path.iterdir()
                                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        sources.append(source)
    return sources


# ----------------------------------------------------------------------------- sampling

def sample_video(path: str | os.PathLike, sample_fps: float | None = None) -> Iterator[tuple[int, float, Image.Image]]:
    """``(frame number, seconds from the start, RGB image)`` of a video, one frame per 1/``sample_fps``
    seconds (every frame when None). A file that cannot be decoded is a one-line TBPSError."""
    from tbps.extras import require

    av = require("av", "footage", "reading video files")
    if sample_fps is not None and sample_fps <= 0:
        raise TBPSError(f"sample rate must be positive, got {sample_fps} frames per second")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise TBPSError(f"{path}: unreadable video ({type(exc).__name__}: {str(exc)[:120]})") from None
    with container:
        if not container.streams.video:
            raise TBPSError(f"{path}: no video stream")
        stream = container.streams.video[0]
        first: float | None = None
        next_time = 0.0
        number = -1
        try:
            for frame in container.decode(stream):
                number += 1
                seconds = float(frame.time) if frame.time is not None else number / float(stream.average_rate or 1)
                first = seconds if first is None else first
                seconds -= first
                if sample_fps is None or seconds >= next_time - 1e-6:
                    while sample_fps is not None and next_time <= seconds + 1e-6:
                        next_time += 1.0 / sample_fps
                    yield number, round(seconds, 6), frame.to_image().convert("RGB")
        except av.error.FFmpegError as exc:
            raise TBPSError(f"{path}: unreadable video at frame {number + 1} ({type(exc).__name__}: "
                            f"{str(exc)[:120]})") from None
        if number < 0:
            raise TBPSError(f"{path}: unreadable video (no frame decodes)")


def _sample_frames(source: Source, sample_fps: float | None) -> Iterator[tuple[int, float, Image.Image | str]]:
    step = 1 if sample_fps is None else max(1, int(round(source.fps / sample_fps)))
    for number in range(0, len(source.frames), step):
        try:
            image: Image.Image | str = load_image(source.frames[number])
        except TBPSError as exc:
            image = str(exc)
        yield number, round(number / source.fps, 6), image


# ----------------------------------------------------------------------------- ingest

def _key(rel: str) -> str:
    """A source's folder name under crops/ and frames/: its relative path, flattened and safe."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "__")).strip("._") or "root"


def _save_jpeg(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=92)


def read_progress(root: Path) -> list[dict[str, Any]]:
    """Finished sources of an index folder, in order (a torn last line from a kill is ignored)."""
    path = root / PROGRESS
    if not path.is_file():
        return []
    done = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return done


def _append_progress(root: Path, record: dict[str, Any]) -> None:
    path = root / PROGRESS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def track_affinity(a: list[float], b: list[float]) -> float:
    """How likely two boxes of consecutive samples are one person, 0 (no) to 1 (same box).

    Boxes of walking people are tall and narrow, so a step sideways can leave no overlap at all;
    instead of IoU the distance between centres is measured in person heights: 0 at the same place,
    0 beyond 0.6 heights sideways or 0.25 heights up or down, or when the heights differ by more
    than a third.
    """
    ha, hb = a[3] - a[1], b[3] - b[1]
    if min(ha, hb) <= 0 or max(ha, hb) / min(ha, hb) > 4 / 3:
        return 0.0
    h = (ha + hb) / 2
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2 / h
    dy = abs((a[1] + a[3]) - (b[1] + b[3])) / 2 / h
    if dx > 0.6 or dy > 0.25:
        return 0.0
    return 1.0 - max(dx / 0.6, dy / 0.25)


def _link_tracks(previous: list[tuple[list[float], str]], boxes: list[list[float]], prefix: str,
                 counter: list[int]) -> list[str]:
    """Track ids for ``boxes``: the previous sample's box of highest :func:`track_affinity` (each
    used once, best pairs first), else a new track."""
    pairs = sorted(((track_affinity(b, p), i, j) for i, b in enumerate(boxes) for j, (p, _) in enumerate(previous)),
                   reverse=True)
    ids: list[str | None] = [None] * len(boxes)
    taken: set[int] = set()
    for affinity, i, j in pairs:
        if affinity <= 0.0:
            break
        if ids[i] is None and j not in taken:
            ids[i] = previous[j][1]
            taken.add(j)
    for i in range(len(boxes)):
        if ids[i] is None:
            ids[i] = f"{prefix}/{counter[0]}"
            counter[0] += 1
    return ids  # type: ignore[return-value]


def ingest_source(source: Source, root: Path, detector: Detector, sample_fps: float | None,
                  min_height: int = 16) -> tuple[list[dict[str, Any]], int, int]:
    """Crops of one source written under ``root``; returns (crop records, frames sampled, unreadable frames)."""
    key = _key(source.rel)
    frames = sample_video(source.path, sample_fps) if source.kind == "video" else _sample_frames(source, sample_fps)
    crops: list[dict[str, Any]] = []
    sampled = unreadable = 0
    previous: list[tuple[list[float], str]] = []
    counter = [0]
    for number, seconds, image in frames:
        if isinstance(image, str):
            log.warning("skipped unreadable frame: %s", image)
            unreadable += 1
            continue
        sampled += 1
        width, height = image.size
        boxes, scores = [], []
        for detection in detector(image, FrameRef(source.camera, number)):
            box = clip_box(detection.box, width, height)
            if box is not None and box[3] - box[1] >= min_height:
                boxes.append(list(box))
                scores.append(detection.score)
        tracks = _link_tracks(previous, boxes, f"{source.camera}/{key}", counter)
        previous = list(zip(boxes, tracks))
        if not boxes:
            continue
        if source.kind == "video":
            frame_rel = f"frames/{source.camera}/{key}/{number:06d}.jpg"
            _save_jpeg(image, root / frame_rel)
            frame_path = frame_rel
        else:
            frame_path = str(source.frames[number])
        when = seconds + source.start if source.start is not None else seconds
        for k, (box, score, track) in enumerate(zip(boxes, scores, tracks)):
            crop_rel = f"crops/{source.camera}/{key}/{number:06d}_{k:02d}.jpg"
            _save_jpeg(image.crop(tuple(box)), root / crop_rel)
            crops.append({"crop": crop_rel, "camera": source.camera, "source": str(source.path),
                          "frame": frame_path, "frame_number": number, "time": round(when, 6),
                          "absolute_time": source.start is not None, "box": box, "score": round(float(score), 6),
                          "track": track})
    return crops, sampled, unreadable


def ingest_footage(footage: str | os.PathLike, root: str | os.PathLike, detector: Detector, *,
                   sample_fps: float | None = None, manifest: str | os.PathLike | None = None,
                   frame_rate: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """Detect and crop every source not yet in ``root``'s progress file; returns the counts and
    ``crops`` (every crop of every finished source, old and new, as index-relative records)."""
    from tqdm import tqdm

    root = Path(root)
    sources = find_sources(footage, manifest, frame_rate)
    finished = read_progress(root)
    done = {record["source"] for record in finished}
    todo = [s for s in sources if str(s.path) not in done]
    summary = {"sources": len(sources), "already_ingested": len(sources) - len(todo), "unreadable_sources": 0,
               "unreadable_frames": 0, "frames": 0, "new_crops": 0, "unreadable_paths": []}
    for source in tqdm(todo, desc="detecting people", unit="source", disable=not progress):
        try:
            crops, sampled, bad = ingest_source(source, root, detector, sample_fps)
            record = {"source": str(source.path), "camera": source.camera, "status": "ok", "frames": sampled,
                      "unreadable_frames": bad, "crops": crops}
        except TBPSError as exc:
            log.warning("skipped unreadable footage: %s", exc)
            record = {"source": str(source.path), "camera": source.camera, "status": "unreadable",
                      "error": str(exc), "crops": []}
            summary["unreadable_sources"] += 1
            summary["unreadable_paths"].append(str(source.path))
        _append_progress(root, record)
        finished.append(record)
        summary["frames"] += record.get("frames", 0)
        summary["unreadable_frames"] += record.get("unreadable_frames", 0)
        summary["new_crops"] += len(record["crops"])
    summary["crops"] = [crop for record in finished for crop in record["crops"]]
    if not any(r["status"] == "ok" for r in finished):
        raise TBPSError(f"{footage}: no readable footage ({summary['unreadable_sources']} unreadable source(s), "
                        f"first: {summary['unreadable_paths'][0] if summary['unreadable_paths'] else '-'})")
    return summary


def build_footage_index(checkpoint: str | os.PathLike, footage: str | os.PathLike, out: str | os.PathLike,
                        detector: Detector, *, sample_fps: float | None = None,
                        manifest: str | os.PathLike | None = None, frame_rate: float = 1.0,
                        progress: bool = True, **index_options: Any) -> dict[str, Any]:
    """``tbps index --footage``: detect and crop people in ``footage``, then embed the crops into the
    index ``out`` with their camera, time, box, frame and track (one writer, resumable, appendable).

    ``index_options`` go to the image index (batch_size, device, num_workers, backend, shard_size).
    Returns the index summary plus the footage counts (``sources``, ``unreadable_sources``, ...).
    """
    from tbps.search import index as gallery

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise TBPSError(f"{root}: exists and is not a folder")
    existing = (root / gallery.MANIFEST).is_file()
    if existing and not gallery.read_manifest(root).get("footage"):
        raise TBPSError(f"{root}: holds an index of crops, not of footage; index the footage into a new folder")
    leftovers = {"crops", "frames", "footage"}  # a run killed before its first shard
    if root.is_dir() and not existing and any(not p.name.startswith(".") and p.name not in leftovers
                                              for p in root.iterdir()):
        raise TBPSError(f"{root}: folder is not empty and holds no tbps index (choose a new --out)")
    if not Path(checkpoint).is_file():
        raise TBPSError(f"{checkpoint}: checkpoint not found")
    if Path(footage).is_dir() and root.resolve().is_relative_to(Path(footage).resolve()):
        raise TBPSError(f"{root}: the index folder is inside the footage folder {footage} (its crops would be "
                        "read as footage next time); choose an --out outside it")
    find_sources(footage, manifest, frame_rate)  # bad footage or manifest: fail before creating anything
    with gallery._writer_lock(root):
        counts = ingest_footage(footage, root, detector, sample_fps=sample_fps, manifest=manifest,
                                frame_rate=frame_rate, progress=progress)
        base = root.resolve()
        metadata = {str(base / crop["crop"]): {k: v for k, v in crop.items() if k != "crop"} for crop in counts.pop("crops")}
        if not metadata:
            raise TBPSError(f"{footage}: the detector found no person in any sampled frame")
        summary = gallery._build_locked(checkpoint, list(metadata), str(base), root, existing, metadata=metadata,
                                        progress=progress, **{"batch_size": 64, "device": "auto", "num_workers": None,
                                                              "backend": "auto",
                                                              "shard_size": gallery.DEFAULT_SHARD_SIZE,
                                                              **index_options})
    return {**summary, **counts}
