"""The interface every method implements, so the one trainer and the one evaluator serve them all.

A method encodes images and captions into a joint space (``encode_image`` / ``encode_text``),
returns its weighted losses from ``forward(batch)``, and may override ``embed_*`` and
``similarity`` when its retrieval score is more than the cosine of global features (CFFA adds
local features, ACSA a cross-scale term). See ``docs/architecture.md``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tbps.errors import TBPSError


class TBPSModel(nn.Module):
    """Base class of the registered methods.

    ``backbone_prefixes``: parameter-name prefixes of the pretrained encoders; the optimiser gives
    them ``optim.lr`` and every other parameter ``lr * new_lr_factor``.
    ``classifier_keys``: state-dict prefixes that depend on the number of training identities and
    are skipped when a checkpoint from another dataset is loaded.
    ``head_prefixes``: output heads whose biases keep the new-module rate under ``optim.bias_lr:
    base`` (IRRA's solver); ``fixed_lr``: parameter-name prefix -> a fixed base lr (CFFA's FLFR).
    ``options``: the method's resolved ``cfg.method`` dataclass; ``build_model`` writes it back
    into the config, so a run's config.yaml and checkpoints hold every option's value.
    ``name``: the registered method name, set by ``METHODS.register`` (never written twice).
    """

    name: str = ""

    backbone_prefixes: tuple[str, ...] = ("image_encoder.backbone.", "text_encoder.backbone.")
    classifier_keys: tuple[str, ...] = ("classifier.",)
    head_prefixes: tuple[str, ...] = ()
    fixed_lr: dict[str, float] = {}

    def set_backbone_prefixes(self, model_cfg) -> None:
        """Only encoders that start from pretrained weights train at the backbone rate.

        Decided from the config, not from whether weights were read now, so a resumed or
        checkpoint-loaded model builds the same optimiser groups as the original run. A randomly
        initialised encoder (the tiny CPU architectures) is a new module and trains at the new rate.
        """
        prefixes = []
        if model_cfg.pretrained:
            prefixes.append("image_encoder.backbone.")
        text_pretrained = model_cfg.text_pretrained if model_cfg.text_backbone == "hf" else model_cfg.pretrained
        if text_pretrained:
            prefixes.append("text_encoder.backbone.")
        self.backbone_prefixes = tuple(prefixes)

    def on_step_end(self) -> None:
        """Called by the trainer after every optimiser step (never in a forward pass): the place for a
        method's own per-step update, such as TextReID's momentum encoders. Nothing by default."""

    def encode_image(self, images: Tensor) -> Tensor:
        """Global image embedding ``(B, D)``, not normalised."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    def encode_text(self, token_ids: Tensor) -> Tensor:
        """Global caption embedding ``(B, D)``, not normalised."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_text")

    def embed_images(self, images: Tensor) -> dict[str, Tensor]:
        """Gallery features for retrieval; the evaluator stores whatever this returns."""
        return {"global": F.normalize(self.encode_image(images), dim=-1)}

    def embed_texts(self, token_ids: Tensor) -> dict[str, Tensor]:
        """Query features for retrieval."""
        return {"global": F.normalize(self.encode_text(token_ids), dim=-1)}

    def similarity(self, text_feats: dict[str, Tensor], image_feats: dict[str, Tensor]) -> Tensor:
        """``(num_queries, num_gallery)`` scores: the cosine of the normalised global features."""
        return text_feats["global"] @ image_feats["global"].t()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Training step: ``loss_<name>`` entries (already weighted) plus anything to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


def parse_loss_weights(loss: dict[str, float], known: tuple[str, ...], method: str) -> dict[str, float]:
    """``cfg.loss`` checked against the losses a method implements; zero weights are dropped."""
    weights: dict[str, float] = {}
    for name, weight in loss.items():
        if name not in known:
            raise TBPSError(f"loss.{name}: unknown loss for method {method} (known: {', '.join(sorted(known))})")
        weight = float(weight)
        if weight < 0:
            raise TBPSError(f"loss.{name}={weight}: a loss weight must be >= 0")
        if weight > 0:
            weights[name] = weight
    if not weights:
        raise TBPSError(f"method {method}: every loss weight is zero (set at least one of "
                        f"{', '.join(known)} in loss)")
    return weights
