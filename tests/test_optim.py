import math

import pytest
from torch import nn

from tbps.config import OptimConfig
from tbps.engine.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


class Toy(nn.Module):
    backbone_prefixes = ("image_encoder.",)

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)


def test_parameter_groups_follow_the_recipe():
    cfg = OptimConfig(lr=1e-5, new_lr_factor=5, bias_lr_factor=2, weight_decay=4e-5, weight_decay_bias=0)
    groups = {name: (g["lr"], g["weight_decay"]) for g in parameter_groups(Toy(), cfg) for name in g["names"]}
    assert groups["image_encoder.weight"] == (1e-5, 4e-5)
    assert groups["image_encoder.bias"] == (2e-5, 0.0)
    assert groups["classifier.weight"] == pytest.approx((5e-5, 4e-5))
    assert groups["classifier.bias"] == pytest.approx((1e-4, 0.0))


class ToyIRRA(nn.Module):
    """Names as IRRA's: a pretrained encoder, a new cross-modal block and new output heads."""

    backbone_prefixes = ("image_encoder.",)
    head_prefixes = ("classifier.", "mlm_head.")
    fixed_lr = {"local_head.": 1e-3}

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(4, 4)
        self.cross_modal = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)
        self.mlm_head = nn.Linear(4, 3)
        self.local_head = nn.Linear(4, 3)


def test_bias_lr_base_is_irra_solvers_rule_and_fixed_lr_overrides():
    """IRRA's solver/build.py: lr = base; "cross" modules x5; any bias = base x2 (overriding x5);
    classifier / mlm_head (bias too) x5. CFFA's adds fixed 1e-3 for its FLFR heads."""
    base = dict(lr=1e-5, new_lr_factor=5, bias_lr_factor=2, weight_decay=4e-5, weight_decay_bias=0)
    groups = {name: (g["lr"], g["weight_decay"])
              for g in parameter_groups(ToyIRRA(), OptimConfig(bias_lr="base", **base)) for name in g["names"]}
    want = {"image_encoder.weight": (1e-5, 4e-5), "image_encoder.bias": (2e-5, 0.0),
            "cross_modal.weight": (5e-5, 4e-5), "cross_modal.bias": (2e-5, 0.0),
            "classifier.weight": (5e-5, 4e-5), "classifier.bias": (5e-5, 0.0),
            "mlm_head.weight": (5e-5, 4e-5), "mlm_head.bias": (5e-5, 0.0),
            "local_head.weight": (1e-3, 4e-5), "local_head.bias": (1e-3, 0.0)}
    assert set(groups) == set(want)
    for name, value in want.items():
        assert groups[name] == pytest.approx(value), name
    group = {name: g["lr"] for g in parameter_groups(ToyIRRA(), OptimConfig(**base)) for name in g["names"]}
    assert group["cross_modal.bias"] == pytest.approx(1e-4) and group["classifier.bias"] == pytest.approx(1e-4)
    with pytest.raises(Exception, match="bias_lr"):
        parameter_groups(ToyIRRA(), OptimConfig(bias_lr="nope", **base))


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_epochs=2, warmup_factor=0.1, min_lr=0.0, scheduler="cosine")
    steps, total = 10, 100
    assert lr_factor(0, cfg, steps, total, 1.0) == pytest.approx(0.1)
    assert lr_factor(10, cfg, steps, total, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, cfg, steps, total, 1.0) == pytest.approx(1.0)
    mid = 20 + 40
    assert lr_factor(mid, cfg, steps, total, 1.0) == pytest.approx(0.5)
    assert lr_factor(total, cfg, steps, total, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_each_group():
    model = Toy()
    cfg = OptimConfig(lr=0.1, warmup_epochs=0, scheduler="cosine", min_lr=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, epochs=2)
    base = [g["lr"] for g in opt.param_groups]
    for _ in range(5):
        opt.step()
        sched.step()
    for group, b in zip(opt.param_groups, base):
        assert group["lr"] == pytest.approx(b * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_step_schedule():
    cfg = OptimConfig(warmup_epochs=0, scheduler="step", milestones=[2, 4], gamma=0.1)
    assert lr_factor(19, cfg, 10, 100, 1.0) == 1.0
    assert lr_factor(20, cfg, 10, 100, 1.0) == pytest.approx(0.1)
    assert lr_factor(45, cfg, 10, 100, 1.0) == pytest.approx(0.01)
