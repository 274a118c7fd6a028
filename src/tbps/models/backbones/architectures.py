"""CLIP architectures by name (open_clip's, tbps's tiny ones in ``models/arch/``, or a JSON file), and
the pieces the CLIP towers share: the switchable GELU/QuickGELU activation and the block runner that
can return the last layer's attention map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tbps.errors import TBPSError

if TYPE_CHECKING:
    from tbps.config import ModelConfig

ARCH_DIR = Path(__file__).parent.parent / "arch"


def open_clip_module():
    import open_clip

    if str(ARCH_DIR) not in {str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS}:
        open_clip.add_model_config(ARCH_DIR)
    return open_clip


def get_arch_config(name: str) -> dict[str, Any]:
    """open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an architecture name.

    Names are open_clip's (``ViT-B-16``, ``RN50``, ...), tbps's tiny ones (``tiny-vit``, ``tiny-rn``), or
    a path to a JSON file in the same format.
    """
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TBPSError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    else:
        cfg = open_clip_module().get_model_config(name)
    if not cfg or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        known = ", ".join(["tiny-vit", "tiny-rn", "ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101"])
        raise TBPSError(f"model.image_backbone: unknown CLIP architecture {name!r} (e.g. {known}, "
                        f"or a path to an open_clip model-config .json)")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name", "attentional_pool") if vision.get(k)]
    unsupported += [k for k in ("hf_model_name", "embed_cls") if text.get(k)]
    if vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool"):
        unsupported.append("vision pool_type/final_ln_after_pool")
    if unsupported:
        raise TBPSError(f"model.image_backbone: architecture {name!r} uses {unsupported[0]}, which tbps's "
                        f"CLIP towers do not support (use a CLIP ViT or ModifiedResNet architecture)")
    return cfg


class SwitchableGELU(nn.Module):
    """GELU or OpenAI's QuickGELU (x * sigmoid(1.702 x)), chosen after construction.

    Why: whether a checkpoint needs QuickGELU is only known once its file is read (OpenAI vs
    open_clip weights share key names), and a tbps checkpoint must restore the choice without it.
    """

    def __init__(self, quick: bool = False) -> None:
        super().__init__()
        self.quick = quick

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)

    def extra_repr(self) -> str:
        return f"quick={self.quick}"


def install_switchable_gelu(tower: nn.Module) -> None:
    for block in tower.modules():
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = SwitchableGELU()


class ActivationMixin:
    """A persistent ``quick_gelu`` buffer that drives every SwitchableGELU under the module."""

    def _init_activation(self, quick: bool) -> None:
        self.register_buffer("quick_gelu", torch.tensor(bool(quick)))
        self._sync_activation()

    def set_quick_gelu(self, quick: bool) -> None:
        self.quick_gelu.fill_(bool(quick))
        self._sync_activation()

    def _sync_activation(self) -> None:
        quick = bool(self.quick_gelu.item())
        for module in self.modules():
            if isinstance(module, SwitchableGELU):
                module.quick = quick

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_activation()


def run_blocks(blocks: nn.ModuleList, x: Tensor, attn_mask: Tensor | None, use_checkpoint: bool,
                return_attention: bool) -> tuple[Tensor, Tensor | None]:
    """Run open_clip residual blocks; recompute the last block's attention map when asked.

    open_clip calls ``nn.MultiheadAttention`` with ``need_weights=False`` (fast path); the map is
    recomputed for the last block only, from that block's input, with the same weights.
    """
    attention = None
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if i == last and return_attention:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                raise TBPSError("backbone: attention maps need open_clip's default residual blocks "
                                "(nn.MultiheadAttention); this architecture uses custom blocks")
            h = block.ln_1(x)
            mask = attn_mask.to(h.dtype) if attn_mask is not None else None
            _, attention = block.attn(h, h, h, need_weights=True, attn_mask=mask,
                                      average_attn_weights=True)
        if use_checkpoint:
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    return x, attention


def resolve_quick_gelu(model_cfg: ModelConfig, meta: dict[str, Any] | None, arch_cfg: dict[str, Any]) -> bool:
    """QuickGELU or GELU: ``model.quick_gelu`` when on/off, else what the weight file's format says
    (OpenAI: quick), else the architecture config's ``quick_gelu`` (open_clip's own: GELU)."""
    if model_cfg.quick_gelu != "auto":
        return model_cfg.quick_gelu == "on"
    if meta is not None and meta.get("quick_gelu") is not None:
        return bool(meta["quick_gelu"])
    return bool(arch_cfg.get("quick_gelu", False))
