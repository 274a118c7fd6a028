"""Reading CLIP weight files (OpenAI, open_clip, Hugging Face; never downloaded) into open_clip's key
names, and the strict one-line check that a state dict fits a module."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tbps.errors import TBPSError

_STATE_KEYS_TO_DROP = ("input_resolution", "context_length", "vocab_size", "logit_scale", "logit_bias")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def load_tensor_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise TBPSError(f"{path}: not a readable safetensors file ({exc})") from None
    from tbps.safe_load import load_torch_file

    return load_torch_file(path, "PyTorch checkpoint")


def strip_module_prefix(key: str) -> str:
    """A state-dict key without the ``module.`` prefixes that (Distributed)DataParallel adds when a
    wrapped model is saved, so files saved from a DDP run load like the rest."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise TBPSError(f"{path}: no state dict of tensors in this file")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        state[strip_module_prefix(key)] = value
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
            state = _unwrap_state_dict(load_tensor_file(folder / name), folder / name)
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
                state.update(load_tensor_file(folder / shard))
            break
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                state = load_tensor_file(folder / name)
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
        state = _unwrap_state_dict(load_tensor_file(path), path)
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


def load_tower(tower: nn.Module, state: dict[str, Tensor], arch: str, where: str,
                key_prefix: str = "") -> None:
    """Strict load with one-line errors naming the architecture, the file's key and both shapes."""
    check_state_dict(tower, state, where, f"architecture {arch!r}", key_prefix)
    tower.load_state_dict(state, strict=True)


def select_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def clip_text_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    roots = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in state.items() if k.startswith(roots)}
