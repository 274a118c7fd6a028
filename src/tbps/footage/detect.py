"""Person detectors for footage: torchvision's detection models with the user's weight file,
OpenCV's HOG people detector (offline, ships with OpenCV), and ground-truth boxes of synthetic
scenes (to measure the rest of the pipeline without detection errors).

Every detector is a callable ``detector(image, frame) -> list[Detection]``: ``image`` an RGB PIL
image, ``frame`` the :class:`FrameRef` (camera, frame number) it came from. ``build_detector(spec)``
turns the ``tbps index --detector`` value into one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from tbps.errors import TBPSError

# torchvision builder name -> name of its COCO weights enum (for the cache file name)
TORCHVISION_DETECTORS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights",
    "retinanet_resnet50_fpn_v2": "RetinaNet_ResNet50_FPN_V2_Weights",
    "ssdlite320_mobilenet_v3_large": "SSDLite320_MobileNet_V3_Large_Weights",
    "ssd300_vgg16": "SSD300_VGG16_Weights",
    "fcos_resnet50_fpn": "FCOS_ResNet50_FPN_Weights",
}
COCO_CLASSES = 91
COCO_PERSON = 1
DETECTOR_HELP = ("hog (OpenCV's people detector, offline), hog:FILE.npz (a HOG detector trained on synthetic "
                 "scenes by tbps train-detector), boxes:ANNOTATIONS.json (the ground-truth boxes of "
                 "tbps synth --scenes), or a torchvision model: " + ", ".join(TORCHVISION_DETECTORS)
                 + " (weights: --detector-weights FILE, else torchvision's cache folder; never downloaded)")


@dataclass(frozen=True)
class FrameRef:
    """Where a frame came from: its camera and its number in the source (0-based, every frame counted)."""

    camera: str
    number: int


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    score: float


Detector = Callable[[Image.Image, FrameRef], list[Detection]]


def clip_box(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Integer box inside the frame, or None when less than 4x4 pixels of it are."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    return (x0, y0, x1, y1) if x1 - x0 >= 4 and y1 - y0 >= 4 else None


# ----------------------------------------------------------------------------- OpenCV HOG

class HOGDetector:
    """OpenCV's HOG + linear SVM people detector (Dalal & Triggs, trained on INRIA; its weights ship
    inside OpenCV, so it runs anywhere with no user file).

    Its 64x128 window holds a person with margins, so boxes are shrunk to the body by ``shrink``
    (kept width and height fractions, centred). ``min_score`` thresholds the SVM margin; overlapping
    windows are merged by non-maximum suppression (IoU ``nms``). The defaults are the best AP@0.5
    of a grid (width 0.45-0.7, height 0.75-0.95, NMS 0.3/0.45) on calibration scenes (seed 1), which
    are not the scenes the benchmark reports on (benchmarks/README.md, "Footage").
    """

    def __init__(self, min_score: float = 0.0, shrink: tuple[float, float] = (0.55, 0.9), scale: float = 1.05,
                 nms: float = 0.3, upscale: float = 1.0) -> None:
        from tbps.extras import require

        cv2 = require("cv2", "footage", "the HOG person detector")
        self.cv2 = cv2
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.min_score, self.shrink, self.scale, self.nms, self.upscale = min_score, shrink, scale, nms, upscale

    def __call__(self, image: Image.Image, frame: FrameRef | None = None) -> list[Detection]:
        array = np.asarray(image.convert("RGB"))[:, :, ::-1]
        if self.upscale != 1.0:
            array = self.cv2.resize(array, None, fx=self.upscale, fy=self.upscale)
        rects, weights = self.hog.detectMultiScale(array, winStride=(8, 8), padding=(16, 16), scale=self.scale,
                                                   hitThreshold=self.min_score)
        if len(rects) == 0:
            return []
        boxes = np.asarray(rects, dtype=np.float64) / self.upscale
        scores = np.asarray(weights, dtype=np.float64).reshape(-1)
        kw, kh = self.shrink
        cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
        w, h = boxes[:, 2] * kw, boxes[:, 3] * kh
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        keep = nms(xyxy, scores, self.nms)
        return [Detection(tuple(float(v) for v in xyxy[i]), float(scores[i])) for i in keep]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    import torch
    from torchvision.ops import nms as tv_nms

    if len(boxes) == 0:
        return []
    return tv_nms(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
                  threshold).tolist()


# ----------------------------------------------------------------------------- torchvision

def torchvision_cache_file(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s COCO weights once downloaded: ``torch.hub.get_dir()/checkpoints``."""
    import torch
    import torchvision.models.detection as detection

    weights = getattr(detection, TORCHVISION_DETECTORS[arch]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _load_state_dict(path: Path) -> dict[str, Any]:
    """The file's tensors, read by the one safe loader (a file that would run code is refused)."""
    from tbps.safe_load import load_torch_file

    if not Path(path).expanduser().exists():
        raise TBPSError(f"{path}: detector weight file not found")
    state = load_torch_file(path, "torchvision weight file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint holding the model's state dict
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise TBPSError(f"{path}: not a torchvision state dict (expected parameter names -> tensors)")
    return state


class TorchvisionDetector:
    """A torchvision detection model (Faster R-CNN, RetinaNet, SSD/SSDlite, FCOS) from a local
    weight file; only the person class is kept.

    The class count is read from the file (COCO files have 91 and person is label 1; a model
    fine-tuned on persons only has 2), so ``person_label`` is the only thing a user may need to set.
    """

    def __init__(self, arch: str, weights: str | os.PathLike | None = None, min_score: float = 0.5,
                 person_label: int = COCO_PERSON, device: str = "cpu") -> None:
        import torch
        import torchvision.models.detection as detection

        if arch not in TORCHVISION_DETECTORS:
            raise TBPSError(f"detector {arch!r}: choose hog, boxes:FILE or one of {', '.join(TORCHVISION_DETECTORS)}")
        path = Path(weights).expanduser() if weights else torchvision_cache_file(arch)
        if not path.is_file():
            where = "" if weights else f" (looked in torchvision's cache; pass --detector-weights FILE)"
            raise TBPSError(f"{path}: no weight file for detector {arch}{where}; nothing is downloaded")
        state = _load_state_dict(path)
        builder = getattr(detection, arch)
        model = builder(weights=None, weights_backbone=None, num_classes=COCO_CLASSES)
        num_classes = _infer_num_classes(model.state_dict(), state)
        if num_classes != COCO_CLASSES:
            model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            names = (missing or unexpected)[:3]
            raise TBPSError(f"{path}: not {arch} weights ({len(missing)} missing, {len(unexpected)} unexpected "
                            f"parameters, e.g. {', '.join(names)})")
        if not 0 <= person_label < num_classes:
            raise TBPSError(f"{path}: person label {person_label} is outside the model's {num_classes} classes")
        self.arch, self.path, self.num_classes = arch, path, num_classes
        self.min_score, self.person_label = min_score, person_label
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    def __call__(self, image: Image.Image, frame: FrameRef | None = None) -> list[Detection]:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        tensor = pil_to_tensor(image.convert("RGB")).float().div(255.0).to(self.device)
        with torch.inference_mode():
            out = self.model([tensor])[0]
        keep = (out["labels"] == self.person_label) & (out["scores"] >= self.min_score)
        return [Detection(tuple(float(v) for v in box), float(score))
                for box, score in zip(out["boxes"][keep].cpu(), out["scores"][keep].cpu())]


def _infer_num_classes(built: dict[str, Any], loaded: dict[str, Any]) -> int:
    """Class count of a weight file: a classifier layer's rows scale with it (anchors x classes)."""
    for key, tensor in built.items():
        other = loaded.get(key)
        if other is not None and other.ndim and tensor.ndim == other.ndim and tensor.shape[1:] == other.shape[1:] \
                and tensor.shape[0] != other.shape[0] and tensor.shape[0] % COCO_CLASSES == 0:
            per_class = tensor.shape[0] // COCO_CLASSES
            if other.shape[0] % per_class == 0:
                return other.shape[0] // per_class
    return COCO_CLASSES


# ----------------------------------------------------------------------------- ground truth

class BoxesDetector:
    """The ground-truth boxes of ``tbps synth --scenes`` (``annotations.json``), found by camera and
    frame number: the end-to-end measure with perfect detection, for comparison with a detector."""

    def __init__(self, annotations: str | os.PathLike) -> None:
        from tbps.footage.scenes import load_annotations

        data = load_annotations(annotations)
        self.boxes: dict[tuple[str, int], list[Detection]] = {}
        for record in data["frames"]:
            self.boxes[(record["camera"], int(record["index"]))] = [
                Detection(tuple(float(v) for v in p["box"]), 1.0) for p in record["people"] if not p["ignore"]]

    def __call__(self, image: Image.Image, frame: FrameRef) -> list[Detection]:
        return list(self.boxes.get((frame.camera, frame.number), []))


def build_detector(spec: str, weights: str | None = None, min_score: float | None = None,
                   device: str = "cpu") -> Detector:
    """``hog`` | ``boxes:FILE`` | a torchvision builder name (see :data:`DETECTOR_HELP`)."""
    if spec == "hog":
        return HOGDetector(min_score=0.0 if min_score is None else min_score)
    if spec.startswith("hog:"):
        from tbps.footage.hog_train import load_trained_hog

        return load_trained_hog(spec[len("hog:"):], min_score=0.0 if min_score is None else min_score)
    if spec.startswith("boxes:"):
        return BoxesDetector(spec[len("boxes:"):])
    if spec in TORCHVISION_DETECTORS:
        return TorchvisionDetector(spec, weights, min_score=0.5 if min_score is None else min_score, device=device)
    raise TBPSError(f"detector {spec!r}: choose {DETECTOR_HELP}")
