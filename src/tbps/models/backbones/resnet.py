"""torchvision ResNets as feature-map image encoders, with the user's weights read from a local file.

Part-based methods (PCC) need the last feature map, not a pooled vector: :class:`ResNetEncoder`
runs the torchvision trunk (``conv1`` ... ``layer4``) and returns ``(B, C, h, w)``. The torchvision
module sits under ``backbone.`` with torchvision's own parameter names, so a state dict saved with
``torch.save(torchvision.models.resnet50(...).state_dict(), path)`` loads as it is (the classifier
``fc.`` is dropped). Nothing is downloaded: without a file the weights are random.

``last_stride=1`` removes the down-sampling of ``layer4`` (the re-identification habit, Luo et al.'s
"bag of tricks"): the map is twice as tall and wide (24x8 at 384x128), so horizontal stripes have
more rows to pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tbps.errors import TBPSError
from tbps.models.backbones import check_state_dict

__all__ = ["RESNET_NAMES", "ResNetEncoder", "build_resnet", "load_resnet_weights", "read_state_dict", "resnet_grid", "resnet_trunk"]


def _builders() -> dict[str, Callable[..., nn.Module]]:
    from torchvision import models

    return {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
            "resnet101": models.resnet101}


RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")


def resnet_trunk(name: str, last_stride: int = 2) -> nn.Module:
    """A torchvision ResNet without its ImageNet classifier and pooling (``fc``/``avgpool`` None).

    ``last_stride=1`` removes the down-sampling of layer4's first block (conv and shortcut), the ReID
    habit: a 16-pixel grid instead of 32, twice the rows and columns of the last map.
    """
    net = _builders()[name](weights=None)
    net.fc = None
    net.avgpool = None
    if last_stride == 1:
        for module in net.layer4[0].modules():
            if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                module.stride = (1, 1)
    return net


def resnet_grid(image_size: Sequence[int], last_stride: int = 2) -> tuple[int, int]:
    """Feature-map (rows, cols) of a torchvision ResNet for an input of ``(height, width)``.

    Each of conv1, the max-pool, layer2, layer3 and layer4 (stride 2) rounds up a halving
    (kernel 3 or 7 with matching padding), so the size is a chain of ``ceil(x / 2)``.
    """
    halvings = 5 if last_stride == 2 else 4
    rows, cols = int(image_size[0]), int(image_size[1])
    for _ in range(halvings):
        rows, cols = math.ceil(rows / 2), math.ceil(cols / 2)
    return rows, cols


class ResNetEncoder(nn.Module):
    """A torchvision ResNet trunk under ``backbone``; ``forward`` returns the last feature map.

    ``out_channels``: 512 (resnet18/34) or 2048 (resnet50/101).
    """

    def __init__(self, name: str, last_stride: int = 2) -> None:
        super().__init__()
        if name not in RESNET_NAMES:
            raise TBPSError(f"model.image_backbone={name!r}: choose one of {', '.join(RESNET_NAMES)}")
        if last_stride not in (1, 2):
            raise TBPSError(f"last_stride must be 1 or 2, got {last_stride}")
        net = self.backbone = resnet_trunk(name, last_stride)
        self.arch = name
        self.last_stride = last_stride
        self.out_channels = int(512 * type(net.layer4[-1]).expansion)

    def forward(self, images: Tensor) -> Tensor:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def read_state_dict(path: str | Path, what: str = "torch state dict") -> dict[str, Tensor]:
    """The tensors of a torchvision-style weight file, read by the one safe loader (never unpickling code).

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``module.`` / ``backbone.`` prefixes are
    removed; floating tensors come back as float32. Anything else is a one-line error naming the file.
    """
    from tbps.safe_load import load_torch_file

    path = Path(path).expanduser()
    obj = load_torch_file(path, what)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TBPSError(f"{path}: not a state dict of tensors (save one with torch.save(model.state_dict(), path))")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value.float() if value.is_floating_point() else value
    return state


def load_resnet_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Read a torchvision ResNet state dict (``.pth``/``.pt``) into ``encoder.backbone``.

    The ``fc.`` classifier is ignored; any missing, unexpected or mis-shaped weight is a one-line
    error naming the file, since it means the file is another architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TBPSError(f"{path}: file not found (model.pretrained: a torchvision {encoder.arch} state dict)")
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    check_state_dict(encoder.backbone, state, str(path), f"torchvision {encoder.arch}")
    encoder.backbone.load_state_dict(state, strict=True)


def build_resnet(name: str, weights: str | Path = "", last_stride: int = 2) -> ResNetEncoder:
    """A :class:`ResNetEncoder` by torchvision name, with ``weights`` read from a local file if given."""
    encoder = ResNetEncoder(name, last_stride)
    if weights:
        load_resnet_weights(encoder, weights)
    return encoder
