"""Text-to-image evaluation of a model on a split: embed, score through one hook, rank, report.

Queries are every caption of every record, the gallery every record's image; a caption's matches
are the images of its person (the field's protocol, see ``tbps.engine.metrics``). Embeddings are
computed in batches; scoring and ranking then run ``query_chunk`` captions at a time, so memory
stays bounded whatever the split's size.

Every method is scored the same way, through the model's own hooks (run by ``tbps.inference.Embedder``,
which also decides batching, device and mixed precision for the index and the searcher):

- ``model.embed_texts(token_ids)`` / ``model.embed_images(images)`` -> dict of batch-first tensors
  (L2-normalised by the model; at least ``"global"``, plus whatever its similarity needs);
- ``model.similarity(text_feats, image_feats)`` -> (captions, images) scores, given a chunk of the
  text features and all image features. A method that fuses global and local scores, or re-ranks,
  does it there; the evaluator has no per-method branches.

A model without these hooks (just ``encode_text`` / ``encode_image``) is scored by the cosine of
its L2-normalised global embeddings.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tbps.config import EvalConfig
from tbps.engine.distributed import resolve_device
from tbps.engine.metrics import default_chunk_size, rank_metrics_from_scores
from tbps.errors import TBPSError
from tbps.inference import Embedder, Features

METRIC_ORDER = ("mAP", "mINP")

__all__ = ["Evaluator", "checkpoint_evaluator", "evaluate_checkpoint", "format_metrics_table", "append_metrics_jsonl", "resolve_device"]


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _slice(features: Features, start: int, end: int) -> Features:
    return {key: value[start:end] for key, value in features.items()}


class Evaluator:
    """Embeds a split's captions and images with ``model`` and reports R@k, mAP, mINP (percent).

    ``records`` need ``.pid``, ``.image_path`` and ``.captions``; ``tokenizer(list[str])`` returns
    (N, L) token ids; ``image_transform`` maps a PIL image to a (3, H, W) tensor.
    """

    def __init__(self, model: torch.nn.Module, records: Sequence[Any], tokenizer: Callable[[list[str]], torch.Tensor],
                 image_transform: Callable, eval_cfg: EvalConfig, device: str | torch.device,
                 progress: bool = True, num_workers: int = 0) -> None:
        if not records:
            raise TBPSError("nothing to evaluate: the split has no records")
        self.model = model
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.cfg = eval_cfg
        self.device = _as_device(device)
        self.progress = progress
        self.num_workers = num_workers
        self.captions = [caption for record in self.records for caption in record.captions]
        self.query_pids = [record.pid for record in self.records for _ in record.captions]
        self.gallery_pids = [record.pid for record in self.records]
        self.image_paths = [str(record.image_path) for record in self.records]
        if not self.captions:
            raise TBPSError("nothing to evaluate: the split's records have no captions")
        self.embedder = Embedder(model, tokenizer, image_transform, device=self.device,
                                 batch_size=eval_cfg.batch_size, num_workers=num_workers)

    # ------------------------------------------------------------------ embedding
    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        """The model's scoring hook, or the cosine of the global embeddings when it has none."""
        return self.embedder.similarity(text_feats, image_feats)

    def embed_captions(self) -> Features:
        """Every caption, tokenised and embedded in batches of ``eval_cfg.batch_size``."""
        return self.embedder.embed_texts(self.captions, progress=self.progress)

    def embed_gallery(self) -> Features:
        """Every gallery image, decoded and embedded in batches of ``eval_cfg.batch_size``.

        The protocol scores every image of the split, so an unreadable one is an error naming it
        (the indexer, by contrast, skips and counts them)."""
        return self.embedder.embed_image_files(
            self.image_paths, progress=self.progress,
            unreadable_note="; the evaluation needs every image of the split (tbps data check lists every unusable one)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Metrics in percent plus ``num_queries``, ``num_gallery``, ``seconds`` (and ``i2t_*``)."""
        start_time = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                text_feats = self.embed_captions()
                image_feats = self.embed_gallery()
                num_queries, num_gallery = len(self.captions), len(self.image_paths)

                def text_to_image(start: int, end: int) -> torch.Tensor:
                    return self.similarity(_slice(text_feats, start, end), image_feats)

                # the configured chunk, but never more rows than the memory bound allows
                chunk = min(self.cfg.query_chunk, default_chunk_size(num_gallery))
                metrics: dict[str, float] = rank_metrics_from_scores(
                    text_to_image, num_queries, self.query_pids, self.gallery_pids, chunk_size=chunk)
                if self.cfg.i2t:
                    def image_to_text(start: int, end: int) -> torch.Tensor:
                        return self.similarity(text_feats, _slice(image_feats, start, end)).t()

                    i2t = rank_metrics_from_scores(image_to_text, num_gallery, self.gallery_pids, self.query_pids,
                                                   chunk_size=min(self.cfg.query_chunk,
                                                                  default_chunk_size(num_queries)))
                    metrics.update({f"i2t_{key}": value for key, value in i2t.items()})
        finally:
            self.model.train(was_training)
        metrics.update(num_queries=num_queries, num_gallery=num_gallery,
                       seconds=round(time.perf_counter() - start_time, 3))
        return metrics


# ----------------------------------------------------------------------------- reporting

def _metric_columns(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    recalls = sorted((key for key in metrics if re.fullmatch(rf"{prefix}R\d+", key)),
                     key=lambda key: int(key[len(prefix) + 1:]))
    return [key[len(prefix):] for key in recalls] + [m for m in METRIC_ORDER if f"{prefix}{m}" in metrics]


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """An aligned table of R@k / mAP / mINP with three decimals, as papers report them."""
    columns = _metric_columns(metrics)
    rows = [("text-to-image", [metrics[c] for c in columns])]
    i2t_columns = _metric_columns(metrics, "i2t_")
    if i2t_columns == columns:
        rows.append(("image-to-text", [metrics[f"i2t_{c}"] for c in columns]))
    label_width = max(len("task"), *(len(label) for label, _ in rows))
    cells = [[f"{value:.3f}" for value in values] for _, values in rows]
    widths = [max(7, len(name), *(len(row[i]) for row in cells)) for i, name in enumerate(columns)]
    rule = "+-" + "-" * label_width + "-+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(label: str, values: list[str]) -> str:
        return "| " + label.ljust(label_width) + " |" + "|".join(f" {v.rjust(w)} " for v, w in zip(values, widths)) + "|"

    out = [rule, line("task", columns), rule]
    out += [line(label, row) for (label, _), row in zip(rows, cells)]
    out.append(rule)
    if "num_queries" in metrics and "num_gallery" in metrics:
        footer = f"{metrics['num_queries']:,} queries x {metrics['num_gallery']:,} gallery images"
        if "seconds" in metrics:
            footer += f", {metrics['seconds']:.1f} s"
        out.append(footer)
    return "\n".join(out)


def _json_value(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def append_metrics_jsonl(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line: one small append-mode write, so a crash leaves whole lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=_json_value) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_evaluator(checkpoint: str | os.PathLike, dataset: str | None = None,
                         root: str | os.PathLike | None = None, split: str = "test",
                         device: str | torch.device = "auto", batch_size: int = 128, i2t: bool = False,
                         progress: bool = True, overrides: list[str] | None = None,
                         num_workers: int | None = None) -> tuple["Evaluator", str, str | os.PathLike]:
    """``(evaluator, dataset name, root)`` for a saved model on a split: the dataset defaults to the
    one the checkpoint was trained on. ``overrides`` (``key=value``) apply to the saved config first
    (inference-time options); ``num_workers`` defaults to the config's, at most one per CPU."""
    from tbps.data.datasets import load_dataset
    from tbps.data.transforms import build_image_transform
    from tbps.engine.checkpoint import load_model_from_checkpoint

    if batch_size < 1:
        raise TBPSError(f"batch size must be at least 1, got {batch_size}")
    dev = _as_device(device)
    model, cfg, tokenizer = load_model_from_checkpoint(checkpoint, dev, overrides)
    name = dataset or cfg.data.dataset
    if root is None:
        if name != cfg.data.dataset:
            raise TBPSError(f"the checkpoint was trained on {cfg.data.dataset!r}: give --root for {name!r}")
        root = cfg.data.root
    records = load_dataset(name, root).split(split)
    if not records:
        raise TBPSError(f"{name} ({root}): the {split} split is empty")
    missing = [r.image_path for r in records if not os.path.isfile(r.image_path)]
    if missing:
        raise TBPSError(f"{name} ({root}): {len(missing)} of the {len(records)} {split} images are missing, "
                        f"e.g. {missing[0]} (tbps data check lists them)")
    eval_cfg = dataclasses.replace(cfg.eval, batch_size=batch_size, i2t=i2t)
    transform = build_image_transform(cfg.data.image_size, train=False)
    workers = min(cfg.data.num_workers, os.cpu_count() or 1) if num_workers is None else num_workers
    evaluator = Evaluator(model, records, tokenizer, transform, eval_cfg, dev, progress=progress,
                          num_workers=workers)
    return evaluator, name, root


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, root: str | os.PathLike | None = None,
                        split: str = "test", device: str | torch.device = "auto", batch_size: int = 128,
                        i2t: bool = False, progress: bool = True,
                        overrides: list[str] | None = None,
                        log_to: str | os.PathLike | None = None) -> dict[str, float]:
    """Evaluate a saved model on a split (by default the dataset it was trained on).

    Nothing is written unless ``log_to`` names a JSON-lines file, to which the row is appended
    (the checkpoint's folder may be read-only). ``overrides`` (``key=value``) apply to the saved
    config first (inference-time options)."""
    evaluator, name, root = checkpoint_evaluator(checkpoint, dataset, root, split, device, batch_size, i2t,
                                                 progress, overrides)
    metrics = evaluator.evaluate()
    if log_to is not None:
        row = {"event": "eval", "split": split, "dataset": name, "root": str(root), "checkpoint": str(checkpoint),
               "overrides": list(overrides or []), **metrics,
               "time": datetime.datetime.now().isoformat(timespec="seconds")}
        append_metrics_jsonl(log_to, row)
    return metrics
