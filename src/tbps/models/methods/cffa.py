"""CFFA: cross-modal fine-grained feature alignment for text-based person re-identification.

Built on IRRA (:class:`tbps.models.methods.irra.IRRA`, subclassed: same encoders, ID classifier and IRR
branch). What CFFA adds, as ``../shared/docs/methods.md`` describes it and the authors' public code
(lqfhello/CFFA) implements it:

- FLFR, fine-grained local feature refinement: the last encoder layer's attention row of the global
  token (image: CLS / attention-pool query; text: the end token for CLIP, [CLS] for a BERT whose
  global feature is [CLS]) ranks the patches / words; the top ``select_ratio`` (30%) are kept
  (start, end, special tokens and padding never), L2-normalised, embedded by
  ``Linear(D -> Dl) + MLP(D -> Dl/2 -> BN -> ReLU -> Dl)`` and max-pooled into a local embedding
  (``Dl = local_dim``, 1024 for ViT-B/16's D = 512). One head per modality.
- Implicit relation reasoning: IRRA's masked-token prediction (15%, 80/10/10), weight 1.4 in the
  recipes (``loss.irr``).
- Text augmentation (training only): 20% of the word tokens perturbed, of those 60% masked, 20%
  replaced by a random id, 20% deleted (:func:`tbps.models.masking.augment_tokens`). As in the code,
  the augmented caption feeds every branch, IRR's corruption included.
- MAL, multi-association learning (:func:`tbps.losses.cffa.mal_loss`, margin 0.1, tau 0.015) on the
  global pair and on the local pair, plus the ID loss on the global features.
- Inference: ``embed_images`` / ``embed_texts`` return ``{"global", "local"}`` (both L2-normalised)
  and ``similarity`` is the mean of the global and the local cosine (``method.inference: fused``);
  ``global`` / ``local`` score with one of them alone (ablations, without retraining).

Choices where the sources are silent or differ (options below; defaults follow the code):

- ``mal_negative_scale: batch``: the code (``objectives.compute_mixed_triplet_per``) scales MAL's
  negative term by ``floor(1000/B)/1000`` (``tbps.losses.cffa.mal_negative_scale``), not by tau; the two
  agree only at B = 64. ``tau`` is the paper's formula.
- ``flfr_lr: 1e-3``: the code's solver (``solver/build.py``, ``build_optimizer``) trains the FLFR
  heads (``visul_emb_layer`` / ``texual_emb_layer``) at a fixed base lr of 1e-3, whatever
  ``optim.lr``; the schedule (warm-up, cosine) still applies. 0 puts them in the new-module group.
- ``mask_global_text``: as IRRA's (the reference data loader masks the captions in place, so MAL,
  ID and FLFR see the IRR-corrupted caption); the paper-reproduction recipes turn it on.
- ``mal_reduction: sum``: the code sums MAL over the batch (the paper's formula is per query), so it
  weighs about B times the ID and IRR losses; ``mean`` averages instead.
- ``text_topk: context``: the code keeps ``floor(0.3 * (L - 2))`` words for context length L, at
  most the caption's word count (with L = 77 nearly every word of a CUHK-PEDES caption);
  ``caption`` keeps ``floor(0.3 * words)`` of each caption, at least one.
- Image: ``max(1, floor(0.3 * patches))`` patches (the code: ``int((N - 1) * 0.3)``).
- Mask tokens left by the augmentation stay selectable (the code excludes only start, end and
  padding); other special ids ([UNK]) are excluded.
- The loss alongside ID and IRR may also be ``sdm``, ``itc`` or ``cmpm`` (each on the global and
  the local pair, like MAL): ``loss: {sdm: 1, id: 1, irr: 1.4}`` is the "without MAL" ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.config import Config
from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError
from tbps.losses import cmpm_loss, itc_loss, sdm_loss
from tbps.losses.cffa import mal_loss, mal_negative_scale
from tbps.models import METHODS
from tbps.models.backbones import one_off_captions
from tbps.models.methods.irra import IRRA, IRRAOptions
from tbps.models.masking import augment_tokens

ALIGNMENT_LOSSES = ("mal", "sdm", "itc", "cmpm")  # each applied to the global and to the local pair
CFFA_LOSSES = (*ALIGNMENT_LOSSES, "id", "irr")


@dataclass
class CFFAOptions(IRRAOptions):
    """``cfg.method`` keys of CFFA (IRRA's, plus these); defaults are the paper's or its code's."""

    select_ratio: float = 0.3  # share of patches / words FLFR keeps, ranked by the global token's attention
    text_topk: str = "context"  # words kept: "context" (0.3 x (L-2), capped by the caption: code) or "caption"
    text_attention_row: str = "auto"  # whose attention ranks words: "auto" (eot for end-token pooling, else cls), "eot", "cls"
    local_dim: int = 0  # width of the local embeddings; 0 = 2 x the joint width (1024 for ViT-B/16)
    mal_margin: float = 0.1
    mal_tau: float = 0.015
    mal_reduction: str = "sum"  # "sum" over the batch (code) or "mean"
    mal_negative_scale: str = "batch"  # negative term x floor(1000/B)/1000 ("batch", code) or x tau ("tau", paper)
    flfr_lr: float = 1.0e-3  # fixed base lr of the FLFR heads (code); 0 = the new-module rate
    text_aug_prob: float = 0.2  # share of word tokens perturbed in training; 0 turns the augmentation off
    text_aug_mask_frac: float = 0.6  # perturbed tokens replaced by the mask token
    text_aug_random_frac: float = 0.2  # perturbed tokens replaced by a random id (the rest are deleted)
    inference: str = "fused"  # retrieval score: "fused" (mean of global and local cosine), "global", "local"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.select_ratio <= 1.0:
            raise TBPSError(f"method.select_ratio must be in (0, 1], got {self.select_ratio}")
        if self.text_topk not in ("context", "caption"):
            raise TBPSError(f"method.text_topk={self.text_topk!r}: choose context or caption")
        if self.text_attention_row not in ("auto", "eot", "cls"):
            raise TBPSError(f"method.text_attention_row={self.text_attention_row!r}: choose auto, eot or cls")
        if self.local_dim < 0 or self.local_dim % 2:
            raise TBPSError(f"method.local_dim must be 0 or a positive even number, got {self.local_dim}")
        if self.mal_margin < 0 or self.mal_tau <= 0:
            raise TBPSError(f"method.mal_margin must be >= 0 and method.mal_tau > 0, got "
                            f"{self.mal_margin} and {self.mal_tau}")
        if self.mal_negative_scale not in ("batch", "tau"):
            raise TBPSError(f"method.mal_negative_scale={self.mal_negative_scale!r}: choose batch or tau")
        if self.flfr_lr < 0:
            raise TBPSError(f"method.flfr_lr must be >= 0, got {self.flfr_lr}")
        if self.mal_reduction not in ("sum", "mean"):
            raise TBPSError(f"method.mal_reduction={self.mal_reduction!r}: choose sum or mean")
        if not 0.0 <= self.text_aug_prob <= 1.0:
            raise TBPSError(f"method.text_aug_prob must be in [0, 1], got {self.text_aug_prob}")
        if (self.text_aug_mask_frac < 0 or self.text_aug_random_frac < 0
                or self.text_aug_mask_frac + self.text_aug_random_frac > 1):
            raise TBPSError(f"method.text_aug_mask_frac ({self.text_aug_mask_frac}) + method.text_aug_random_frac "
                            f"({self.text_aug_random_frac}) must be non-negative and at most 1")
        if self.inference not in ("fused", "global", "local"):
            raise TBPSError(f"method.inference={self.inference!r}: choose fused, global or local")


def select_top_tokens(attention_row: Tensor, eligible: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the ``k[b]`` most attended eligible tokens of each row, most attended first.

    Args:
        attention_row: ``(B, N)`` attention of the global token to every token (read without gradient:
            the choice is discrete).
        eligible: ``(B, N)`` bool, the tokens that may be chosen.
        k: ``(B,)`` how many to keep per row, at least 1.

    Returns:
        ``(indices, selected)``, both ``(B, K)`` with ``K = max(k)``: ``indices[b, r]`` is the
        position of rank r, ``selected[b, r] = r < k[b]``. A row with fewer than ``k[b]`` eligible
        tokens fills its ranks with ineligible positions (callers cap k by the eligible count).
    """
    width = int(k.max().clamp(min=1))
    scores = attention_row.detach().float().masked_fill(~eligible, float("-inf"))
    indices = scores.topk(width, dim=1).indices
    selected = torch.arange(width, device=k.device).unsqueeze(0) < k.unsqueeze(1)
    return indices, selected


class FLFRHead(nn.Module):
    """FLFR's embedding of the selected tokens: ``Linear(x) + MLP(x)`` on L2-normalised tokens, max-pooled.

    MLP = Linear(D, Dl/2) -> BatchNorm1d -> ReLU -> Linear(Dl/2, Dl) (the code's two-layer MLP, from
    VSE-infinity). BatchNorm sees only the selected tokens, never the filler ranks of short captions.
    """

    def __init__(self, dim: int, local_dim: int) -> None:
        super().__init__()
        self.local_dim = local_dim
        self.linear = nn.Linear(dim, local_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, local_dim // 2), nn.BatchNorm1d(local_dim // 2), nn.ReLU(),
                                 nn.Linear(local_dim // 2, local_dim))

    def forward(self, tokens: Tensor, selected: Tensor) -> Tensor:
        """``tokens`` (B, K, D) in rank order, ``selected`` (B, K) bool (>= 1 per row) -> (B, Dl)."""
        x = F.normalize(tokens[selected].float(), dim=-1)
        embedded = self.linear(x) + self.mlp(x)
        grid = embedded.new_full((*selected.shape, self.local_dim), float("-inf"))
        grid = grid.masked_scatter(selected.unsqueeze(-1), embedded)
        return grid.amax(dim=1)


@METHODS.register("cffa")
class CFFA(IRRA):
    """IRRA + FLFR local embeddings + MAL + text augmentation; fused retrieval score (module docstring)."""

    options_class = CFFAOptions
    known_losses = CFFA_LOSSES

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__(cfg, num_classes, tokenizer, load_pretrained)
        opts: CFFAOptions = self.options
        if not any(name in self.loss_weights for name in ALIGNMENT_LOSSES):
            raise TBPSError(f"method cffa: set one of {', '.join(ALIGNMENT_LOSSES)} in loss "
                            f"(the global/local alignment; the recipe uses mal)")
        local_dim = opts.local_dim or 2 * self.embed_dim
        self.image_local_head = FLFRHead(self.embed_dim, local_dim)
        self.text_local_head = FLFRHead(self.embed_dim, local_dim)
        if opts.flfr_lr > 0:  # read by tbps.engine.optim.parameter_groups
            self.fixed_lr = {"image_local_head.": opts.flfr_lr, "text_local_head.": opts.flfr_lr}
        self.sot_id = int(tokenizer.sot_id)
        # ids never selected by value (padding is excluded by position: CLIP pads with a real id)
        self.unselectable_ids = sorted(set(self.special_ids) - {self.mask_id, self.pad_id}
                                       | {self.sot_id, self.eot_id})
        row = opts.text_attention_row
        if row == "auto":
            # a BERT pooled by [CLS] or by the mean still has [CLS]; only end-token pooling ranks by the end token
            row = "eot" if getattr(self.text_encoder, "pooling", "eot") == "eot" else "cls"
        self.text_attention_row = row

    # ------------------------------------------------------------------ FLFR
    def image_local(self, image_out: dict[str, Tensor]) -> Tensor:
        """Local image embedding (B, Dl) from an encoder output computed with ``return_attention``."""
        tokens, attention = image_out["tokens"], image_out["attention"]
        batch, num_tokens = tokens.shape[:2]
        eligible = torch.ones(batch, num_tokens, dtype=torch.bool, device=tokens.device)
        eligible[:, 0] = False  # the global token itself
        count = max(1, int(self.options.select_ratio * (num_tokens - 1)))
        k = torch.full((batch,), count, dtype=torch.long, device=tokens.device)
        indices, selected = select_top_tokens(attention[:, 0], eligible, k)
        picked = tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.image_local_head(picked, selected)

    def text_selection(self, token_ids: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        """Which words FLFR keeps: ``(indices, selected)`` as :func:`select_top_tokens` returns them.

        Ranked by the attention row of the global token; start, end, special ids and padding are
        never chosen.
        """
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        eligible = valid & ~torch.isin(token_ids, torch.tensor(self.unselectable_ids, device=token_ids.device))
        eligible[:, 0] = False
        batch, length = token_ids.shape
        rows = torch.arange(batch, device=token_ids.device)
        if self.text_attention_row == "cls":
            query = torch.zeros(batch, dtype=torch.long, device=token_ids.device)
        else:  # the first end token; the last valid position in rows without one
            is_end = token_ids == self.eot_id
            last_valid = valid.long().cumsum(dim=1).argmax(dim=1)
            query = torch.where(is_end.any(dim=1), is_end.long().argmax(dim=1), last_valid)
        words = eligible.sum(dim=1)
        ratio = self.options.select_ratio
        if self.options.text_topk == "context":
            k = torch.clamp(words, max=max(1, int(ratio * (length - 2))))
        else:
            k = torch.floor(words.float() * ratio).long()
        return select_top_tokens(attention[rows, query], eligible, k.clamp(min=1))

    def text_local(self, text_out: dict[str, Tensor], token_ids: Tensor) -> Tensor:
        """Local caption embedding (B, Dl) from an encoder output computed with ``return_attention``."""
        tokens = text_out["tokens"]
        indices, selected = self.text_selection(token_ids, text_out["attention"])
        picked = tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.text_local_head(picked, selected)

    # ------------------------------------------------------------------ retrieval
    def embed_images(self, images: Tensor) -> dict[str, Tensor]:
        out = self.image_encoder(images, return_attention=True)
        return {"global": F.normalize(out["global"].float(), dim=-1),
                "local": F.normalize(self.image_local(out), dim=-1)}

    def embed_texts(self, token_ids: Tensor) -> dict[str, Tensor]:
        out = self.text_encoder(token_ids, return_attention=True)
        return {"global": F.normalize(out["global"].float(), dim=-1),
                "local": F.normalize(self.text_local(out, token_ids), dim=-1)}

    def similarity(self, text_feats: dict[str, Tensor], image_feats: dict[str, Tensor]) -> Tensor:
        """Mean of the global and the local cosine (``method.inference``: fused, global or local)."""
        mode = self.options.inference
        if mode == "global":
            return text_feats["global"] @ image_feats["global"].t()
        local = text_feats["local"] @ image_feats["local"].t()
        if mode == "local":
            return local
        return (text_feats["global"] @ image_feats["global"].t() + local) / 2

    # ------------------------------------------------------------------ training
    def augment_captions(self, token_ids: Tensor) -> Tensor:
        """CFFA's text augmentation (mask / replace / delete); draws from torch's global generator."""
        opts = self.options
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        return augment_tokens(token_ids, mask_id=self.mask_id, vocab_size=self.vocab_size, pad_id=self.pad_id,
                              special_ids=self.special_ids, valid_mask=valid, prob=opts.text_aug_prob,
                              mask_frac=opts.text_aug_mask_frac, random_frac=opts.text_aug_random_frac)

    def alignment_loss(self, name: str, image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> Tensor:
        opts = self.options
        if name == "mal":
            scale = mal_negative_scale(pids.numel()) if opts.mal_negative_scale == "batch" else None
            return mal_loss(image_feats, text_feats, pids, margin=opts.mal_margin, tau=opts.mal_tau,
                            reduction=opts.mal_reduction, negative_scale=scale)
        if name == "sdm":
            return sdm_loss(image_feats, text_feats, pids, self.logit_scale)
        if name == "itc":
            return itc_loss(image_feats, text_feats, self.logit_scale)
        return cmpm_loss(image_feats, text_feats, pids, label_norm=opts.cmpm_label_norm)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, token_ids, pids = batch["images"], batch["token_ids"], batch["pids"]
        weights, opts = self.loss_weights, self.options
        use_irr = "irr" in weights and self.training
        out: dict[str, Tensor] = {}

        augmented = self.training and opts.text_aug_prob > 0
        if augmented:
            token_ids = self.augment_captions(token_ids)
        corrupted = labels = valid = None
        if use_irr:
            corrupted, labels, valid = self.corrupt_captions(token_ids)
        reuse = use_irr and opts.mask_global_text
        text_ids = corrupted if reuse else token_ids

        image_out = self.image_encoder(images, return_attention=True)
        with one_off_captions(self.text_encoder, augmented or reuse):
            text_out = self.text_encoder(text_ids, return_attention=True)
        image_global, text_global = image_out["global"], text_out["global"]
        image_local, text_local = self.image_local(image_out), self.text_local(text_out, text_ids)

        for name in ALIGNMENT_LOSSES:
            if name in weights:
                global_term = self.alignment_loss(name, image_global, text_global, pids)
                local_term = self.alignment_loss(name, image_local, text_local, pids)
                out[f"loss_{name}"] = weights[name] * (global_term + local_term)
                out[f"{name}_global"] = global_term.detach()
                out[f"{name}_local"] = local_term.detach()
        if self.classifier is not None:
            out.update(self.id_terms(image_global, text_global, pids))
        if use_irr:
            with one_off_captions(self.text_encoder):
                masked_out = text_out if reuse else self.text_encoder(corrupted)
            out.update(self.irr_terms(masked_out["tokens"], image_out["tokens"], labels, valid))
        return out
