"""IRRA: cross-modal implicit relation reasoning and aligning (Jiang & Ye, CVPR 2023).

The field's baseline (benchmarks-protocol.md): a CLIP dual encoder trained with

- SDM, similarity distribution matching of the global features (``tbps.losses.sdm_loss``);
- ID, one identity classifier shared by image and text global features (``id_loss``);
- IRR, implicit relation reasoning: captions are corrupted BERT-style, their token features attend
  to all image tokens through a cross-modal transformer, and a head predicts the corrupted tokens
  (``mlm_loss``). Train-time only: retrieval uses the global features alone.

Options beyond the paper (``cfg.loss``): ITC (CLIP's InfoNCE) and CMPM. Defaults follow the
reference code (anosorae/IRRA). One exception sits in the option's default, not in the recipes:
the reference data loader (``datasets/bases.py``, ``ImageTextMLMDataset``) masks the caption
through a numpy view of the same tensor, so SDM and ID see the IRR-corrupted caption (their
issues 13 and 52), and the published numbers come from that. ``method.mask_global_text: true``
reproduces it, and the paper recipes (``irra_cuhk/icfg/rstp.yaml``, CFFA's too) turn it on; the
option's default (false) is the clean reading, what the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tbps.config import Config, build_dataclass
from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError
from tbps.losses import cmpm_loss, id_loss, itc_loss, mlm_loss, sdm_loss
from tbps.models import METHODS
from tbps.models.backbones import one_off_captions
from tbps.models.base import TBPSModel, parse_loss_weights
from tbps.models.layers import CrossModalTransformer, MLMHead
from tbps.models.masking import IGNORE_INDEX, mask_tokens

IRRA_LOSSES = ("sdm", "id", "irr", "itc", "cmpm")


@dataclass
class IRRAOptions:
    """``cfg.method`` keys of IRRA; every default is the paper's or its code's."""

    cross_width: int = 0  # width of the cross-modal transformer; 0 = the backbone's joint width (512 for ViT-B/16)
    cross_layers: int = 4  # transformer blocks after the cross-attention
    cross_heads: int = 0  # attention heads; 0 = cross_width // 64 (8 at width 512), at least 1
    mlm_prob: float = 0.15  # share of real caption tokens picked for prediction
    mlm_mask_frac: float = 0.8  # picked tokens replaced by the mask token
    mlm_random_frac: float = 0.1  # picked tokens replaced by a random token (the rest stay)
    mlm_activation: str = "quick_gelu"  # MLM head activation: "quick_gelu" (IRRA) or "gelu" (BERT)
    cmpm_label_norm: str = "l1"  # CMPM label normalisation: "l1" (CMPM paper) or "l2" (IRRA's code)
    mask_global_text: bool = False  # true: global losses see the IRR-corrupted captions (the reference code)

    def __post_init__(self) -> None:
        for name in ("cross_width", "cross_layers", "cross_heads"):
            if getattr(self, name) < 0:
                raise TBPSError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.mlm_prob <= 1.0:
            raise TBPSError(f"method.mlm_prob must be in (0, 1], got {self.mlm_prob}")
        if self.mlm_mask_frac < 0 or self.mlm_random_frac < 0 or self.mlm_mask_frac + self.mlm_random_frac > 1:
            raise TBPSError(f"method.mlm_mask_frac ({self.mlm_mask_frac}) + method.mlm_random_frac "
                            f"({self.mlm_random_frac}) must be non-negative and at most 1")
        if self.mlm_activation not in ("quick_gelu", "gelu"):
            raise TBPSError(f"method.mlm_activation={self.mlm_activation!r}: choose quick_gelu or gelu")
        if self.cmpm_label_norm not in ("l1", "l2"):
            raise TBPSError(f"method.cmpm_label_norm={self.cmpm_label_norm!r}: choose l1 or l2")


def _backbones(cfg: Config, tokenizer, load_pretrained: bool) -> tuple[nn.Module, nn.Module]:
    """CLIP image and text towers (or a BERT-family text encoder, by ``model.text_backbone``).

    ``load_pretrained=False`` reads no weight file: a checkpoint is about to overwrite every weight.
    """
    from tbps.models.backbones import build_clip

    return build_clip(cfg.model, tuple(cfg.data.image_size), tokenizer, load_pretrained=load_pretrained)


@METHODS.register("irra")
class IRRA(TBPSModel):
    """CLIP image and text encoders + shared ID classifier + the IRR branch (see module docstring).

    Methods built on IRRA (CFFA) subclass it and name their own options dataclass (a subclass of
    :class:`IRRAOptions`), their known losses and their registry name in the class attributes below.
    """

    options_class: type = IRRAOptions
    head_prefixes = ("classifier.", "mlm_head.")  # their biases keep the new rate under optim.bias_lr=base
    known_losses: tuple[str, ...] = IRRA_LOSSES

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__()
        self.options = build_dataclass(self.options_class, cfg.method, "method")
        self.loss_weights = parse_loss_weights(cfg.loss, self.known_losses, self.name)
        if cfg.model.temperature <= 0:
            raise TBPSError(f"model.temperature must be > 0, got {cfg.model.temperature}")
        self.logit_scale = 1.0 / cfg.model.temperature  # fixed, not learnt (IRRA)
        self.image_encoder, self.text_encoder = _backbones(cfg, tokenizer, load_pretrained)
        self.set_backbone_prefixes(cfg.model)
        dim = int(self.image_encoder.output_dim)
        if int(self.text_encoder.output_dim) != dim:
            raise TBPSError(f"model: image features are {dim}-d but text features "
                            f"{self.text_encoder.output_dim}-d; the joint space needs one width")
        self.embed_dim = dim

        self.classifier = None
        if "id" in self.loss_weights:
            if num_classes < 1:
                raise TBPSError(f"the ID loss needs training identities, got num_classes={num_classes}")
            self.classifier = nn.Linear(dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

        self.mask_id = int(tokenizer.mask_id)
        self.vocab_size = int(tokenizer.vocab_size)
        self.special_ids = sorted({int(i) for i in tokenizer.special_ids}
                                  | {int(tokenizer.pad_id), int(tokenizer.sot_id), int(tokenizer.eot_id)})
        self.eot_id, self.pad_id = int(tokenizer.eot_id), int(tokenizer.pad_id)
        self.cross_modal = None
        self.mlm_head = None
        if "irr" in self.loss_weights:
            opts = self.options
            width = opts.cross_width or dim
            heads = opts.cross_heads or max(width // 64, 1)
            if width % heads:
                raise TBPSError(f"method.cross_width={width} is not divisible by method.cross_heads={heads}")
            self.cross_modal = CrossModalTransformer(width, opts.cross_layers, heads, query_dim=dim,
                                                     memory_dim=dim)
            self.mlm_head = MLMHead(width, self.vocab_size, opts.mlm_activation)

    # ------------------------------------------------------------------ retrieval
    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_encoder(images)["global"]

    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self.text_encoder(token_ids)["global"]

    # ------------------------------------------------------------------ training
    def corrupt_captions(self, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(corrupted ids, labels, valid mask) for IRR; draws from torch's global generator."""
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        opts = self.options
        corrupted, labels = mask_tokens(token_ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                        special_ids=self.special_ids, valid_mask=valid, prob=opts.mlm_prob,
                                        mask_frac=opts.mlm_mask_frac, random_frac=opts.mlm_random_frac)
        return corrupted, labels, valid

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, token_ids, pids = batch["images"], batch["token_ids"], batch["pids"]
        weights = self.loss_weights
        use_irr = "irr" in weights and self.training
        out: dict[str, Tensor] = {}

        image_out = self.image_encoder(images)
        corrupted = labels = valid = None
        if use_irr:
            corrupted, labels, valid = self.corrupt_captions(token_ids)
        reuse = use_irr and self.options.mask_global_text  # one text pass serves both branches
        with one_off_captions(self.text_encoder, reuse):
            text_out = self.text_encoder(corrupted if reuse else token_ids)
        image_feats, text_feats = image_out["global"], text_out["global"]

        out.update(self.global_terms(image_feats, text_feats, pids))

        if use_irr:
            with one_off_captions(self.text_encoder):
                masked_out = text_out if reuse else self.text_encoder(corrupted)
            out.update(self.irr_terms(masked_out["tokens"], image_out["tokens"], labels, valid))
        return out

    def global_terms(self, image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> dict[str, Tensor]:
        """The weighted global-pair losses that are configured (SDM, ITC, CMPM, ID) and ID accuracies."""
        weights, out = self.loss_weights, {}
        if "sdm" in weights:
            out["loss_sdm"] = weights["sdm"] * sdm_loss(image_feats, text_feats, pids, self.logit_scale)
        if "itc" in weights:
            out["loss_itc"] = weights["itc"] * itc_loss(image_feats, text_feats, self.logit_scale)
        if "cmpm" in weights:
            out["loss_cmpm"] = weights["cmpm"] * cmpm_loss(image_feats, text_feats, pids,
                                                          label_norm=self.options.cmpm_label_norm)
        if self.classifier is not None:
            out.update(self.id_terms(image_feats, text_feats, pids))
        return out

    def id_terms(self, image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> dict[str, Tensor]:
        """Weighted ID loss of the shared classifier plus its accuracies (logged)."""
        image_logits = self.classifier(image_feats.float())
        text_logits = self.classifier(text_feats.float())
        out = {"loss_id": self.loss_weights["id"] * id_loss(image_logits, text_logits, pids)}
        with torch.no_grad():
            out["acc_id_img"] = (image_logits.argmax(dim=1) == pids).float().mean()
            out["acc_id_txt"] = (text_logits.argmax(dim=1) == pids).float().mean()
        return out

    def irr_terms(self, masked_text_tokens: Tensor, image_tokens: Tensor, labels: Tensor,
                  valid: Tensor) -> dict[str, Tensor]:
        """Weighted IRR loss: corrupted caption tokens attend to the image tokens, the head predicts
        the picked positions (the vocabulary projection runs at those positions only)."""
        fused = self.cross_modal(masked_text_tokens, image_tokens, query_mask=valid)
        picked = labels != IGNORE_INDEX
        logits = self.mlm_head(fused[picked])
        targets = labels[picked]
        out = {"loss_irr": self.loss_weights["irr"] * mlm_loss(logits, targets)}
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == targets).float().sum()
            out["acc_mlm"] = correct / max(targets.numel(), 1)
        return out
