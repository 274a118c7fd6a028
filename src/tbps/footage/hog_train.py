"""A HOG people detector trained by tbps on synthetic scenes (the alternative to OpenCV's INRIA one).

Dalal & Triggs' recipe with OpenCV's HOG features: positive windows are the true boxes of
``tbps synth --scenes`` frames (and their mirror images), widened to the 64x128 window's shape
with the person at ``PERSON_HEIGHT`` of its height; negatives are random windows that overlap no
person; a linear classifier (L2-regularised logistic regression, full-batch L-BFGS) separates
them; one round of hard negatives (false detections on the training frames) is added and the
classifier refitted. The result is OpenCV's own detector with other weights, saved as ``.npz``
(numbers only, loaded without pickle) and used with ``--detector hog:FILE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from tbps.errors import TBPSError
from tbps.footage.detect import HOGDetector
from tbps.footage.evaluate import box_iou
from tbps.footage.scenes import load_annotations
from tbps.io import atomic_path

WINDOW = (64, 128)
PERSON_HEIGHT = 0.8  # the person's share of the window height


def _window_of(box: Sequence[float], width_ratio: float) -> tuple[float, float, float, float]:
    """The 1:2 window around a person box: the box is ``PERSON_HEIGHT`` of its height, centred."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h = (box[3] - box[1]) / PERSON_HEIGHT
    w = h * WINDOW[0] / WINDOW[1]
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _features(hog: Any, image: Image.Image, window: Sequence[float], flip: bool = False) -> np.ndarray:
    patch = image.crop(tuple(int(round(v)) for v in window)).resize(WINDOW, Image.BILINEAR)
    if flip:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return hog.compute(np.asarray(patch)[:, :, ::-1].copy()).reshape(-1)


def _fit(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    """Logistic regression: minimise mean log(1 + exp(-y (w.x + b))) + l2 |w|^2 (y in {-1, +1})."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.softplus(-y * (x @ w + b)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach().numpy().astype(np.float32), float(b.item())


def train_hog_detector(scenes: Sequence[str | os.PathLike], out: str | os.PathLike, negatives_per_frame: int = 12,
                       seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train on the frames of the given scenes folders; write ``out`` (.npz); return counts."""
    from tbps.extras import require

    cv2 = require("cv2", "footage", "tbps train-detector")
    rng = np.random.default_rng(seed)
    hog = cv2.HOGDescriptor()
    frames = []
    for root in scenes:
        data = load_annotations(root)
        for record in data["frames"]:
            frames.append((Path(root) / record["image"], [p["box"] for p in record["people"]],
                           [p["box"] for p in record["people"] if not p["ignore"]]))
    if not frames:
        raise TBPSError("no frames to train the detector on")
    positives, negatives, ratios = [], [], []
    for path, everyone, visible in frames:
        with Image.open(path) as img:
            image = img.convert("RGB")
        for box in visible:
            window = _window_of(box, 0.5)
            ratios.append((box[2] - box[0]) / (window[2] - window[0]))
            positives.append(_features(hog, image, window))
            positives.append(_features(hog, image, window, flip=True))
        width, height = image.size
        made = 0
        for _ in range(negatives_per_frame * 10):
            if made >= negatives_per_frame:
                break
            h = rng.uniform(0.25, 1.0) * height
            w = h / 2
            x0, y0 = rng.uniform(0, max(1.0, width - w)), rng.uniform(0, max(1.0, height - h))
            window = (x0, y0, x0 + w, y0 + h)
            if all(box_iou(window, box) < 0.2 for box in everyone):
                negatives.append(_features(hog, image, window))
                made += 1
    shrink = (float(np.median(ratios)), PERSON_HEIGHT)
    features = np.stack(positives + negatives)
    labels = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    weights, bias = _fit(features, labels)
    # one round of hard negatives: what the first classifier finds where nobody is
    detector = HOGDetector(shrink=shrink)
    detector.hog.setSVMDetector(np.append(weights, bias).astype(np.float32))
    hard = []
    for path, everyone, _ in frames:
        with Image.open(path) as img:
            image = img.convert("RGB")
        for found in detector(image):
            if all(box_iou(found.box, box) < 0.3 for box in everyone):
                hard.append(_features(hog, image, _window_of(found.box, 0.5)))
    if hard:
        features = np.concatenate([features, np.stack(hard)])
        labels = np.concatenate([labels, -np.ones(len(hard))])
        weights, bias = _fit(features, labels)
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, weights=weights, bias=np.float32(bias), shrink=np.asarray(shrink, np.float32))
    return {"frames": len(frames), "positives": len(positives), "negatives": len(negatives), "hard_negatives": len(hard),
            "shrink": shrink}


def load_trained_hog(path: str | os.PathLike, min_score: float = 0.0) -> HOGDetector:
    """A :class:`HOGDetector` with the weights :func:`train_hog_detector` wrote."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            weights, bias, shrink = data["weights"], float(data["bias"]), tuple(float(v) for v in data["shrink"])
    except FileNotFoundError:
        raise TBPSError(f"{path}: trained HOG detector file not found") from None
    except (OSError, ValueError, KeyError) as exc:
        raise TBPSError(f"{path}: not a trained HOG detector file ({type(exc).__name__})") from None
    detector = HOGDetector(min_score=min_score, shrink=shrink)
    if weights.shape != (detector.hog.getDescriptorSize(),):
        raise TBPSError(f"{path}: {weights.shape[0]} weights, a 64x128 HOG window has {detector.hog.getDescriptorSize()}")
    detector.hog.setSVMDetector(np.append(weights, bias).astype(np.float32))
    return detector
