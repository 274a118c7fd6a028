"""tbps: text-based person search (text-to-image person re-identification).

The Python API, in the order a newcomer meets it (README, "Python API")::

    import tbps
    model, tokenizer, image_transform = tbps.load_model("runs/demo/train/best.pt")
    embedder = tbps.Embedder(model, tokenizer, image_transform)
    scores = embedder.similarity(embedder.embed_texts(["a woman in a red coat"]),
                                 embedder.embed_images(["a.jpg", "b.jpg"]))

Every name below is loaded on first use, so ``import tbps`` (and ``tbps --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load_model": ("tbps.inference", "load_model"),
    "Embedder": ("tbps.inference", "Embedder"),
    "load_config": ("tbps.config", "load_config"),
    "load_dataset": ("tbps.data.datasets", "load_dataset"),
    "train": ("tbps.engine.trainer", "train"),
    "evaluate": ("tbps.engine.evaluator", "evaluate_checkpoint"),
    "rank_metrics": ("tbps.engine.metrics", "rank_metrics"),
    "build_index": ("tbps.search.index", "build_index"),
    "Searcher": ("tbps.search.searcher", "Searcher"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tbps' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
