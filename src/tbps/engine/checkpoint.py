"""Checkpoints: written atomically, read with ``weights_only=True``, portable across datasets.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` can read it without unpickling arbitrary code. Loading for inference or
fine-tuning on another dataset skips the identity classifier when the number of identities differs
(a known fault of the reference code).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tbps import __version__
from tbps.config import Config, config_from_dict
from tbps.errors import TBPSError
from tbps.io import torch_save_atomic

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "num_classes")


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in a weights_only-safe form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: str | Path, *, model: nn.Module, cfg: Config, num_classes: int,
                    **extra: Any) -> None:
    """Write ``path`` atomically (temp file + rename): a kill never leaves a broken checkpoint."""
    payload = {
        "model": unwrap(model).state_dict(),
        "config": cfg.to_dict(),
        "num_classes": int(num_classes),
        "tbps_version": __version__,
        **extra,
    }
    torch_save_atomic(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tbps checkpoint with ``weights_only=True``; one-line errors for what users hit."""
    from tbps.safe_load import load_torch_file

    path = Path(path)
    if not path.is_file():
        raise TBPSError(f"{path}: checkpoint not found")
    ckpt = load_torch_file(path, "tbps checkpoint")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise TBPSError(f"{path}: not a tbps checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})")
    data = ckpt["config"].get("data") if isinstance(ckpt["config"], dict) else None
    if isinstance(data, dict) and checkpoint_tokenizer(ckpt) != data.get("tokenizer", "clip"):
        data["tokenizer"] = checkpoint_tokenizer(ckpt)
    return ckpt


_LEGACY_CLIP_VOCAB = 49409
_VOCAB_TABLES = ("token_embedding.weight", "word_embedding.weight", "mlm_head.fc.weight")


def checkpoint_tokenizer(ckpt: dict[str, Any]) -> str:
    """The tokenizer ``ckpt``'s weights were trained with: the one place that decides it.

    Its config's ``data.tokenizer``, except for checkpoints written before ``<|mask|>`` took IRRA's
    id 49405: their config says ``clip`` but their token tables have 49,409 rows (mask appended as
    49408), so they need ``clip-legacy`` to load, embed and train exactly as before.
    :func:`read_checkpoint` writes the answer into the config it returns (inference, ``--resume``);
    :func:`fine_tuning_tokenizer` applies it to a run started from a checkpoint.
    """
    from tbps.data.tokenizers import CLIP_LEGACY_NAME

    config = ckpt.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    name = str(data.get("tokenizer", "clip")) if isinstance(data, dict) else "clip"
    state = ckpt.get("model")
    if name.strip().lower() == "clip" and isinstance(state, dict) and any(
            key.endswith(_VOCAB_TABLES) and isinstance(value, torch.Tensor) and value.ndim >= 1
            and value.shape[0] == _LEGACY_CLIP_VOCAB for key, value in state.items()):
        return CLIP_LEGACY_NAME
    return name


def fine_tuning_tokenizer(requested: str, init: dict[str, Any]) -> str:
    """The tokenizer of a run that starts from checkpoint ``init`` (``train.init_checkpoint``).

    A run asking for ``clip`` from a ``clip-legacy`` checkpoint (read by :func:`read_checkpoint`)
    keeps the checkpoint's layout: its 49,409-row tables and trained mask row load unchanged.
    Any other request stands, and a real mismatch is reported by :func:`load_model_weights`.
    """
    from tbps.data.tokenizers import CLIP_LEGACY_NAME

    own = checkpoint_tokenizer(init)
    if str(requested).strip().lower() == "clip" and own == CLIP_LEGACY_NAME:
        return CLIP_LEGACY_NAME
    return requested


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load ``state`` into ``model``, skipping the identity classifier when its size differs.

    Returns the names of the skipped keys. Any other missing or mismatched key is an error that
    names the key and both shapes.
    """
    model = unwrap(model)
    own = model.state_dict()
    classifier_prefixes = tuple(getattr(model, "classifier_keys", ("classifier.",)))
    skipped: list[str] = []
    filtered: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.startswith(classifier_prefixes):
                skipped.append(key)
                continue
            raise TBPSError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(own[key].shape)} (a different architecture?)")
        filtered[key] = value
    missing = [k for k in own if k not in filtered and k not in skipped]
    unexpected = [k for k in filtered if k not in own]
    if missing and not all(k.startswith(classifier_prefixes) for k in missing):
        raise TBPSError(f"{source}: {len(missing)} model weights missing, e.g. {missing[0]} "
                        "(was it trained with another method or backbone?)")
    if unexpected:
        raise TBPSError(f"{source}: {len(unexpected)} unexpected weights, e.g. {unexpected[0]} "
                        "(was it trained with another method or backbone?)")
    model.load_state_dict(filtered, strict=False)
    if skipped:
        log.info("%s: identity classifier skipped (%s): the number of identities differs", source,
                 ", ".join(skipped))
    return skipped


def saved_config(ckpt: dict, path: str | Path):
    """The checkpoint's saved options as a Config; one line naming ``path`` when this tbps does not
    know one of them (a file written by another version)."""
    try:
        return config_from_dict(ckpt["config"])
    except TBPSError as exc:
        raise TBPSError(f"{path}: its saved config does not fit this version of tbps ({exc}); it was "
                        f"written by tbps {ckpt.get('tbps_version', '?')}") from None


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                               overrides: list[str] | None = None):
    """(model, cfg, tokenizer) ready for inference; pretrained backbone files are not needed.

    The text encoder's frozen-layer cache (``model.text_frozen_cache``, a training device) is off:
    a server would otherwise keep the features of every distinct query it was ever sent.

    ``overrides`` (``key=value``) change the saved config before the model is built: inference-time
    options such as a method's fusion weight, so one checkpoint can be scored several ways.
    """
    from tbps.config import apply_overrides
    from tbps.data.tokenizers import build_tokenizer
    from tbps.engine.distributed import resolve_device
    from tbps.models import build_model

    ckpt = read_checkpoint(path)
    saved_config(ckpt, path)  # the saved options alone first, so an error is the file's, not the overrides'
    cfg = config_from_dict(apply_overrides(ckpt["config"], list(overrides or [])))
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
    model = build_model(cfg, int(ckpt["num_classes"]), tokenizer, load_pretrained=False)
    load_model_weights(model, ckpt["model"], source=str(path))
    for module in model.modules():  # the training-time text cache would keep every distinct query
        if hasattr(module, "disable_frozen_cache"):
            module.disable_frozen_cache()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    return model, cfg, tokenizer
