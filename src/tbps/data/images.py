"""Reading pedestrian images, and a dataset of image paths for embedding galleries."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
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
    """``(index, image tensor or None, error)`` for a list of paths: what the evaluator and the indexer
    embed. An unreadable file gives None and a one-line error instead of an exception, because an
    exception raised in a DataLoader worker reaches the caller wrapped in the worker's traceback;
    the caller decides whether to skip the file (an index) or stop (an evaluation)."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(load_image(self.paths[index])), ""
        except TBPSError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a decoder or transform failure on a malformed file
            return index, None, f"{self.paths[index]}: {type(exc).__name__}: {exc}"


def collate_images(items: list[tuple[int, torch.Tensor | None, str]]
                   ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """``(indices, stacked images or None, [(index, error), ...])`` for a batch of
    :class:`ImagePathDataset` items: the readable ones stacked, the unreadable ones listed."""
    good = [(index, image) for index, image, _ in items if image is not None]
    bad = [(index, error) for index, image, error in items if image is None]
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, bad
