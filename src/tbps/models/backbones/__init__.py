"""Image and text encoders: CLIP towers built by open_clip, BERT-family text encoders by transformers.

Every encoder returns, from ``forward(x, return_attention=False)``, a dict in the joint width
``D = encoder.output_dim``::

    tokens     (B, N, D)  every token projected into the joint space (ViT: CLS first; ModifiedResNet:
                          the attention-pool output first, then the h*w positions; text: all L positions)
    global     (B, D)     the embedding retrieval uses (ViT: CLS; RN: attention pool; CLIP text: EOT;
                          BERT: [CLS] or masked mean, by ``model.text_pooling``)
    attention  (B, N, N)  last layer's attention, averaged over heads (only when asked)
    mask       (B, N)     bool, valid tokens (text only)

Why the tokens are projected too: IRRA's cross-modal transformer and the fine-grained methods (CFFA,
FCSA) read patch/word tokens in the same space as the global features.

Parameter names: everything that comes from a pretrained checkpoint sits under ``backbone.`` (the
whole open_clip tower, or the Hugging Face model); modules this file adds are elsewhere and listed in
``encoder.new_parameter_prefixes`` (the BERT projection ``proj.``), so the optimiser can give them the
new-module learning rate.

Pretrained weights (``model.pretrained``) are read from a local path, never downloaded; the format is
detected: an OpenAI CLIP file (TorchScript archive or state dict), an open_clip checkpoint
(``.pt``/``.bin``/``.safetensors``, possibly ``{"state_dict": ...}`` with ``module.`` prefixes) or a
Hugging Face CLIP folder (``config.json`` + weights, keys renamed to open_clip's here).
After loading, position embeddings are resized to the target image grid (``model.pos_interpolation``:
bilinear, as IRRA, or bicubic / nearest) and text length, and the token embedding gets one row per
extra tokenizer id (``<|mask|>``: mean of the others).

Activation: OpenAI's CLIP uses QuickGELU, open_clip's own architectures GELU. The choice is read from
the weights' format (OpenAI, or a Hugging Face config's ``hidden_act``) or the architecture config, and
kept in a persistent ``quick_gelu`` buffer so a tbps checkpoint restores it without the pretrained
file. ``model.quick_gelu: on|off`` overrides the detection (``auto``, the default, keeps it).

The package, by section: ``architectures`` (arch configs, GELU/QuickGELU, block runner),
``pos_embed`` (resizing position/token embeddings), ``weights`` (reading and converting weight files,
``load_tensor_file``, ``check_state_dict``), ``clip_image`` / ``clip_text`` (the CLIP towers),
``hf_text`` (BERT-family encoders and their frozen-layer cache), ``torchvision_encoder`` / ``resnet`` /
``swin`` (ImageNet CNNs and Swin from local files). This module builds an encoder from ``cfg.model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from tbps.errors import TBPSError
from tbps.models.backbones.architectures import ARCH_DIR, get_arch_config
from tbps.models.backbones.clip_image import ClipImageEncoder, ClipResNetEncoder, build_clip_image_encoder, image_hw
from tbps.models.backbones.clip_text import ClipTextEncoder, build_clip_text
from tbps.models.backbones.hf_text import HFTextEncoder, build_hf_text, freeze_lower_text_layers, one_off_captions
from tbps.models.backbones.pos_embed import interpolate_grid_pos_embed, resize_text_pos_embed, resize_token_embedding
from tbps.models.backbones.weights import check_state_dict, load_tensor_file, read_clip_weights

if TYPE_CHECKING:
    from tbps.config import ModelConfig

__all__ = [
    "ARCH_DIR",
    "ClipImageEncoder",
    "ClipResNetEncoder",
    "ClipTextEncoder",
    "HFTextEncoder",
    "build_clip",
    "build_hf_text",
    "build_image_encoder",
    "build_text_encoder",
    "check_state_dict",
    "get_arch_config",
    "interpolate_grid_pos_embed",
    "is_torchvision_backbone",
    "load_tensor_file",
    "one_off_captions",
    "read_clip_weights",
    "resize_text_pos_embed",
    "resize_token_embedding",
]


def is_torchvision_backbone(arch: str) -> bool:
    """True for the torchvision CNNs (``torchvision_encoder``), whose weights are not CLIP's."""
    from tbps.models.backbones.torchvision_encoder import TORCHVISION_BACKBONES

    return arch in TORCHVISION_BACKBONES


def build_image_encoder(model_cfg: ModelConfig, image_size: Sequence[int] | int, load_pretrained: bool = True,
                        _weights: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """Image encoder named by ``model_cfg.image_backbone`` for ``image_size`` = [height, width].

    A CLIP tower (open_clip / tiny architectures; ``clip_image``): loads ``model_cfg.pretrained`` when
    set (and ``load_pretrained``); position embeddings are interpolated from the checkpoint's grid
    (mode ``model_cfg.pos_interpolation``). A torchvision CNN (``mobilenet_v2``,
    ``resnet18``...``resnet101``): ``torchvision_encoder``, ImageNet weights from a local file.
    """
    if is_torchvision_backbone(model_cfg.image_backbone):
        from tbps.models.backbones.torchvision_encoder import build_torchvision_encoder

        return build_torchvision_encoder(model_cfg, image_hw(image_size), load_pretrained)
    return build_clip_image_encoder(model_cfg, image_hw(image_size), load_pretrained, _weights)


def build_text_encoder(model_cfg: ModelConfig, tokenizer: Any, load_pretrained: bool = True,
                       _weights: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """Text encoder by ``model_cfg.text_backbone``: ``"clip"`` (the tower paired with
    ``image_backbone``, weights from ``pretrained``) or ``"hf"`` (``text_pretrained`` folder / "minilm").

    The tokenizer fixes the context length, the vocabulary size (extra rows for added tokens) and
    the pad/end ids used for the attention mask and pooling.
    """
    kind = model_cfg.text_backbone
    if kind == "hf":
        encoder = build_hf_text(model_cfg, tokenizer, load_pretrained)
        freeze_lower_text_layers(encoder, model_cfg.text_frozen_layers)
        if model_cfg.text_frozen_cache:
            encoder.enable_frozen_cache(model_cfg.text_frozen_layers)
        return encoder
    if kind != "clip":
        raise TBPSError(f"model.text_backbone: expected 'clip' or 'hf', got {kind!r}")
    if is_torchvision_backbone(model_cfg.image_backbone):
        raise TBPSError(f"model.text_backbone: image_backbone={model_cfg.image_backbone!r} has no CLIP text "
                        f"tower; use text_backbone=hf (e.g. text_pretrained: minilm)")
    weights = _weights
    if weights is None and load_pretrained and model_cfg.pretrained:
        weights = read_clip_weights(model_cfg.pretrained)
    return build_clip_text(model_cfg, tokenizer, weights)


def build_clip(model_cfg: ModelConfig, image_size: Sequence[int] | int, tokenizer: Any,
               load_pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
    """(image_encoder, text_encoder), reading the pretrained file once for both towers."""
    weights = None
    if load_pretrained and model_cfg.pretrained and not is_torchvision_backbone(model_cfg.image_backbone):
        weights = read_clip_weights(model_cfg.pretrained)
    image_encoder = build_image_encoder(model_cfg, image_size, load_pretrained, _weights=weights)
    text_encoder = build_text_encoder(model_cfg, tokenizer, load_pretrained, _weights=weights)
    return image_encoder, text_encoder
