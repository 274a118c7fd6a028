"""Image preprocessing: CLIP normalisation, and IRRA's train-time augmentation.

Pedestrian crops are resized to a fixed (height, width), usually 384x128, without keeping the aspect
ratio: that is how the published baselines were trained and evaluated, so it is what the pretrained
weights and the reported numbers assume.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import transforms as T

from tbps.errors import TBPSError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# What ImageNet-trained encoders (torchvision's MobileNetV2 / ResNets) expect. The transform below keeps
# CLIP's statistics for every model, so checkpoints, indexes and the server share one preprocessing;
# models/backbones/torchvision_encoder.py maps CLIP-normalised input to these exactly (a per-channel affine map).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _image_size(image_size: Any) -> tuple[int, int]:
    try:
        values = [int(v) for v in image_size]
        ok = len(values) == 2 and all(v > 0 and v == float(s) for v, s in zip(values, image_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TBPSError(f"data.image_size must be [height, width] in pixels, got {image_size!r}")
    return values[0], values[1]


def build_image_transform(
    image_size: Sequence[int] | Any, train: bool, augment: bool = True, flip: bool = False
) -> T.Compose:
    """PIL image -> normalised float tensor (3, H, W).

    ``image_size`` is ``[height, width]``, or a ``DataConfig`` (its ``image_size`` and ``augment``
    are used). Test: bicubic resize, CLIP normalisation. Train with ``augment``: IRRA's recipe
    (flip, pad 10 + random crop back to size, random erasing with scale 0.02-0.4). Random erasing
    fills with the CLIP mean values in normalised space, exactly as IRRA does. Train without
    ``augment`` but with ``flip``: the horizontal flip alone, so each image has just two pixel views
    (what a frozen-block cache can keep).
    """
    if hasattr(image_size, "image_size"):  # a DataConfig
        augment = augment and bool(getattr(image_size, "augment", True))
        flip = flip or bool(getattr(image_size, "flip", False))
        image_size = image_size.image_size
    height, width = _image_size(image_size)
    resize = T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)
    to_tensor = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if train and not augment and flip:
        return T.Compose([resize, T.RandomHorizontalFlip(0.5), *to_tensor])
    if not (train and augment):
        return T.Compose([resize, *to_tensor])
    return T.Compose(
        [
            resize,
            T.RandomHorizontalFlip(0.5),
            T.Pad(10),
            T.RandomCrop((height, width)),
            *to_tensor,
            T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)),
        ]
    )


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation for display: (3, H, W) or (B, 3, H, W) -> values in [0, 1]."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got shape {tuple(images.shape)}")
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(shape)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(shape)
    return (images * std + mean).clamp(0.0, 1.0)
