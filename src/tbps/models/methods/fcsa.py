"""FCSA: text-based person search via fine-grained cross-modal semantic alignment.

Built on IRRA (the CLIP dual encoder, the shared ID classifier and the global losses are IRRA's;
``methods.md`` for the summary of the paper and its code that this follows). Training adds:

- Masked global captions (the authors' data loader): the captions that ID and CMPM see, and the
  candidate captions of the swap, are BERT-style masked (``global_mask_prob`` = 0.35 of the real
  tokens picked; 80% mask token, 10% random id, 10% kept); the text-side SGMM works on a clean
  copy. ``global_mask_prob: 0`` is the paper's reading (clean captions everywhere).
- Hard-positive swap: every sample brings ``data.positives`` (K = 4) other pairs of its identity
  from the shared loader (``TrainPairs``). In ``swap_rate`` (10%) of the rows the image is replaced
  by the candidate image least similar to the row's caption, in another 10% the caption by the
  candidate caption least similar to the row's image. ``swap_rows: exact`` (the code) draws
  ``int(swap_rate * B)`` rows for each swap independently (they may overlap; each choice reads the
  original pair); ``disjoint`` draws each row's fate once (Bernoulli, no overlap). The choice takes
  no gradient and runs the encoders in eval mode on the swapped rows' candidates only.
- SGMM, saliency-guided masking. Image side: the saliency of a patch is the cosine of its token to
  the caption's global feature; ``image_mask_ratio`` of the patches are chosen by saliency and their
  pixels replaced by Gaussian noise (in the normalised input space), then the image is re-encoded
  with gradient. A "patch" is a cell of the encoder's final token grid (``encoder.grid_size``): a
  ViT patch, or for a ModifiedResNet a cell of its last feature map; it covers the pixel block
  ``image_size / grid_size`` of the input, so the masked pixels are exactly the chosen cells.
  Text side: the saliency of a token is its cosine to the image's global feature;
  ``text_mask_ratio`` of the real tokens (start, end and padding excluded) are chosen and replaced
  by the mask token. ``saliency`` picks the direction: "least" (the authors' code masks the least
  similar patches/tokens; the default), "most" (the paper's summary: the salient ones) or "random"
  (the ablation without SGMM, same counts).
- CMRS, cross-modal reconstruction, image side: one cross-attention (queries = the masked image's
  patch tokens, keys/values = all caption tokens; ``CrossModalTransformer`` with no further layers)
  predicts the patch features; the prediction pooled over the masked cells is compared with the
  original tokens pooled over the same cells by ``tbps.losses.fcsa.cmrs_triplet_loss`` (Euclidean on
  normalised vectors, margin 0.5) against the hardest negative caption (the other identity's
  caption most similar to the image; the reconstruction is re-run with it) and a negative image's
  target: ``cmrs_negative_image: text_similarity`` (the code) takes the other identity's image that
  scores highest for the caption by global text-to-image cosine; ``reconstruction`` the image whose
  target is closest to the prediction.
- CMRS, text side: the masked caption's tokens attend to all image tokens, a 2-layer transformer
  and IRRA's MLM head predict the masked ids (cross-entropy, ``mlm_loss``).

Losses (``cfg.loss``): ``id`` + ``cmpm`` + ``cmrs_image`` + ``cmrs_text``, weight 1 each (the
authors' ``id+cmpm+stl_img+stl_txt``); CMPM's labels L2-normalised (``cmpm_label_norm: l2``, IRRA's
``compute_cmpm``, which the authors call); IRRA's ``sdm`` and ``itc`` are available too. Everything
above is train-time only: retrieval is IRRA's cosine of global features, at IRRA's cost.

Choices where the sources are silent: both masking ratios (0.3; not published), Gaussian noise
N(0, 1) as the replacement pixels, triplet distances on L2-normalised pooled vectors (so the margin
0.5 has a fixed scale), and the hardest negative caption found by global cosine.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.config import Config, build_dataclass
from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError
from tbps.losses import mlm_loss
from tbps.losses.fcsa import cmrs_triplet_loss
from tbps.models import METHODS
from tbps.models.backbones import one_off_captions
from tbps.models.base import parse_loss_weights
from tbps.models.methods.irra import IRRA, IRRAOptions
from tbps.models.layers import CrossModalTransformer, MLMHead
from tbps.models.masking import mask_tokens

FCSA_GLOBAL_LOSSES = ("sdm", "id", "itc", "cmpm")
FCSA_LOSSES = FCSA_GLOBAL_LOSSES + ("cmrs_image", "cmrs_text")
SALIENCY_MODES = ("least", "most", "random")


@dataclass
class FCSAOptions(IRRAOptions):
    """``cfg.method`` keys of FCSA.

    IRRA's keys are accepted because recipes inherit ``base.yaml``: ``cross_width`` / ``cross_heads``
    size both cross-modal blocks, ``cross_layers`` is the text side's transformer depth (FCSA: 2),
    ``mlm_activation`` the MLM head's and ``cmpm_label_norm`` CMPM's; ``mlm_prob`` and the 80/10/10
    fractions do not apply (FCSA masks ``text_mask_ratio`` of the tokens, all with the mask token), so
    a value other than IRRA's default is an error rather than silently ignored.
    """

    cross_layers: int = 2  # transformer blocks after the text side's cross-attention (FCSA: 2)
    cmpm_label_norm: str = "l2"  # IRRA's compute_cmpm, which the authors' code calls
    global_mask_prob: float = 0.35  # BERT-style masking of the captions ID/CMPM and the swap see (code); 0 = clean
    cmrs_negative_image: str = "text_similarity"  # "text_similarity" (code) or "reconstruction"
    saliency: str = "least"  # which patches/tokens SGMM masks: "least" (authors' code), "most" or "random"
    image_mask_ratio: float = 0.3  # share of patches masked (not published; our default)
    text_mask_ratio: float = 0.3  # share of real caption tokens masked (not published; our default)
    swap_rate: float = 0.1  # share of rows whose image is swapped for a hard positive (the same again for captions)
    swap_rows: str = "exact"  # "exact": int(rate x B) rows per swap, independent (code); "disjoint": Bernoulli
    margin: float = 0.5  # CMRS triplet margin (Euclidean, normalised features)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.saliency not in SALIENCY_MODES:
            raise TBPSError(f"method.saliency={self.saliency!r}: choose least, most or random")
        for name in ("image_mask_ratio", "text_mask_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise TBPSError(f"method.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.swap_rows not in ("exact", "disjoint"):
            raise TBPSError(f"method.swap_rows={self.swap_rows!r}: choose exact or disjoint")
        limit = 0.5 if self.swap_rows == "disjoint" else 1.0
        if not 0.0 <= self.swap_rate <= limit:
            raise TBPSError(f"method.swap_rate must be in [0, {limit}] with method.swap_rows={self.swap_rows}, "
                            f"got {self.swap_rate}")
        if self.margin < 0:
            raise TBPSError(f"method.margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.global_mask_prob < 1.0:
            raise TBPSError(f"method.global_mask_prob must be in [0, 1), got {self.global_mask_prob}")
        if self.cmrs_negative_image not in ("text_similarity", "reconstruction"):
            raise TBPSError(f"method.cmrs_negative_image={self.cmrs_negative_image!r}: choose text_similarity "
                            f"or reconstruction")
        if self.mask_global_text:
            raise TBPSError("method.mask_global_text is IRRA's switch; FCSA masks the captions of its global "
                            "losses by method.global_mask_prob")
        for name in ("mlm_prob", "mlm_mask_frac", "mlm_random_frac"):
            default = IRRAOptions.__dataclass_fields__[name].default
            if getattr(self, name) != default:
                raise TBPSError(f"method.{name}={getattr(self, name)}: IRRA's MLM option does not apply to FCSA, "
                                f"which masks method.text_mask_ratio of the tokens with the mask token")


# ----------------------------------------------------------------------------- SGMM pieces

def cosine_saliency(tokens: Tensor, query: Tensor) -> Tensor:
    """``(B, N)`` saliency of each token: the cosine of ``tokens`` (B, N, D) to ``query`` (B, D)."""
    return F.cosine_similarity(tokens, query.unsqueeze(1), dim=-1)


def select_by_saliency(saliency: Tensor, counts: Tensor, mode: str, eligible: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """``(B, N)`` bool: per row, the ``counts[b]`` eligible positions of least / most saliency.

    ``mode="random"`` ignores the saliency and picks uniformly (the same counts: the no-SGMM
    ablation). Ties go to the lower position. One sort for the whole batch, no loop over rows.
    """
    if mode == "least":
        scores = saliency.float()
    elif mode == "most":
        scores = -saliency.float()
    elif mode == "random":
        scores = torch.rand(saliency.shape, generator=generator, device=saliency.device)
    else:
        raise ValueError(f"saliency mode must be one of {SALIENCY_MODES}, got {mode!r}")
    if eligible is not None:
        scores = scores.masked_fill(~eligible, float("inf"))
    order = scores.argsort(dim=1, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    chosen = ranks < counts.to(ranks.device).view(-1, 1)
    return chosen if eligible is None else chosen & eligible


def ratio_counts(available: Tensor, ratio: float) -> Tensor:
    """``round(ratio * n)`` per row, at least 1 where a row has anything to mask, at most ``n``."""
    counts = torch.floor(available.float() * ratio + 0.5).long()
    return torch.minimum(counts.clamp(min=1), available.long())


def patch_pixel_mask(chosen: Tensor, grid_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """``(B, H, W)`` bool, True on the pixel blocks of the chosen patches (``chosen`` (B, gh*gw), row-major).

    Each patch covers ``H/gh x W/gw`` pixels: a ViT patch, or the input region that a
    ModifiedResNet's final feature-map cell down-samples (stride 32, or 16 with last stride 1).
    """
    (gh, gw), (height, width) = grid_size, image_size
    if height % gh or width % gw:
        raise ValueError(f"image {height}x{width} is not a whole number of {gh}x{gw} patches")
    cells = chosen.view(chosen.shape[0], gh, gw)
    return cells.repeat_interleave(height // gh, dim=1).repeat_interleave(width // gw, dim=2)


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for a no-gradient side computation: BatchNorm statistics and dropout untouched."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _least_similar(anchor: Tensor, candidates: Tensor, encode) -> Tensor:
    """For each row, the index (n,) of the candidate (``candidates`` (n, K, ...), encoded by
    ``encode``) whose feature is least similar (cosine) to the row's ``anchor`` feature (n, D): the
    hardest positive."""
    n, k = candidates.shape[:2]
    feats = F.normalize(encode(candidates.flatten(0, 1)), dim=-1).view(n, k, -1)
    return torch.einsum("nd,nkd->nk", F.normalize(anchor, dim=-1), feats).argmin(dim=1)


# ----------------------------------------------------------------------------- the method

@METHODS.register("fcsa")
class FCSA(IRRA):
    """IRRA's encoders, classifier and global losses + hard-positive swap, SGMM and CMRS (module docstring)."""

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        options: FCSAOptions = build_dataclass(FCSAOptions, cfg.method, "method")
        weights = parse_loss_weights(cfg.loss, FCSA_LOSSES, self.name)
        global_weights = {k: v for k, v in weights.items() if k in FCSA_GLOBAL_LOSSES}
        if not global_weights:
            raise TBPSError("method fcsa: retrieval uses the global features, so loss needs at least one of "
                            f"{', '.join(FCSA_GLOBAL_LOSSES)}")
        irra_keys = {f.name for f in dataclasses.fields(IRRAOptions)}
        irra_cfg = dataclasses.replace(cfg, loss=global_weights,
                                       method={k: getattr(options, k) for k in irra_keys})
        super().__init__(irra_cfg, num_classes, tokenizer, load_pretrained=load_pretrained)
        self.options = options
        self.loss_weights = weights
        positives = int(getattr(cfg.data, "positives", 0))
        if options.swap_rate > 0 and positives < 1:
            raise TBPSError(f"method.swap_rate={options.swap_rate} needs same-identity candidates: set "
                            f"data.positives (FCSA: 4) or method.swap_rate=0")

        dim = self.embed_dim
        width = options.cross_width or dim
        heads = options.cross_heads or max(width // 64, 1)
        if width % heads:
            raise TBPSError(f"method.cross_width={width} is not divisible by method.cross_heads={heads}")
        self.image_reconstructor = None
        self.reconstruction_proj = None
        if "cmrs_image" in weights:
            self.image_reconstructor = CrossModalTransformer(width, 0, heads, query_dim=dim, memory_dim=dim)
            self.reconstruction_proj = nn.Linear(width, dim) if width != dim else nn.Identity()
        if "cmrs_text" in weights:
            self.cross_modal = CrossModalTransformer(width, options.cross_layers, heads, query_dim=dim,
                                                     memory_dim=dim)
            self.mlm_head = MLMHead(width, self.vocab_size, options.mlm_activation)
        self._special = torch.tensor(self.special_ids + [self.mask_id], dtype=torch.long)

    # ------------------------------------------------------------------ hard-positive swap
    def swap_hard_positives(self, images: Tensor, token_ids: Tensor, pos_images: Tensor,
                            pos_token_ids: Tensor, clean_ids: Tensor | None = None,
                            pos_clean_ids: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(images, token_ids, image_rows, text_rows, clean_ids)`` with the hardest positives swapped in.

        Rows are drawn from torch's global generator (``swap_rows``): ``swap_rate`` of them get the
        candidate image (``pos_images`` (B, K, 3, H, W)) least similar to their caption, another
        ``swap_rate`` the candidate caption (``pos_token_ids`` (B, K, L)) least similar to their
        image; both choices read the original pairs. The choice is made on the captions as given
        (masked ones in the code); ``clean_ids`` / ``pos_clean_ids``, the unmasked copies, follow
        the same swap.
        """
        rate, n = self.options.swap_rate, images.shape[0]
        if self.options.swap_rows == "exact":
            count = int(rate * n)
            image_rows = torch.randperm(n, device=images.device)[:count].sort().values
            text_rows = torch.randperm(n, device=images.device)[:count].sort().values
        else:
            draws = torch.rand(n, device=images.device)
            image_rows = (draws < rate).nonzero().squeeze(1)
            text_rows = ((draws >= rate) & (draws < 2 * rate)).nonzero().squeeze(1)
        original_images = images
        masked = self.options.global_mask_prob > 0  # then the candidates are one-off masked captions
        with torch.no_grad(), _eval_mode(self.image_encoder, self.text_encoder), \
                one_off_captions(self.text_encoder, masked):
            if image_rows.numel():
                anchor = self.encode_text(token_ids[image_rows])
                pick = _least_similar(anchor, pos_images[image_rows], self.encode_image)
                images = images.index_copy(0, image_rows, pos_images[image_rows, pick])
            if text_rows.numel():
                anchor = self.encode_image(original_images[text_rows])
                pick = _least_similar(anchor, pos_token_ids[text_rows], self.encode_text)
                token_ids = token_ids.index_copy(0, text_rows, pos_token_ids[text_rows, pick])
                if clean_ids is not None:
                    clean_ids = clean_ids.index_copy(0, text_rows, pos_clean_ids[text_rows, pick])
        return images, token_ids, image_rows, text_rows, clean_ids

    def mask_global_captions(self, token_ids: Tensor) -> Tensor:
        """The captions ID and CMPM see: BERT-style masked at ``global_mask_prob`` (80/10/10), as the
        authors' data loader does; draws from torch's global generator."""
        opts = self.options
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        masked, _ = mask_tokens(token_ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                special_ids=self.special_ids, valid_mask=valid, prob=opts.global_mask_prob,
                                mask_frac=opts.mlm_mask_frac, random_frac=opts.mlm_random_frac)
        return masked

    # ------------------------------------------------------------------ SGMM + CMRS, image side
    def mask_patches(self, images: Tensor, patch_tokens: Tensor, text_global: Tensor) -> tuple[Tensor, Tensor]:
        """``(masked_images, chosen (B, N))``: SGMM's chosen patches replaced by Gaussian noise."""
        encoder = self.image_encoder
        with torch.no_grad():
            saliency = cosine_saliency(patch_tokens, text_global)
            available = torch.full((images.shape[0],), patch_tokens.shape[1], device=images.device)
            chosen = select_by_saliency(saliency, ratio_counts(available, self.options.image_mask_ratio),
                                        self.options.saliency)
            pixels = patch_pixel_mask(chosen, tuple(encoder.grid_size), tuple(images.shape[-2:]))
        noise = torch.randn_like(images)
        return torch.where(pixels.unsqueeze(1), noise, images), chosen

    def reconstruct_patches(self, masked_patch_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """``(B, N, D)``: the masked image's patch tokens attend to the caption's tokens."""
        fused = self.image_reconstructor(masked_patch_tokens, text_tokens, memory_mask=text_mask)
        return self.reconstruction_proj(fused)

    def image_cmrs(self, images: Tensor, image_out: dict[str, Tensor], text_out: dict[str, Tensor],
                   pids: Tensor) -> Tensor:
        """The image-side CMRS triplet loss (unweighted) for one batch."""
        patches = image_out["tokens"][:, 1:]
        masked_images, chosen = self.mask_patches(images, patches, text_out["global"])
        masked_patches = self.image_encoder(masked_images)["tokens"][:, 1:]  # with gradient
        share = chosen.to(patches.dtype) / chosen.sum(dim=1, keepdim=True).clamp(min=1)
        pool = lambda x: torch.einsum("bn,bnd->bd", share, x)  # noqa: E731  mean over the masked cells
        text_tokens, text_mask = text_out["tokens"], text_out["mask"]
        pred = pool(self.reconstruct_patches(masked_patches, text_tokens, text_mask))
        with torch.no_grad():  # hardest negatives by global cosine: a caption per image, an image per caption
            sim = F.normalize(image_out["global"], dim=-1) @ F.normalize(text_out["global"], dim=-1).t()
            same = pids.view(-1, 1) == pids.view(1, -1)
            negative = sim.masked_fill(same, float("-inf")).argmax(dim=1)
            has_negative = (~same).any(dim=1)
            negative_image = None
            if self.options.cmrs_negative_image == "text_similarity":
                negative_image = sim.t().masked_fill(same, float("-inf")).argmax(dim=1)
        pred_negative = pool(self.reconstruct_patches(masked_patches, text_tokens[negative], text_mask[negative]))
        return cmrs_triplet_loss(pred, pool(patches), pred_negative, pids, self.options.margin, has_negative,
                                 negative_image=negative_image)

    # ------------------------------------------------------------------ SGMM + CMRS, text side
    def mask_caption_tokens(self, token_ids: Tensor, text_tokens: Tensor,
                            image_global: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(corrupted ids, chosen (B, L), valid (B, L))``: SGMM's chosen tokens become the mask token."""
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        eligible = valid & ~torch.isin(token_ids, self._special.to(token_ids.device))
        with torch.no_grad():
            saliency = cosine_saliency(text_tokens, image_global)
            counts = ratio_counts(eligible.sum(dim=1), self.options.text_mask_ratio)
            chosen = select_by_saliency(saliency, counts, self.options.saliency, eligible)
        return token_ids.masked_fill(chosen, self.mask_id), chosen, valid

    def text_cmrs(self, token_ids: Tensor, image_out: dict[str, Tensor],
                  text_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(masked-token cross-entropy, accuracy)`` of the text-side CMRS on the clean caption
        ``token_ids``, whose token features ``text_tokens`` give the saliency."""
        corrupted, chosen, valid = self.mask_caption_tokens(token_ids, text_tokens, image_out["global"])
        with one_off_captions(self.text_encoder):
            masked_out = self.text_encoder(corrupted)  # with gradient
        fused = self.cross_modal(masked_out["tokens"], image_out["tokens"], query_mask=valid)
        logits = self.mlm_head(fused[chosen])
        targets = token_ids[chosen]
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == targets).float().sum() / max(targets.numel(), 1)
        return mlm_loss(logits, targets), accuracy

    # ------------------------------------------------------------------ training step
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, token_ids, pids = batch["images"], batch["token_ids"], batch["pids"]
        weights = self.loss_weights
        out: dict[str, Tensor] = {}
        swap = self.training and self.options.swap_rate > 0
        if swap and "pos_images" not in batch:
            raise TBPSError("method fcsa: the batch has no positives for the hard-positive swap "
                            "(set data.positives, FCSA: 4, or method.swap_rate=0)")
        clean_ids = token_ids
        masked = self.training and self.options.global_mask_prob > 0
        if masked:
            token_ids = self.mask_global_captions(token_ids)
        if swap:
            pos_clean = batch["pos_token_ids"]
            pos_ids = self.mask_global_captions(pos_clean.flatten(0, 1)).view_as(pos_clean) if masked else pos_clean
            images, token_ids, image_rows, text_rows, clean_ids = self.swap_hard_positives(
                images, token_ids, batch["pos_images"], pos_ids, clean_ids, pos_clean)
            out["swapped_images"] = torch.tensor(float(image_rows.numel()))
            out["swapped_captions"] = torch.tensor(float(text_rows.numel()))

        image_out = self.image_encoder(images)
        with one_off_captions(self.text_encoder, masked):
            text_out = self.text_encoder(token_ids)
        image_feats, text_feats = image_out["global"], text_out["global"]
        out.update(self.global_terms(image_feats, text_feats, pids))
        if self.training and "cmrs_image" in weights:
            out["loss_cmrs_image"] = weights["cmrs_image"] * self.image_cmrs(images, image_out, text_out, pids)
        if self.training and "cmrs_text" in weights:
            if masked:  # the saliency of the clean copy's tokens, as the code's no-gradient pass
                with torch.no_grad():
                    clean_tokens = self.text_encoder(clean_ids)["tokens"]
            else:
                clean_tokens = text_out["tokens"]
            loss, accuracy = self.text_cmrs(clean_ids, image_out, clean_tokens)
            out["loss_cmrs_text"] = weights["cmrs_text"] * loss
            out["acc_mlm"] = accuracy
        return out
