"""Swin Transformer image encoders (timm) that return their stage feature maps.

Why Swin: ACSA (Ji et al., TMM 2022) takes region and window features from a hierarchical
transformer's intermediate stages (the authors use Swin-Tiny). timm already comes with open_clip, so
the architecture is timm's ``SwinTransformer``; this module only

- builds it by timm name (``swin_tiny_patch4_window7_224``, ...) with optional explicit dims
  (``embed_dim``, ``depths``, ``num_heads``, ``window_size``) for tiny CPU models, at any input
  size whose sides are multiples of the patch size (timm pads the windows: 128x64, 384x128 work);
- reads user weights from a local file or folder (timm ``.pth``/``.bin``/``.safetensors``, a
  ``{"model": ...}``/``{"state_dict": ...}`` wrapper, the original Microsoft release, or a Hugging
  Face timm folder with ``model.safetensors``/``pytorch_model.bin``); nothing is downloaded. timm's
  own ``checkpoint_filter_fn`` converts old layouts and resizes relative-position tables when the
  window differs; every other mismatch is a one-line :class:`TBPSError` naming key and shapes;
- returns every stage's feature map (B, C_s, H_s, W_s) and the final-normed last stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tbps.errors import TBPSError
from tbps.models.backbones.weights import check_state_dict, load_tensor_file, strip_module_prefix

__all__ = ["SwinBackbone", "build_swin", "read_swin_weights"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def read_swin_weights(path: str | Path) -> dict[str, Tensor]:
    """State dict of a Swin checkpoint, unwrapped (``model``/``state_dict``, ``module.`` prefixes)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TBPSError(f"{path}: file not found")
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TBPSError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    obj = load_tensor_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise TBPSError(f"{path}: no state dict of tensors in this file")
    state = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            key = strip_module_prefix(key)
            for prefix in ("backbone.", "visual.trunk."):  # detection / open_clip wrappers
                if key.startswith(prefix):
                    key = key[len(prefix):]
            state[key] = value.float() if value.is_floating_point() else value
    return state


class SwinBackbone(nn.Module):
    """A timm SwinTransformer (under ``backbone``) returning its stage maps.

    ``forward(images)`` -> ``{"stages": [(B, C_s, H_s, W_s) for each stage], "last": (B, C, H, W)}``,
    where ``last`` is the final stage after Swin's closing LayerNorm (what its classifier pools).
    """

    def __init__(self, backbone: nn.Module, arch: str, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.image_size = tuple(image_size)
        self.stage_dims = [int(info["num_chs"]) for info in backbone.feature_info]
        self.stage_strides = [int(info["reduction"]) for info in backbone.feature_info]
        self.num_features = int(backbone.num_features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> dict[str, Any]:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"Swin built for {self.image_size[0]}x{self.image_size[1]} input, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        last, stages = self.backbone.forward_intermediates(images)
        return {"stages": stages, "last": last.permute(0, 3, 1, 2)}  # timm keeps NHWC inside


def build_swin(arch: str, image_size: Sequence[int], weights: str = "", embed_dim: int = 0,
               depths: Sequence[int] = (), num_heads: Sequence[int] = (), window_size: int = 0,
               drop_path_rate: float = 0.1) -> SwinBackbone:
    """A Swin of timm architecture ``arch`` for ``image_size`` = (height, width).

    Non-zero / non-empty ``embed_dim``, ``depths``, ``num_heads``, ``window_size`` replace the
    architecture's. ``weights``: a local checkpoint (file or folder) read into it, or "" for random
    initialisation.
    """
    import timm

    size = tuple(int(s) for s in image_size)
    if not arch.startswith("swin"):
        raise TBPSError(f"model.image_backbone={arch!r}: not a Swin architecture (e.g. swin_tiny_patch4_window7_224)")
    if arch not in timm.list_models("swin*"):
        raise TBPSError(f"model.image_backbone={arch!r}: unknown Swin architecture in timm "
                        f"(e.g. swin_tiny_patch4_window7_224, swin_small_patch4_window7_224)")
    kwargs: dict[str, Any] = {"img_size": size, "num_classes": 0, "drop_path_rate": drop_path_rate}
    if embed_dim:
        kwargs["embed_dim"] = int(embed_dim)
    if depths:
        kwargs["depths"] = tuple(int(d) for d in depths)
    if num_heads:
        kwargs["num_heads"] = tuple(int(h) for h in num_heads)
    if window_size:
        kwargs["window_size"] = int(window_size)
    if depths and num_heads and len(depths) != len(num_heads):
        raise TBPSError(f"Swin: {len(depths)} depths but {len(num_heads)} num_heads; give one per stage")
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TBPSError(f"Swin {arch!r} at {size[0]}x{size[1]}: cannot build it ({msg})") from None
    patch = model.patch_embed.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise TBPSError(f"data.image_size: {size[0]}x{size[1]} must be a multiple of Swin's patch size {patch[0]}")
    if weights:
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = read_swin_weights(weights)
        try:
            state = checkpoint_filter_fn(state, model)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TBPSError(f"{weights}: does not fit Swin {arch!r} ({msg})") from None
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # no classifier in tbps
        check_state_dict(model, state, str(weights), f"Swin {arch!r}")
        model.load_state_dict(state, strict=False)  # non-persistent buffers are rebuilt by timm
    return SwinBackbone(model, arch, size)
