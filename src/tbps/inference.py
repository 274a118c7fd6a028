"""One inference path: a model from a checkpoint, and one ``Embedder`` that every reader of a model uses.

``load_model(checkpoint)`` gives what a user needs to embed anything (open_clip's
``create_model_and_transforms``): the model in eval mode, its tokenizer and its image transform.
``Embedder`` owns the decisions that the evaluator, the index builder, the searcher and the server
would otherwise each make: batching, the device, mixed precision (:func:`amp_dtype`, also the
trainer's) and the check of the feature dict a model's ``embed_texts`` / ``embed_images`` return
(:func:`check_features`). Every floating feature comes back as float32, whatever autocast computed
it in, so stored, compared and re-ranked features have one type.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tbps.errors import TBPSError

Features = dict[str, torch.Tensor]
FEATURE_KEY = re.compile(r"^[A-Za-z0-9_]+$")  # feature names become index file names
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: none on the CPU (fp32), bf16 where the GPU supports it, else fp16."""
    if amp not in AMP_CHOICES:
        raise TBPSError(f"amp={amp!r}: choose auto, bf16, fp16 or off")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision as :func:`amp_dtype` decides, or nothing (CPU: float32)."""
    dtype = amp_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_features(output: Any, hook: str, batch: int) -> Features:
    """``output`` of ``model.<hook>`` for a batch of ``batch`` inputs as a feature dict, or a TBPSError.

    A bare tensor is the global embedding. Otherwise: a dict of tensors with ``"global"``, names of
    letters, digits and underscores (the index stores each as a file), one row per input."""
    if torch.is_tensor(output):
        output = {"global": output}
    if not isinstance(output, dict) or not all(torch.is_tensor(v) for v in output.values()) or "global" not in output:
        raise TBPSError(f"model.{hook} must return a dict of tensors with a 'global' entry "
                        f"(e.g. {{'global': (B, D)}}), got {type(output).__name__}")
    for key, value in output.items():
        if not isinstance(key, str) or not FEATURE_KEY.match(key):
            raise TBPSError(f"model.{hook} returned the key {key!r}: feature names must be letters, digits "
                            "and underscores")
        if value.ndim == 0 or value.shape[0] != batch:
            raise TBPSError(f"model.{hook} returned {key!r} of shape {tuple(value.shape)} for {batch} inputs: "
                            "every feature needs one row per input")
    return output


def _float32(features: Features) -> Features:
    return {key: value.float() if value.is_floating_point() else value for key, value in features.items()}


def concat_features(batches: list[Features], hook: str) -> Features:
    """Batches of one hook's features joined row-wise (the same keys in every batch)."""
    keys = list(batches[0])
    if any(list(b) != keys for b in batches):
        raise TBPSError(f"model.{hook} returned different keys for different batches")
    return {key: torch.cat([b[key] for b in batches]) for key in keys}


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class Embedder:
    """Texts and images to feature dicts with a model's own hooks, in batches, under one AMP policy.

    ``tokenizer`` maps a list of strings to (N, L) token ids; ``image_transform`` a PIL image to a
    (3, H, W) tensor (both as :func:`load_model` returns them). ``device`` defaults to the model's;
    ``amp``: auto (bf16 or fp16 on CUDA, float32 on the CPU), bf16, fp16 or off. The model is used as
    it is (``load_model`` returns it in eval mode). A model without ``embed_texts``/``embed_images``
    is embedded by its L2-normalised ``encode_text``/``encode_image``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 image_transform: Callable | None = None, *, device: str | torch.device | None = None,
                 batch_size: int = 64, amp: str = "auto", num_workers: int = 0) -> None:
        from tbps.engine.distributed import resolve_device

        if batch_size < 1:
            raise TBPSError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        if device is None:
            self.device = model_device(model)
        else:
            self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        amp_dtype(amp, self.device)  # a bad name fails here, not at the first batch
        self.amp = amp
        self.batch_size = batch_size
        self.num_workers = num_workers

    # ------------------------------------------------------------------ one batch
    def _run(self, hook: str, fallback: str, inputs: torch.Tensor) -> Features:
        inputs = inputs.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.amp):
            if hasattr(self.model, hook):
                output = getattr(self.model, hook)(inputs)
            else:
                output = {"global": F.normalize(getattr(self.model, fallback)(inputs).float(), dim=-1)}
        return _float32(check_features(output, hook, int(inputs.shape[0])))

    def text_batch(self, token_ids: torch.Tensor) -> Features:
        """Features of one batch of token ids (``model.embed_texts``)."""
        return self._run("embed_texts", "encode_text", token_ids)

    def image_batch(self, images: torch.Tensor) -> Features:
        """Features of one batch of transformed images, (B, 3, H, W) (``model.embed_images``)."""
        return self._run("embed_images", "encode_image", images)

    # ------------------------------------------------------------------ many
    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> Features:
        """Every text, tokenised and embedded ``batch_size`` at a time; rows in the order given."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise TBPSError("nothing to embed: no texts")
        if self.tokenizer is None:
            raise TBPSError("this Embedder has no tokenizer: pass the one load_model returns")
        from tqdm import tqdm

        starts = range(0, len(texts), self.batch_size)
        parts = [self.text_batch(self.tokenizer(list(texts[s:s + self.batch_size])))
                 for s in tqdm(starts, desc="embedding captions", unit="batch", disable=not progress, leave=False)]
        return concat_features(parts, "embed_texts")

    def embed_images(self, images: Sequence[Any] | torch.Tensor, progress: bool = False) -> Features:
        """Every image embedded ``batch_size`` at a time: a (N, 3, H, W) tensor already transformed, or
        a list of paths and PIL images (decoded and transformed here; an unreadable file is an error
        naming it)."""
        if torch.is_tensor(images):
            if images.ndim != 4 or not len(images):
                raise TBPSError(f"images must be a non-empty (N, 3, H, W) tensor, got {tuple(images.shape)}")
            return concat_features([self.image_batch(images[s:s + self.batch_size])
                                    for s in range(0, len(images), self.batch_size)], "embed_images")
        images = list(images)
        if not images:
            raise TBPSError("nothing to embed: no images")
        if self.image_transform is None:
            raise TBPSError("this Embedder has no image transform: pass the one load_model returns")
        if all(isinstance(item, (str, os.PathLike)) for item in images):
            return self.embed_image_files([str(item) for item in images], progress=progress)
        from tbps.data.images import load_image

        tensors = [self.image_transform(load_image(item) if isinstance(item, (str, os.PathLike))
                                        else item.convert("RGB")) for item in images]
        return self.embed_images(torch.stack(tensors))

    def embed_image_files(self, paths: Sequence[str], progress: bool = False, unreadable_note: str = "") -> Features:
        """Image files decoded by ``num_workers`` processes and embedded in order; every file must be
        readable (the error names the first one that is not, followed by ``unreadable_note``)."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        from tbps.data.images import ImagePathDataset, collate_images

        loader = DataLoader(ImagePathDataset(list(paths), self.image_transform), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.num_workers, collate_fn=collate_images,
                            pin_memory=self.device.type == "cuda")
        parts, seen = [], 0
        for indices, batch, bad in tqdm(loader, desc="embedding images", unit="batch", disable=not progress,
                                        leave=False):
            if bad:
                raise TBPSError(bad[0][1] + unreadable_note)
            if indices[0] != seen:
                raise TBPSError("images arrived out of order from the data loader")
            seen += len(indices)
            parts.append(self.image_batch(batch))
        return concat_features(parts, "embed_images")

    def similarity(self, text_feats: Features, image_feats: Features) -> torch.Tensor:
        """The model's scoring hook (``model.similarity``), or the cosine of the global embeddings."""
        if hasattr(self.model, "similarity"):
            return self.model.similarity(text_feats, image_feats)
        return text_feats["global"] @ image_feats["global"].t()


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
               overrides: list[str] | None = None) -> tuple[torch.nn.Module, Callable, Callable]:
    """``(model, tokenizer, image_transform)`` of a tbps checkpoint, the model in eval mode on ``device``.

    ``overrides`` (``key=value``) change inference-time options of the saved config (as ``tbps eval``).
    The config the model was built from is ``model.tbps_config``."""
    from tbps.data.transforms import build_image_transform
    from tbps.engine.checkpoint import load_model_from_checkpoint

    model, cfg, tokenizer = load_model_from_checkpoint(Path(checkpoint), device, overrides)
    model.tbps_config = cfg
    return model, tokenizer, build_image_transform(cfg.data.image_size, train=False)
