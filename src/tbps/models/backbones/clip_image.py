"""CLIP image towers: the ViT (tokens = every patch projected, global = CLS) and the ModifiedResNet
(global = the attention pool, tokens = each position's value path), sized to the run's input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tbps.errors import TBPSError
from tbps.models.backbones.architectures import (ActivationMixin, get_arch_config, install_switchable_gelu,
                                                 resolve_quick_gelu, run_blocks)
from tbps.models.backbones.pos_embed import infer_grid, interpolate_grid_pos_embed
from tbps.models.backbones.weights import load_tower, read_clip_weights, select_prefix

if TYPE_CHECKING:
    from tbps.config import ModelConfig


def image_hw(image_size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise TBPSError(f"data.image_size: expected [height, width], got {list(size)}")
    return size  # type: ignore[return-value]


class ClipImageEncoder(ActivationMixin, nn.Module):
    """CLIP ViT (open_clip ``VisionTransformer`` under ``backbone``) at a fixed input size.

    tokens = ln_post(x) @ proj for every token (CLS first), global = the CLS token.
    """

    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, quick_gelu: bool, arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.output_dim = int(backbone.output_dim)
        self.image_size = tuple(backbone.image_size)
        self.grid_size = tuple(backbone.grid_size)
        self.num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self._init_activation(quick_gelu)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.transformer.grad_checkpointing = enable

    def forward(self, images: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"image encoder built for {self.image_size[0]}x{self.image_size[1]} "
                             f"input, got {images.shape[-2]}x{images.shape[-1]}")
        vit = self.backbone
        x = vit.conv1(images.to(vit.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = vit.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
        x = vit.ln_pre(vit.patch_dropout(x))
        use_ckpt = bool(vit.transformer.grad_checkpointing) and self.training
        x, attention = run_blocks(vit.transformer.resblocks, x, None, use_ckpt, return_attention)
        tokens = vit.ln_post(x) @ vit.proj
        out = {"tokens": tokens, "global": tokens[:, 0]}
        if return_attention:
            out["attention"] = attention
        return out


class ClipResNetEncoder(nn.Module):
    """CLIP ModifiedResNet (open_clip, under ``backbone``) with the attention pool sized to the input.

    tokens = [pooled, c_proj(v_proj(x_i + pos_i)) for each of the h*w positions]: the value path of
    the attention pool gives every position a token in the joint space (as MaskCLIP does);
    global = the attention pool's output (the pooled token). ``last_stride=1`` removes the last
    stage's down-sampling (TextReID), giving an H/16 x W/16 map.
    """

    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, image_size: tuple[int, int], last_stride: int, arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.output_dim = int(backbone.output_dim)
        self.image_size = tuple(image_size)
        stride = 32 if last_stride == 2 else 16
        self.grid_size = (image_size[0] // stride, image_size[1] // stride)
        self.num_tokens = 1 + self.grid_size[0] * self.grid_size[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """No-op: ResNet stages are cheap enough in memory."""

    def forward(self, images: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"image encoder built for {self.image_size[0]}x{self.image_size[1]} "
                             f"input, got {images.shape[-2]}x{images.shape[-1]}")
        net = self.backbone
        x = net.stem(images.to(net.conv1.weight.dtype))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        pool = net.attnpool
        seq = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        seq = torch.cat([seq.mean(dim=1, keepdim=True), seq], dim=1) + pool.positional_embedding.to(seq.dtype)
        from tbps.models.backbones.torchvision_encoder import attention_pool

        global_feat, attention = attention_pool(seq, pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj,
                                                pool.num_heads, return_attention, self.training)
        spatial = pool.c_proj(pool.v_proj(seq[:, 1:]))
        tokens = torch.cat([global_feat[:, None], spatial], dim=1)
        out = {"tokens": tokens, "global": global_feat}
        if return_attention:
            out["attention"] = attention
        return out


def _build_vision_tower(arch_cfg: dict[str, Any], image_size: tuple[int, int], last_stride: int) -> nn.Module:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower as build_tower

    vision = dict(arch_cfg["vision_cfg"])
    if isinstance(vision.get("layers"), (list, tuple)):
        for i, side in enumerate(image_size):
            if side % 32:
                raise TBPSError(f"data.image_size: {image_size[0]}x{image_size[1]} must be a multiple of "
                                f"32 for a ModifiedResNet ({'height' if i == 0 else 'width'} is {side})")
        vision["image_size"] = 32  # the attention pool's embedding is replaced below
        tower = build_tower(arch_cfg["embed_dim"], CLIPVisionCfg(**vision))
        stride = 32 if last_stride == 2 else 16
        if last_stride == 1:
            block = tower.layer4[0]
            block.avgpool = nn.Identity()
            if block.downsample is not None:
                block.downsample[0] = nn.Identity()  # the "-1" AvgPool2d
        elif last_stride != 2:
            raise TBPSError(f"model.resnet_last_stride: expected 1 or 2, got {last_stride}")
        grid = (image_size[0] // stride, image_size[1] // stride)
        pos = tower.attnpool.positional_embedding
        tower.attnpool.positional_embedding = nn.Parameter(
            torch.randn(1 + grid[0] * grid[1], pos.shape[1]) / pos.shape[1] ** 0.5)
        return tower
    patch = vision.get("patch_size", 16)
    for i, side in enumerate(image_size):
        if side % patch:
            raise TBPSError(f"data.image_size: {image_size[0]}x{image_size[1]} must be a multiple of the "
                            f"patch size {patch} ({'height' if i == 0 else 'width'} is {side})")
    vision["image_size"] = list(image_size)
    tower = build_tower(arch_cfg["embed_dim"], CLIPVisionCfg(**vision))
    install_switchable_gelu(tower)
    return tower


def _fit_image_state(state: dict[str, Tensor], tower: nn.Module, grid: tuple[int, int],
                     meta: dict[str, Any], mode: str) -> dict[str, Tensor]:
    """Resize the file's position embedding to the tower's ``grid`` (the rest must match exactly)."""
    key = "attnpool.positional_embedding" if hasattr(tower, "attnpool") else "positional_embedding"
    target = tower.state_dict()[key]
    old = state.get(key)
    if old is None or old.shape == target.shape or old.ndim != 2 or old.shape[1] != target.shape[1]:
        return state  # absent or wrong width: load_tower reports it
    hint = None if hasattr(tower, "attnpool") else meta.get("grid")
    old_grid = infer_grid(old.shape[0] - 1, grid, hint, meta["path"])
    return {**state, key: interpolate_grid_pos_embed(old, old_grid, grid, 1, mode)}


def build_clip_image_encoder(model_cfg: ModelConfig, size: tuple[int, int], load_pretrained: bool = True,
                             weights: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """The CLIP tower ``model_cfg.image_backbone`` (open_clip / tiny architectures) for ``size``.

    Loads ``weights`` (already read) or ``model_cfg.pretrained`` (when set and ``load_pretrained``);
    position embeddings are interpolated from the checkpoint's grid (``model.pos_interpolation``).
    """
    arch = model_cfg.image_backbone
    arch_cfg = get_arch_config(arch)
    last_stride = model_cfg.resnet_last_stride
    if weights is None and load_pretrained and model_cfg.pretrained:
        weights = read_clip_weights(model_cfg.pretrained)
    meta = weights[1] if weights is not None else None
    tower = _build_vision_tower(arch_cfg, size, last_stride)
    is_resnet = hasattr(tower, "attnpool")
    stride = 32 if last_stride == 2 else 16
    grid = (size[0] // stride, size[1] // stride) if is_resnet else tuple(tower.grid_size)
    if weights is not None:
        state = select_prefix(weights[0], "visual.")
        if not state:
            raise TBPSError(f"{meta['path']}: no image-tower weights ('visual.*' keys) in this file")
        state = _fit_image_state(state, tower, grid, meta, model_cfg.pos_interpolation)
        load_tower(tower, state, arch, meta["path"], "visual.")
    if is_resnet:
        return ClipResNetEncoder(tower, size, last_stride, arch)
    return ClipImageEncoder(tower, resolve_quick_gelu(model_cfg, meta, arch_cfg), arch)
