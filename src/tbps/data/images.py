"""Reading pedestrian images, and a dataset of image paths for embedding galleries."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from tbps.errors import TBPSError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, or raise a TBPSError naming the file and the problem."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise TBPSError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TBPSError(f"{path}: cannot decode image ({exc})") from None


class ImagePathDataset:
    """``(index, image_tensor)`` for a list of paths: what the evaluator and the indexer embed."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return index, self.transform(load_image(self.paths[index]))
