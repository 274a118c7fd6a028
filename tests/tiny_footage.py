"""A real, tiny footage index for the footage, serve and browser tests: two synthetic cameras of a
few frames, their ground-truth boxes as the detector, and the tiny random model of tiny_gallery."""

from __future__ import annotations

from pathlib import Path

from tbps.footage.detect import BoxesDetector
from tbps.footage.ingest import build_footage_index
from tbps.footage.scenes import generate_scenes

from tiny_gallery import save_tiny_checkpoint

CAMERAS = ("cam01", "cam02")


def make_scenes(root: Path, frames: int = 6, videos: bool = True) -> Path:
    generate_scenes(root, num_ids=60, cameras=len(CAMERAS), frames_per_camera=frames, people_per_frame=2,
                    height=192, width=256, fps=2, seed=3, videos=videos, progress=False)
    return root


def build_tiny_footage_index(root: Path, source: str = "frames") -> tuple[Path, Path]:
    """``(index folder, scenes folder)``: ``root/scenes/<source>`` indexed into ``root/index``."""
    scenes = make_scenes(root / "scenes")
    checkpoint = save_tiny_checkpoint(root / "model.pt")
    build_footage_index(checkpoint, scenes / source, root / "index", BoxesDetector(scenes / "annotations.json"),
                        progress=False, batch_size=8, device="cpu", num_workers=0)
    return root / "index", scenes
