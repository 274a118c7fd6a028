"""Zero-shot CLIP: the published CLIP model as a retrieval model, before any training.

The baseline every text-based person search paper compares against, and a model that works on any
gallery on day one: CLIP's own image tower and text tower (with its own BPE tokenizer, ``clip``),
scored by the cosine of the global features (image: the CLS token or the attention pool; text: the
end-of-text token), exactly as CLIP's ``encode_image`` / ``encode_text``. ``tbps import --from
clip`` writes one from any CLIP weights tbps reads (OpenAI ``.pt``, open_clip, Hugging Face).

Training it (``loss.itc``) fine-tunes both towers with CLIP's own contrastive loss, at the fixed
scale ``1 / model.temperature`` (CLIP's learnt scale is 100, i.e. temperature 0.01).
"""

from __future__ import annotations

from torch import Tensor

from tbps.config import Config
from tbps.errors import TBPSError
from tbps.losses import itc_loss
from tbps.models import METHODS
from tbps.models.base import TBPSModel, parse_loss_weights

CLIP_LOSSES = ("itc",)


@METHODS.register("clip")
class ZeroShotCLIP(TBPSModel):
    """CLIP image and text towers; no new modules, so nothing is random after the weights are read."""

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__()
        from tbps.models.backbones import build_clip

        if cfg.model.text_backbone != "clip":
            raise TBPSError("model.name=clip uses CLIP's own text tower: set model.text_backbone=clip")
        self.loss_weights = parse_loss_weights(cfg.loss, CLIP_LOSSES, self.name)
        if cfg.model.temperature <= 0:
            raise TBPSError(f"model.temperature must be > 0, got {cfg.model.temperature}")
        self.logit_scale = 1.0 / cfg.model.temperature
        self.image_encoder, self.text_encoder = build_clip(cfg.model, tuple(cfg.data.image_size), tokenizer,
                                                           load_pretrained=load_pretrained)
        self.set_backbone_prefixes(cfg.model)
        if int(self.image_encoder.output_dim) != int(self.text_encoder.output_dim):
            raise TBPSError(f"model: image features are {self.image_encoder.output_dim}-d but text features "
                            f"{self.text_encoder.output_dim}-d; a CLIP model has one joint width")

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_encoder(images)["global"]

    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self.text_encoder(token_ids)["global"]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image_feats = self.encode_image(batch["images"])
        text_feats = self.encode_text(batch["token_ids"])
        return {"loss_itc": self.loss_weights["itc"] * itc_loss(image_feats, text_feats, self.logit_scale)}
