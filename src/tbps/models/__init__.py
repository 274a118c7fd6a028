"""Methods behind one registry: ``build_model(cfg, num_classes, tokenizer)`` builds ``cfg.model.name``.

Adding a method is one file in ``models/methods/`` with ``@METHODS.register("name")`` on a
:class:`TBPSModel` subclass (the registry sets its ``name``), one import line at the bottom of this
module, and one tiny recipe in ``tests/tiny_models.py`` for the contract test every method passes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tbps.models.base import TBPSModel
from tbps.registry import Registry

if TYPE_CHECKING:
    from tbps.config import Config

METHODS: Registry = Registry("method")


def build_model(cfg: "Config", num_classes: int, tokenizer, load_pretrained: bool = True) -> TBPSModel:
    """The method named by ``cfg.model.name``, its options read from ``cfg.method`` and ``cfg.loss``.

    ``load_pretrained=False`` builds the architecture without reading backbone weight files: a
    checkpoint is about to overwrite every weight (inference, resume).

    ``cfg.method`` is replaced by every option the method resolved (its ``options`` dataclass,
    defaults included), so the config.yaml and checkpoints written from ``cfg`` afterwards keep the
    values this run used: a default changed later never changes what an old checkpoint does. A
    config saved before this (only the keys its recipe named) still loads, with the defaults of
    the code that reads it.
    """
    method = METHODS.get(cfg.model.name)
    model = method(cfg, num_classes, tokenizer, load_pretrained=load_pretrained)
    options = getattr(model, "options", None)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        cfg.method = dataclasses.asdict(options)
    return model


# one line per method module: importing it registers the method
from tbps.models.methods import irra  # noqa: E402,F401
from tbps.models.methods import fcsa  # noqa: E402,F401
from tbps.models.methods import cffa  # noqa: E402,F401
from tbps.models.methods import textreid  # noqa: E402,F401
from tbps.models.methods import pcc  # noqa: E402,F401
from tbps.models.methods import acsa  # noqa: E402,F401
from tbps.models.methods import clip  # noqa: E402,F401

__all__ = ["METHODS", "TBPSModel", "build_model"]
