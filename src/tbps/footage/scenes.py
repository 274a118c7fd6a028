"""Synthetic camera footage: SynthPEDES people walking across fixed cameras, with exact boxes.

``tbps synth --scenes`` writes, for each camera, a folder of frames and the same frames as a video,
plus ``annotations.json`` with every person's box, identity and track in every frame, and captions
of every identity that appears. The people are the test identities of the SynthPEDES set made with
the same ``--ids`` and ``--seed`` (same attributes, same per-identity looks), so a model trained on
that set has never seen them, and a caption of person X can be scored end to end: is a crop of X
among the top k of the footage?

A person's box is measured, not predicted: the frame is compared with itself just before that
person was drawn, and the box is the extent of the changed pixels. ``visible`` is the share of
those pixels no nearer person covered later; people mostly hidden or cut by the frame edge are
marked ``ignore`` (they neither count as missed nor as false detections).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tbps.data import synth
from tbps.errors import TBPSError
from tbps.io import atomic_path, read_json, write_text_atomic

ANNOTATIONS = "annotations.json"
MANIFEST = "footage.json"
START = datetime.datetime(2026, 1, 5, 8, 0, 0, tzinfo=datetime.timezone.utc)
MIN_VISIBLE = 0.5
MIN_HEIGHT = 40  # pixels: smaller people are marked ignore


@dataclass
class Track:
    """One walk of one person through one camera's view."""

    pid: int
    track: int
    start: int  # first frame
    length: int
    x0: float  # body axis at the first frame, pixels
    vx: float  # pixels per frame
    foot_y: float
    view: str
    facing: int


def test_identities(num_ids: int, seed: int, val_fraction: float = 0.1,
                    test_fraction: float = 0.2) -> dict[int, synth.PersonAttributes]:
    """The test split of ``tbps synth --ids num_ids --seed seed``: pid -> attributes (same pids)."""
    n_train, n_val, n_test = synth.split_sizes(num_ids, val_fraction, test_fraction)
    people = synth.draw_identities(num_ids, np.random.default_rng([seed, 0]))
    first = n_train + n_val
    return {first + i + 1: people[first + i] for i in range(n_test)}


def _person_height(foot_y: float, height: int) -> float:
    """Perspective: people lower in the frame are nearer, hence taller (0.4 to 0.8 frame heights)."""
    t = min(1.0, max(0.0, (foot_y / height - 0.72) / 0.26))
    return height * (0.4 + 0.4 * t)


def _plan_tracks(rng: np.random.Generator, pids: list[int], frames: int, slots: int, width: int,
                 height: int, next_track: int) -> list[Track]:
    """``slots`` people at a time, each walking across (or standing, seen from front or back) for a
    few frames; when one leaves, the next person from ``pids`` (cycled) takes the slot."""
    tracks: list[Track] = []
    cursor = 0
    for slot in range(slots):
        band = (0.74 + 0.24 * slot / max(1, slots - 1)) if slots > 1 else 0.86
        frame = int(rng.integers(0, 3))
        while frame < frames:
            pid = pids[cursor % len(pids)]
            cursor += 1
            foot_y = height * min(0.98, max(0.72, band + rng.uniform(-0.03, 0.03)))
            if rng.random() < 0.75:
                facing = int(rng.choice([-1, 1]))
                view, vx = "side", facing * rng.uniform(0.02, 0.045) * width
            else:
                facing, view, vx = 1, str(rng.choice(["front", "back"])), rng.uniform(-0.004, 0.004) * width
            length = int(rng.integers(5, 11))
            x0 = rng.uniform(0.15, 0.85) * width
            tracks.append(Track(pid, next_track + len(tracks), frame, length, float(x0), float(vx),
                                float(foot_y), view, facing))
            frame += length + int(rng.integers(0, 3))
    return tracks


def _changed_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.any(before != after, axis=2)


def _bbox(mask: np.ndarray) -> list[int] | None:
    """``[x0, y0, x1, y1]`` of the true pixels, x1/y1 exclusive; None when there are none."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def render_frame(background: Image.Image, tracks: list[Track], frame: int,
                 people: dict[int, synth.PersonAttributes], looks: dict[int, Any], draw_people: bool = True
                 ) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One frame: the camera's background, then the people of the active tracks far to near.

    Returns the image and, per drawn person, ``{"pid", "track", "box", "visible", "ignore"}`` with
    the box measured from the pixels the drawing changed (see the module docstring).
    """
    img = background.copy()
    width, height = img.size
    active = sorted((t for t in tracks if t.start <= frame < t.start + t.length), key=lambda t: t.foot_y)
    placed = []
    draw = ImageDraw.Draw(img)
    for track in active:  # shadows first: part of the scene, never of a person's box
        step = frame - track.start
        h = _person_height(track.foot_y, height)
        cx = track.x0 + track.vx * step
        top = track.foot_y - 0.96 * h
        draw.ellipse([cx - 0.13 * h, top + 0.93 * h, cx + 0.13 * h, top + 0.99 * h], fill=(40, 40, 44))
        placed.append((track, step, h, cx, top))
    masks, annotations = [], []
    for track, step, h, cx, top in placed if draw_people else []:
        phase = math.sin(math.pi * step / 2.0)
        pose = synth.Pose(view=track.view, facing=track.facing, arm_swing=0.05 * phase if track.view == "side"
                           else 0.02, stride=0.09 * abs(phase), spread=0.045)
        before = np.asarray(img).copy()
        synth.render_person(img, people[track.pid], looks[track.pid], pose, cx, top, h)
        mask = _changed_mask(before, np.asarray(img))
        box = _bbox(mask)
        if box is None:
            continue
        masks.append(mask)
        cut = (cx - 0.22 * h < 0) or (cx + 0.22 * h > width) or top < 0
        annotations.append({"pid": track.pid, "track": track.track, "box": box, "cut": bool(cut)})
    for i, (mask, note) in enumerate(zip(masks, annotations)):
        covered = np.zeros_like(mask)
        for later in masks[i + 1:]:
            covered |= later
        drawn = int(mask.sum())
        note["visible"] = round(float((mask & ~covered).sum()) / max(1, drawn), 4)
        note["ignore"] = bool(note["visible"] < MIN_VISIBLE or note["box"][3] - note["box"][1] < MIN_HEIGHT
                              or note.pop("cut"))
    return img, annotations


def _write_video(path: Path, frames: list[Image.Image], fps: int) -> None:
    """H.264 MP4 through PyAV, written to a temporary name and renamed (never half a video)."""
    from tbps.extras import require

    av = require("av", "footage", "writing videos (tbps synth --scenes; --no-videos writes frames only)")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "preset": "veryfast"}
            for image in frames:
                for packet in stream.encode(av.VideoFrame.from_image(image)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def generate_scenes(out: str | Path, num_ids: int = 500, cameras: int = 3, frames_per_camera: int = 24,
                    people_per_frame: int = 3, height: int = 360, width: int = 640, fps: int = 4,
                    seed: int = 0, videos: bool = True, val_fraction: float = 0.1, test_fraction: float = 0.2,
                    progress: bool = True) -> dict[str, Any]:
    """Write ``frames/<camera>/NNNNNN.jpg``, ``videos/<camera>.mp4`` (when ``videos``), a
    ``footage.json`` manifest in each (camera, start time, frame rate) and ``annotations.json``.

    Returns ``{"cameras", "frames", "identities", "boxes"}``.
    """
    if cameras < 1 or frames_per_camera < 1 or people_per_frame < 1:
        raise TBPSError("--cameras, --frames and --people-per-frame must be at least 1")
    if height < 96 or width < 128 or height % 2 or width % 2:
        raise TBPSError(f"--height {height} --width {width}: scenes need even sizes of at least 128x96 pixels")
    if fps < 1:
        raise TBPSError(f"--fps {fps}: must be at least 1")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TBPSError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    (out / ANNOTATIONS).unlink(missing_ok=True)
    people = test_identities(num_ids, seed, val_fraction, test_fraction)
    looks = {pid: synth.draw_looks(np.random.default_rng([seed, 2, pid])) for pid in people}
    rng = np.random.default_rng([seed, 21])
    order = [int(p) for p in rng.permutation(sorted(people))]
    backgrounds = synth.make_backgrounds(np.random.default_rng([seed, 22]), height, width // 2, count=max(4, cameras))
    names = [f"cam{c + 1:02d}" for c in range(cameras)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cameras * frames_per_camera, desc="rendering scenes", unit="frame", dynamic_ncols=True)
    records, shown, manifest_frames, manifest_videos = [], {}, {"sources": {}}, {"sources": {}}
    next_track = 0
    for c, camera in enumerate(names):
        background = backgrounds[c % len(backgrounds)]
        if c >= len(backgrounds) or rng.random() < 0.5:
            background = background.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # each camera shows a rotating part of the pool, so some people appear on two cameras
        offset = (c * len(order)) // (cameras + 1)
        pids = order[offset:] + order[:offset]
        tracks = _plan_tracks(rng, pids, frames_per_camera, people_per_frame, width, height, next_track)
        next_track += len(tracks)
        for track in tracks:
            shown.setdefault(track.pid, track.view)
        folder = out / "frames" / camera
        folder.mkdir(parents=True, exist_ok=True)
        start = START + datetime.timedelta(minutes=10 * c)
        frames = []
        for index in range(frames_per_camera):
            img, annotations = render_frame(background, tracks, index, people, looks)
            rel = f"frames/{camera}/{index:06d}.jpg"
            with atomic_path(out / rel) as tmp:
                img.save(tmp, format="JPEG", quality=92)
            frames.append(img)
            records.append({"camera": camera, "index": index, "time": round(index / fps, 6), "image": rel,
                            "video": f"videos/{camera}.mp4" if videos else None, "people": annotations})
            if bar is not None:
                bar.update(1)
        entry = {"camera": camera, "start": start.isoformat(), "fps": fps}
        manifest_frames["sources"][camera] = entry
        if videos:
            (out / "videos").mkdir(exist_ok=True)
            _write_video(out / "videos" / f"{camera}.mp4", frames, fps)
            manifest_videos["sources"][f"{camera}.mp4"] = {"camera": camera, "start": start.isoformat()}
    if bar is not None:
        bar.close()
    write_text_atomic(out / "frames" / MANIFEST, json.dumps(manifest_frames, indent=1) + "\n")
    if videos:
        write_text_atomic(out / "videos" / MANIFEST, json.dumps(manifest_videos, indent=1) + "\n")
    identities = {str(pid): {"captions": synth.captions_for(people[pid], view, np.random.default_rng([seed, 23, pid]), 2)}
                  for pid, view in sorted(shown.items())}
    annotation = {"format": "tbps-scenes", "version": 1, "seed": seed, "ids": num_ids, "fps": fps,
                  "width": width, "height": height, "cameras": names, "identities": identities, "frames": records}
    write_text_atomic(out / ANNOTATIONS, json.dumps(annotation) + "\n")
    boxes = sum(len(r["people"]) for r in records)
    return {"cameras": cameras, "frames": len(records), "identities": len(identities), "boxes": boxes}


def load_annotations(root: str | Path) -> dict[str, Any]:
    """``annotations.json`` of a scenes folder (a one-line error when it is missing or not one)."""
    path = Path(root)
    path = path / ANNOTATIONS if path.is_dir() else path
    data = read_json(path, "scene annotations", missing="no scene annotations (write them with tbps synth --scenes)")
    if not isinstance(data, dict) or data.get("format") != "tbps-scenes":
        raise TBPSError(f"{path}: not a tbps scenes annotation file")
    return data
