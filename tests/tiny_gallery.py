"""A real, tiny gallery index for the serve, browser and visualize tests.

A randomly initialised tiny model (tiny ViT + CLIP text tower at 32x16) saved as a real tbps
checkpoint, a few random images, and ``tbps.search.build_index`` over them: seconds on a CPU.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tbps.config import load_config
from tbps.data.tokenizers import build_tokenizer
from tbps.engine.checkpoint import save_checkpoint
from tbps.models import build_model
from tbps.search import build_index

TINY = [
    "data.dataset=synth", "data.image_size=[32, 16]", "data.text_length=16", "data.tokenizer=clip",
    "model.image_backbone=tiny-vit", "model.text_backbone=clip", "model.pretrained=",
    "method.cross_width=32", "method.cross_layers=1", "method.cross_heads=2",
]
NUM_IMAGES = 12


def save_tiny_checkpoint(path: Path, seed: int = 0, overrides: list[str] | None = None) -> Path:
    torch.manual_seed(seed)
    cfg = load_config(None, TINY + list(overrides or []))
    model = build_model(cfg, 4, build_tokenizer(cfg.data.tokenizer, cfg.data.text_length), load_pretrained=False)
    save_checkpoint(path, model=model, cfg=cfg, num_classes=4)
    return path


def write_images(folder: Path, count: int = NUM_IMAGES, seed: int = 0) -> list[Path]:
    """``count`` random 40x20 PNGs (distinct content, so every row embeds differently)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"person{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def build_tiny_index(root: Path) -> Path:
    """``root/index``: an index of ``root/gallery`` built with ``root/model.pt``."""
    checkpoint = save_tiny_checkpoint(root / "model.pt")
    write_images(root / "gallery")
    build_index(checkpoint, root / "gallery", root / "index", batch_size=8, device="cpu", num_workers=0,
                progress=False)
    return root / "index"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
