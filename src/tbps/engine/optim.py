"""Optimiser parameter groups and the learning-rate schedule of the IRRA recipe.

Groups (benchmarks-protocol.md): pretrained backbone weights train at ``lr``; every module that is
not pretrained (classifier, cross-modal transformer, projection heads) at ``lr * new_lr_factor``;
biases with ``weight_decay_bias`` at

- ``bias_lr: group``: their group's rate times ``bias_lr_factor``;
- ``bias_lr: base`` (IRRA's code, ``solver/build.py``, ``build_optimizer``, and CFFA's copy of it):
  ``lr * bias_lr_factor`` wherever they sit, cross-modal modules included, except the biases of the
  model's ``head_prefixes`` (IRRA: classifier and MLM head), which train at ``lr * new_lr_factor``.

A model's ``fixed_lr`` (prefix -> lr) overrides all of that for its parameters (CFFA's FLFR heads
train at 1e-3 in the authors' solver). The schedule is per optimiser step, the same multiplier for
every group: a linear warm-up from ``warmup_factor`` over ``warmup_epochs``, then cosine to
``min_lr`` (or step decay at ``milestones``: ``gamma ** (number of milestones <= epoch)``, which is
torch's ``MultiStepLR`` stepped once an epoch, as ACSA's code does).
"""

from __future__ import annotations

import math
import torch
from torch import nn

from tbps.config import OptimConfig
from tbps.errors import TBPSError


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (lr, weight decay); each group keeps its parameter ``names``."""
    if cfg.bias_lr not in ("group", "base"):
        raise TBPSError(f"optim.bias_lr={cfg.bias_lr!r}: choose group or base")
    backbone_prefixes = tuple(getattr(model, "backbone_prefixes", ("image_encoder.", "text_encoder.")))
    head_prefixes = tuple(getattr(model, "head_prefixes", ()))
    fixed_lr = dict(getattr(model, "fixed_lr", {}) or {})
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = cfg.lr if name.startswith(backbone_prefixes) else cfg.lr * cfg.new_lr_factor
        weight_decay = cfg.weight_decay
        if name.endswith("bias"):
            weight_decay = cfg.weight_decay_bias
            if cfg.bias_lr == "group":
                lr *= cfg.bias_lr_factor
            elif head_prefixes and name.startswith(head_prefixes):
                lr = cfg.lr * cfg.new_lr_factor
            else:
                lr = cfg.lr * cfg.bias_lr_factor
        for prefix, value in fixed_lr.items():
            if name.startswith(prefix):
                lr = float(value)
        key = (lr, weight_decay)
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lr, "weight_decay": weight_decay})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise TBPSError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    for group in groups:
        group.pop("names")
    name = cfg.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise TBPSError(f"optim.optimizer={cfg.optimizer!r}: choose adam, adamw or sgd")


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of a group's base lr at optimiser step ``step`` (0-based)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        alpha = step / max(1, warmup)
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.scheduler == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(1.0, progress)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise TBPSError(f"optim.scheduler={cfg.scheduler!r}: choose cosine, step or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    lambdas = [
        (lambda step, base=group["lr"]: lr_factor(step, cfg, steps_per_epoch, total, base))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

