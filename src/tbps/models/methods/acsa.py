"""ACSA: asymmetric cross-scale alignment for text-based person search (Ji, Hu, Liu, Wu, Zhao; IEEE TMM 2022).

Reported R1: CUHK-PEDES 63.56, RSTPReid 48.40 (Swin-Tiny at 224x224 + BERT-base). What each part
does here, and which source each choice follows (``methods.md``; the authors' code mul-hjh/ACSA;
where both are silent, our choice, named as such):

- Image scales. A hierarchical image encoder gives a *global* feature (the mean of Swin's final,
  normed stage), *region* features (the final stage pooled into ``num_regions`` horizontal stripes:
  head / upper body / lower body / feet at 4, the authors' four regions) and *window* features (the
  stage before it, ``window_stage``, pooled into a ``window_grid`` of cells; the authors take 4
  windows of Swin's third stage). Each scale has its own Linear into the joint width D.
  ``regions`` picks how regions are made: ``spatial`` (default; our choice: a region should be a
  place in the image) pools stripes of the map; ``channel`` is the authors' code (``models/model.py``,
  ``Model.forward``): the bottlenecked global vector goes through a residual block
  (Linear-BN-ReLU-Linear-BN, + input, ReLU), is cut into 6 channel chunks, and head / upper body /
  lower body / feet are chunks 1-2 / 2-3 / 4-5 / 6, each through Linear + ReLU + Dropout(0.5) to D
  (``ChannelRegions``; needs ``num_regions: 4``). Encoders: timm's Swin (``models/backbones/swin.py``,
  ``model.image_backbone: swin_*``), or a CLIP ViT (``model.image_backbone: ViT-B-16`` etc.), whose
  last layer's patch tokens give the regions and an intermediate layer (``clip_window_layer``) the
  windows, its CLS token the global feature.
- Text scales. A BERT-family encoder (transformers) gives the sentence feature ([CLS]) and noun-phrase
  features. Phrases come from the token ids (``tbps.data.phrases``: word pieces -> words ->
  rule-based chunks, at most ``max_phrases`` = 10, cached per caption). ``phrase_features: pool``
  (default) mean-pools the sentence pass's token features over each phrase's span: one text pass,
  and each phrase read in its context; ``encode`` re-encodes each phrase alone as ``[CLS] phrase
  [SEP]`` and takes its [CLS] feature (the authors' code; ~``max_phrases`` more, short, text passes).
- Global-level alignment: CMPM + CMPC on (global image, sentence) pairs (``losses.cmpm_loss``,
  ``losses.acsa.cmpc_loss``), after a BatchNorm1d "bottleneck" per modality (the authors' code;
  ``bottleneck``). The authors' code (``utils/metric.py``, ``Loss.forward``) weights CMPM + 4 CMPC +
  0.1 cross-scale and drops CMPM from the total once it falls below 0.5 (``cmpm_gate``; the recipe
  sets the weights in ``loss``). Why it matters: CMPM and CMPC score scalar projections ``v . t/|t|`` with
  no scale, so features of norm ~1 give near-uniform softmaxes and almost no gradient; the
  bottleneck's unit-variance output has norm ~sqrt(D), which puts the logits in a useful range.
- Asymmetric cross-attention (``cross_scale_similarity``): image-scale queries (global, regions,
  windows; ``Linear`` query/value heads) attend over phrase keys/values (``Linear`` + LayerNorm), and
  phrases attend over the image scales; attention = softmax(``attn_lambda`` * l2-normalised
  LeakyReLU(0.1) cosine), the normalisation running over the attending side, as in SCAN, on which
  the authors' code builds. Each direction's score is the mean cosine between a query's value and
  its attended context; the cross-scale score (logged, and fused at inference when
  ``fuse_directions`` is not set) is the mean of the two directions. Loss: CMPM's
  matching form, weight 0.1 (``loss.cross_scale``), scale ``cross_logit_scale`` = 20
  (the code's lambda): ``cross_loss: image_rows`` (default, the code) matches each direction's
  matrix per image over the captions (``losses.acsa.cross_scale_image_rows_loss``); ``mean`` matches the
  mean score both ways (``losses.acsa.cross_scale_loss``). The first image scale is the global feature
  (``scale_global: feature``) or, as the code, the mean of the region and window scales (``mean``).
- Inference: ``similarity = a * global cosine + (1 - a) * cross-scale``, ``a = fuse_weight`` (0.9);
  the cross-scale term's directions are ``fuse_directions`` (empty: as ``directions``). The authors'
  code (``utils/metric.py``, ``compute_topk``) fuses the image-to-text score alone: the recipes set
  ``fuse_directions: i2t``.
  ``text["global"] @ image["global"].T`` is the global cosine itself (a shortlist on its own).

Cost of the cross-scale score: for Q captions x G images with S image scales (1 + regions + windows,
9 by default) and P <= 10 phrases, the score needs about 3 * S * P * D multiply-adds per pair,
against D for the global cosine (~270x at S=9, P=10), plus ~20 element-wise passes over S * P
entries per pair (softmaxes, norms), and Q*G*S*P-sized intermediates, never Q*G*D: contexts are not
materialised, their dot products and norms come from Gram matrices (benchmarks/README.md has the
measured times: some 25-40 us per pair on one CPU thread, 400-1000x the global cosine). It is
computed in blocks of at most ``score_block`` (query, image, scale, phrase) entries, so memory is
bounded whatever Q and G; ``fuse_weight: 1.0`` skips it (global-only scoring, e.g. ``tbps eval
... method.fuse_weight=1.0``). Set ``cross_attention: false`` to train without the branch (CMPM +
CMPC only, the ablation "without asymmetric cross-attention").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.config import Config, build_dataclass
from tbps.data.phrases import PhraseExtractor
from tbps.errors import TBPSError
from tbps.losses import cmpm_loss
from tbps.losses.acsa import cmpc_loss, cross_scale_image_rows_loss, cross_scale_loss
from tbps.models import METHODS
from tbps.models.backbones.architectures import ActivationMixin
from tbps.models.base import TBPSModel, parse_loss_weights

ACSA_LOSSES = ("cmpm", "cmpc", "cross_scale")


@dataclass
class ACSAOptions:
    """``cfg.method`` keys of ACSA; defaults follow the paper / the authors' code (module docstring)."""

    bottleneck: bool = True  # BatchNorm1d on the global image / sentence features (the ACSA code)
    num_regions: int = 4  # horizontal stripes of the last stage (head, upper, lower, feet)
    window_grid: list[int] = field(default_factory=lambda: [2, 2])  # rows x cols of window cells
    window_stage: int = -2  # Swin stage whose map gives the windows (-2: the third of four)
    clip_window_layer: int = 0  # CLIP ViT: 1-based layer whose patch tokens give the windows; 0 = 2/3 depth
    max_phrases: int = 10  # noun phrases per caption (methods.md: up to 10)
    phrase_features: str = "pool"  # "pool" (span mean of the sentence pass) or "encode" (the authors')
    cross_attention: bool = True  # false: no cross-scale branch (CMPM + CMPC only; scoring global only)
    directions: str = "both"  # cross-scale score: "both" (mean), "i2t" (image scales attend) or "t2i"
    attn_lambda: float = 20.0  # softmax inverse temperature of the cross-attention (SCAN's lambda)
    leaky_slope: float = 0.1  # LeakyReLU slope on the cosines before normalisation
    cross_logit_scale: float = 20.0  # scale of the cross-scale score in its matching loss
    cmpm_label_norm: str = "l1"  # CMPM / cross-scale label normalisation: "l1" (paper) or "l2" (ACSA code)
    cmpm_gate: float = 0.5  # CMPM leaves the total while its value is below this (the code: 0.5); 0 = always on
    regions: str = "spatial"  # "spatial" stripes of the map (ours) or "channel" chunks of the global vector (code)
    fuse_directions: str = ""  # cross-scale directions at inference; "" = as directions (the code: i2t)
    cross_loss: str = "image_rows"  # "image_rows": each direction's matrix, softmax over captions (code); "mean"
    scale_global: str = "feature"  # first image scale: the global "feature" (ours) or the "mean" of the others (code)
    fuse_weight: float = 0.9  # inference: a * global + (1 - a) * cross-scale; 1.0 = global only
    score_block: int = 4_194_304  # max (query, image, scale, phrase) entries scored at once
    swin_embed_dim: int = 0  # Swin overrides (0 / empty: the timm architecture's own)
    swin_depths: list[int] = field(default_factory=list)
    swin_heads: list[int] = field(default_factory=list)
    swin_window: int = 0
    drop_path: float = 0.1  # Swin stochastic depth

    def __post_init__(self) -> None:
        if self.num_regions < 1:
            raise TBPSError(f"method.num_regions must be >= 1, got {self.num_regions}")
        if len(self.window_grid) != 2 or min(self.window_grid) < 1:
            raise TBPSError(f"method.window_grid must be [rows, cols] >= 1, got {self.window_grid}")
        if self.max_phrases < 1:
            raise TBPSError(f"method.max_phrases must be >= 1, got {self.max_phrases}")
        if self.phrase_features not in ("pool", "encode"):
            raise TBPSError(f"method.phrase_features={self.phrase_features!r}: choose pool or encode")
        if self.directions not in ("both", "i2t", "t2i"):
            raise TBPSError(f"method.directions={self.directions!r}: choose both, i2t or t2i")
        if self.fuse_directions not in ("", "both", "i2t", "t2i"):
            raise TBPSError(f"method.fuse_directions={self.fuse_directions!r}: choose both, i2t, t2i or empty")
        if self.cross_loss not in ("image_rows", "mean"):
            raise TBPSError(f"method.cross_loss={self.cross_loss!r}: choose image_rows or mean")
        if self.scale_global not in ("feature", "mean"):
            raise TBPSError(f"method.scale_global={self.scale_global!r}: choose feature or mean")
        if self.regions not in ("spatial", "channel"):
            raise TBPSError(f"method.regions={self.regions!r}: choose spatial or channel")
        if self.regions == "channel" and self.num_regions != 4:
            raise TBPSError(f"method.regions=channel is the authors' four regions (head, upper, lower, feet): "
                            f"set method.num_regions=4, got {self.num_regions}")
        if self.cmpm_gate < 0:
            raise TBPSError(f"method.cmpm_gate must be >= 0, got {self.cmpm_gate}")
        if self.attn_lambda <= 0 or self.cross_logit_scale <= 0:
            raise TBPSError("method.attn_lambda and method.cross_logit_scale must be > 0")
        if self.cmpm_label_norm not in ("l1", "l2"):
            raise TBPSError(f"method.cmpm_label_norm={self.cmpm_label_norm!r}: choose l1 or l2")
        if not 0.0 <= self.fuse_weight <= 1.0:
            raise TBPSError(f"method.fuse_weight must be in [0, 1], got {self.fuse_weight}")
        if self.score_block < 1:
            raise TBPSError(f"method.score_block must be >= 1, got {self.score_block}")
        if self.clip_window_layer < 0:
            raise TBPSError(f"method.clip_window_layer must be >= 0, got {self.clip_window_layer}")
        if not 0.0 <= self.drop_path < 1.0:
            raise TBPSError(f"method.drop_path must be in [0, 1), got {self.drop_path}")


# ----------------------------------------------------------------------------- cross-scale score

def _attend_score(logits: Tensor, key_mask: Tensor | None, value_dots: Tensor, value_gram: Tensor,
                  query_norms: Tensor, attn_lambda: float) -> Tensor:
    """One direction of the cross-attention: per query, cos(its value, its attended context).

    ``logits`` (..., Nq, Nk): LeakyReLU cosines, already normalised over the query axis; ``key_mask``
    (..., Nk) or None; ``value_dots`` (..., Nq, Nk) = value_q . value_k; ``value_gram`` (..., Nk, Nk)
    = value_k . value_k'; ``query_norms`` (..., Nq) = |value_q|. Returns (..., Nq).
    """
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.unsqueeze(-2), float("-inf"))
    attn = torch.softmax(attn_lambda * logits, dim=-1)
    dot = (attn * value_dots).sum(dim=-1)
    context_sq = torch.einsum("...qk,...kl,...ql->...q", attn, value_gram, attn)
    return dot / (query_norms * context_sq.clamp_min(0).sqrt()).clamp_min(1e-8)


def cross_scale_similarity(phrase_keys: Tensor, phrase_values: Tensor, phrase_mask: Tensor,
                           scale_queries: Tensor, scale_values: Tensor, attn_lambda: float = 20.0,
                           leaky_slope: float = 0.1, directions: str = "both") -> Tensor:
    """ACSA's cross-scale score of T captions against G images, ``(T, G)``, for all pairs at once.

    Inputs: ``phrase_keys``/``phrase_values`` (T, P, D), ``phrase_mask`` (T, P) (1 = real phrase),
    ``scale_queries``/``scale_values`` (G, S, D). With ``c_sp`` = cos(query_s, key_p) and
    ``a = LeakyReLU(c)``:

    - image-to-text (image scales attend phrases): ``alpha_sp = softmax_p(lambda a_sp / |a_.p|_2)``
      (norm over scales s), ``ctx_s = sum_p alpha_sp value_p``, ``r_i2t = mean_s cos(value_s, ctx_s)``;
    - text-to-image (phrases attend image scales): ``beta_ps = softmax_s(lambda a_sp / |a_s.|_2)``
      (norm over real phrases p), ``ctx_p = sum_s beta_ps value_s``, ``r_t2i = mean_p cos(value_p, ctx_p)``
      over real phrases;
    - score = (r_i2t + r_t2i) / 2 (``directions="both"``), or one of them.

    Memory is O(T*G*S*P): ``value . ctx`` and ``|ctx|`` come from value dot products and Gram
    matrices, never from a (T, G, S, D) context tensor. Call it on blocks (``ACSA.similarity`` does).
    """
    mask = phrase_mask.to(torch.bool)
    keys = F.normalize(phrase_keys, dim=-1)
    queries = F.normalize(scale_queries, dim=-1)
    cos = torch.einsum("tpd,gsd->tgsp", keys, queries)  # (T, G, S, P)
    act = F.leaky_relu(cos, leaky_slope)
    value_dots = torch.einsum("gsd,tpd->tgsp", scale_values, phrase_values)
    scores = []
    if directions in ("both", "i2t"):
        logits = act / act.pow(2).sum(dim=2, keepdim=True).add(1e-8).sqrt()  # l2 over scales s
        text_gram = torch.einsum("tpd,tqd->tpq", phrase_values, phrase_values)[:, None]  # (T, 1, P, P)
        scale_norms = scale_values.norm(dim=-1)[None]  # (1, G, S)
        per_scale = _attend_score(logits, mask[:, None], value_dots, text_gram, scale_norms, attn_lambda)
        scores.append(per_scale.mean(dim=-1))
    if directions in ("both", "t2i"):
        act_t = act.transpose(-1, -2).masked_fill(~mask[:, None, :, None], 0.0)  # (T, G, P, S)
        logits = act_t / act_t.pow(2).sum(dim=2, keepdim=True).add(1e-8).sqrt()  # l2 over real phrases p
        image_gram = torch.einsum("gsd,grd->gsr", scale_values, scale_values)[None]  # (1, G, S, S)
        phrase_norms = phrase_values.norm(dim=-1)[:, None]  # (T, 1, P)
        per_phrase = _attend_score(logits, None, value_dots.transpose(-1, -2), image_gram, phrase_norms,
                                   attn_lambda)
        weights = mask.to(per_phrase.dtype)[:, None]
        scores.append((per_phrase * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0))
    return scores[0] if len(scores) == 1 else (scores[0] + scores[1]) / 2


def blocked_cross_scale_similarity(text_feats: dict[str, Tensor], image_feats: dict[str, Tensor],
                                   block: int, **kwargs: Any) -> Tensor:
    """``cross_scale_similarity`` over (query, gallery) blocks of at most ``block`` entries each."""
    keys, values, mask = text_feats["phrase_key"], text_feats["phrase_value"], text_feats["phrase_mask"]
    queries, scale_values = image_feats["scale_query"], image_feats["scale_value"]
    num_t, num_g = keys.shape[0], queries.shape[0]
    per_pair = max(1, keys.shape[1] * queries.shape[1])
    pairs = max(1, block // per_pair)
    t_step = max(1, min(num_t, int(math.sqrt(pairs))))
    g_step = max(1, min(num_g, pairs // t_step))
    out = keys.new_empty(num_t, num_g)
    for t0 in range(0, num_t, t_step):
        t1 = min(num_t, t0 + t_step)
        for g0 in range(0, num_g, g_step):
            g1 = min(num_g, g0 + g_step)
            out[t0:t1, g0:g1] = cross_scale_similarity(keys[t0:t1], values[t0:t1], mask[t0:t1],
                                                       queries[g0:g1], scale_values[g0:g1], **kwargs)
    return out


# ----------------------------------------------------------------------------- image scales

def _stripes_and_windows(last_map: Tensor, window_map: Tensor, num_regions: int,
                         window_grid: list[int]) -> tuple[Tensor, Tensor]:
    """(B, R, C_last) horizontal-stripe means and (B, W, C_win) window-cell means of two maps."""
    regions = F.adaptive_avg_pool2d(last_map, (num_regions, 1)).flatten(2).transpose(1, 2)
    windows = F.adaptive_avg_pool2d(window_map, tuple(window_grid)).flatten(2).transpose(1, 2)
    return regions, windows


class SwinScales(nn.Module):
    """Global, region and window features of a Swin, each projected to ``dim``."""

    def __init__(self, backbone: nn.Module, dim: int, options: ACSAOptions) -> None:
        super().__init__()
        self.backbone = backbone  # SwinBackbone; its timm model sits at backbone.backbone
        stages = len(backbone.stage_dims)
        index = options.window_stage if options.window_stage >= 0 else stages + options.window_stage
        if not 0 <= index < stages:
            raise TBPSError(f"method.window_stage={options.window_stage}: the Swin has {stages} stages")
        self.window_index = index
        self.num_regions, self.window_grid = options.num_regions, list(options.window_grid)
        last_dim, window_dim = backbone.num_features, backbone.stage_dims[index]
        self.global_proj = nn.Linear(last_dim, dim)
        # channel regions are cut from the bottlenecked global feature by the method (ChannelRegions)
        self.region_proj = nn.Linear(last_dim, dim) if options.regions == "spatial" else None
        self.window_norm = nn.LayerNorm(window_dim)  # intermediate stages are not normed by Swin
        self.window_proj = nn.Linear(window_dim, dim)
        self.output_dim = dim

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = self.backbone(images)
        last = out["last"]
        if out["stages"][self.window_index] is None:  # a torchvision trunk's frozen-block cache skips it
            raise TBPSError(f"method.window_stage={self.window_index}: that stage ends inside the cached "
                            "frozen blocks (model.image_frozen_cache); freeze fewer blocks or use a later stage")
        window_map = self.window_norm(out["stages"][self.window_index].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        regions, windows = _stripes_and_windows(last, window_map, self.num_regions, self.window_grid)
        global_feat = self.global_proj(last.mean(dim=(2, 3)))
        parts = [global_feat[:, None], self.window_proj(windows)]
        if self.region_proj is not None:
            parts.insert(1, self.region_proj(regions))
        return {"global": global_feat, "scales": torch.cat(parts, dim=1)}


class ClipViTScales(ActivationMixin, nn.Module):
    """CLIP ViT (tbps's ClipImageEncoder) with windows from an intermediate layer's patch tokens.

    global = the projected CLS token; regions = stripes of the projected last-layer patch grid (in
    the joint space already); windows = cells of layer ``clip_window_layer``'s patch grid, LayerNorm
    + a new Linear from the ViT width.
    """

    def __init__(self, encoder: nn.Module, options: ACSAOptions) -> None:
        super().__init__()
        self.backbone = encoder.backbone  # the open_clip VisionTransformer, as in ClipImageEncoder
        self._init_activation(bool(encoder.quick_gelu.item()))  # QuickGELU or GELU, kept in checkpoints
        blocks = len(self.backbone.transformer.resblocks)
        layer = options.clip_window_layer or max(1, round(2 * blocks / 3))
        if not 1 <= layer <= blocks:
            raise TBPSError(f"method.clip_window_layer={layer}: the ViT has {blocks} layers")
        self.window_layer = layer
        self.spatial_regions = options.regions == "spatial"
        self.grid = tuple(encoder.grid_size)
        self.image_size = tuple(encoder.image_size)
        self.num_regions, self.window_grid = options.num_regions, list(options.window_grid)
        width = int(self.backbone.transformer.width)
        dim = int(encoder.output_dim)
        self.window_norm = nn.LayerNorm(width)
        self.window_proj = nn.Linear(width, dim)
        self.output_dim = dim

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"image encoder built for {self.image_size[0]}x{self.image_size[1]} "
                             f"input, got {images.shape[-2]}x{images.shape[-1]}")
        vit = self.backbone
        x = vit.conv1(images.to(vit.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = vit.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = vit.ln_pre(torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype))
        hidden = None
        for i, block in enumerate(vit.transformer.resblocks, start=1):
            x = block(x)
            if i == self.window_layer:
                hidden = x
        tokens = vit.ln_post(x) @ vit.proj
        h, w = self.grid

        def as_map(t: Tensor) -> Tensor:
            return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)

        window_tokens = self.window_norm(hidden)
        regions, windows = _stripes_and_windows(as_map(tokens), as_map(window_tokens), self.num_regions,
                                                self.window_grid)
        global_feat = tokens[:, 0]
        parts = [global_feat[:, None], regions, self.window_proj(windows)] if self.spatial_regions \
            else [global_feat[:, None], self.window_proj(windows)]
        return {"global": global_feat, "scales": torch.cat(parts, dim=1)}


def _build_image_scales(cfg: Config, options: ACSAOptions, load_pretrained: bool) -> nn.Module:
    arch = cfg.model.image_backbone
    if arch.startswith("swin"):
        from tbps.models.backbones.swin import build_swin

        weights = cfg.model.pretrained if load_pretrained else ""
        backbone = build_swin(arch, cfg.data.image_size, weights, options.swin_embed_dim, options.swin_depths,
                              options.swin_heads, options.swin_window, options.drop_path)
        return SwinScales(backbone, int(cfg.model.embed_dim), options)
    from tbps.models.backbones import ClipImageEncoder, build_image_encoder, is_torchvision_backbone

    if is_torchvision_backbone(arch):  # a CNN's stage maps serve as Swin's do
        from tbps.models.backbones.torchvision_encoder import TrunkStages, trunk_from_config

        return SwinScales(TrunkStages(trunk_from_config(cfg.model, load_pretrained)), int(cfg.model.embed_dim),
                          options)
    encoder = build_image_encoder(cfg.model, tuple(cfg.data.image_size), load_pretrained)
    if not isinstance(encoder, ClipImageEncoder):
        raise TBPSError(f"model.image_backbone={arch!r}: ACSA needs a Swin (swin_*) or a CLIP ViT, "
                        f"an encoder with intermediate feature maps")
    return ClipViTScales(encoder, options)


class ChannelRegions(nn.Module):
    """The authors' regions (``regions: channel``): four views of the global vector's channels.

    ``x`` (B, D) -> ``r = ReLU(x + BN(W2 ReLU(BN(W1 x))))`` (their ``BasicBlock`` on a 1x1 map, where
    a padded 3x3 convolution is a bias-free Linear), cut into six chunks c1..c6 (channel bounds
    ``floor(k D / 6)``: D/6 each when 6 divides D, as their 768); head = (c1, c2), upper body =
    (c2, c3), lower body = (c4, c5), feet = c6, each through its own Linear + ReLU + Dropout(0.5)
    back to D. Returns (B, 4, D).
    """

    SLICES = ((0, 2), (1, 3), (3, 5), (5, 6))  # chunk ranges of head, upper, lower, feet

    def __init__(self, dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        if dim < 6:
            raise TBPSError(f"method.regions=channel cuts the global feature into 6 chunks: model.embed_dim={dim} "
                            f"is too small")
        bounds = [k * dim // 6 for k in range(7)]
        self.spans = [(bounds[a], bounds[b]) for a, b in self.SLICES]
        self.block = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(),
                                   nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(end - start, dim), nn.ReLU(), nn.Dropout(dropout))
                                   for start, end in self.spans)

    def forward(self, x: Tensor) -> Tensor:
        r = F.relu(x + self.block(x))
        return torch.stack([head(r[:, start:end]) for head, (start, end) in zip(self.heads, self.spans)], dim=1)


# ----------------------------------------------------------------------------- the method

@METHODS.register("acsa")
class ACSA(TBPSModel):
    """Multi-scale image/text encoders, global CMPM + CMPC, and the asymmetric cross-attention."""

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__()
        from tbps.models.backbones import build_text_encoder

        self.options: ACSAOptions = build_dataclass(ACSAOptions, cfg.method, "method")
        self.loss_weights = parse_loss_weights(cfg.loss, ACSA_LOSSES, self.name)
        opts = self.options
        if not opts.cross_attention:
            self.loss_weights.pop("cross_scale", None)
            if not self.loss_weights:
                raise TBPSError("method.cross_attention=false leaves no loss: set loss.cmpm or loss.cmpc")
        from tbps.models.backbones import is_torchvision_backbone

        is_swin = cfg.model.image_backbone.startswith("swin") or is_torchvision_backbone(cfg.model.image_backbone)
        if is_swin and cfg.model.text_backbone != "hf":
            raise TBPSError("model.text_backbone: a Swin image encoder needs text_backbone=hf (a BERT-family "
                            "encoder; the CLIP text tower comes with a CLIP image tower)")
        self.image_encoder = _build_image_scales(cfg, opts, load_pretrained)
        self.text_encoder = build_text_encoder(cfg.model, tokenizer, load_pretrained)
        self.set_backbone_prefixes(cfg.model)
        dim = int(self.image_encoder.output_dim)
        if int(self.text_encoder.output_dim) != dim:
            raise TBPSError(f"model: image features are {dim}-d but text features "
                            f"{self.text_encoder.output_dim}-d; set model.embed_dim to {dim}")
        self.embed_dim = dim
        self.sot_id, self.eot_id, self.pad_id = int(tokenizer.sot_id), int(tokenizer.eot_id), int(tokenizer.pad_id)

        self.image_bottleneck = self.text_bottleneck = None
        if opts.bottleneck:
            self.image_bottleneck, self.text_bottleneck = nn.BatchNorm1d(dim), nn.BatchNorm1d(dim)
            for norm in (self.image_bottleneck, self.text_bottleneck):
                norm.bias.requires_grad_(False)  # a shift-free BN, as the authors' code

        self.classifier = None
        if "cmpc" in self.loss_weights:
            if num_classes < 1:
                raise TBPSError(f"the CMPC loss needs training identities, got num_classes={num_classes}")
            self.classifier = nn.Linear(dim, num_classes, bias=False)  # rows normalised inside cmpc_loss
            nn.init.xavier_uniform_(self.classifier.weight)

        self.phrases = None
        self.channel_regions = None
        if opts.cross_attention:
            self.phrases = PhraseExtractor(tokenizer, opts.max_phrases)
            if opts.regions == "channel":
                self.channel_regions = ChannelRegions(dim)
            self.image_query = nn.Linear(dim, dim)
            self.image_value = nn.Linear(dim, dim)
            self.text_key = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.text_value = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))

    # ------------------------------------------------------------------ features
    def encode_image(self, images: Tensor) -> Tensor:
        feats = self.image_encoder(images)["global"]
        return feats if self.image_bottleneck is None else self.image_bottleneck(feats)

    def encode_text(self, token_ids: Tensor) -> Tensor:
        feats = self.text_encoder(token_ids)["global"]
        return feats if self.text_bottleneck is None else self.text_bottleneck(feats)

    def phrase_features(self, token_ids: Tensor, text_out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, P, D) phrase features and (B, P) bool mask, by ``method.phrase_features``."""
        spans, valid = self.phrases.spans(token_ids)
        if self.options.phrase_features == "pool":
            tokens = text_out["tokens"]
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            inside = (positions >= spans[..., :1]) & (positions < spans[..., 1:2]) & valid[..., None]
            weights = inside.to(tokens.dtype)
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
            return weights @ tokens, valid
        rows, owners = self._phrase_rows(token_ids, spans, valid)
        encoded = self.text_encoder(rows)["global"]
        feats = encoded.new_zeros(*valid.shape, encoded.shape[-1])
        feats[owners] = encoded
        return feats, valid

    def _phrase_rows(self, token_ids: Tensor, spans: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``[start] phrase tokens [end] pad`` rows for every real phrase, and their (b, p) positions."""
        owners = valid.nonzero(as_tuple=True)
        starts, ends = spans[..., 0][owners], spans[..., 1][owners]
        length = int((ends - starts).max().item()) + 2 if starts.numel() else 3
        rows = token_ids.new_full((starts.numel(), length), self.pad_id)
        rows[:, 0] = self.sot_id
        source = token_ids[owners[0]]
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            rows[k, 1:1 + e - s] = source[k, s:e]
            rows[k, 1 + e - s] = self.eot_id
        return rows, owners

    def _image_side(self, images: Tensor) -> dict[str, Tensor]:
        out = self.image_encoder(images)
        if self.image_bottleneck is not None:
            out["global"] = self.image_bottleneck(out["global"])
        if self.phrases is not None:
            scales = out["scales"]
            if self.channel_regions is not None:  # after the global token, as the spatial regions
                regions = self.channel_regions(out["global"])
                scales = torch.cat([scales[:, :1], regions.to(scales.dtype), scales[:, 1:]], dim=1)
            if self.options.scale_global == "mean":  # the code: the mean of the region and window scales
                scales = torch.cat([scales[:, 1:].mean(dim=1, keepdim=True), scales[:, 1:]], dim=1)
            out["scale_query"] = self.image_query(scales)
            out["scale_value"] = self.image_value(scales)
        return out

    def _text_side(self, token_ids: Tensor) -> dict[str, Tensor]:
        out = self.text_encoder(token_ids)
        if self.text_bottleneck is not None:
            out["global"] = self.text_bottleneck(out["global"])
        if self.phrases is not None:
            phrases, valid = self.phrase_features(token_ids, out)
            out["phrase_key"] = self.text_key(phrases)
            out["phrase_value"] = self.text_value(phrases)
            out["phrase_mask"] = valid.to(phrases.dtype)
        return out

    # ------------------------------------------------------------------ retrieval
    def embed_images(self, images: Tensor) -> dict[str, Tensor]:
        out = self._image_side(images)
        feats = {"global": F.normalize(out["global"], dim=-1)}
        if self.phrases is not None:
            feats["scale_query"] = F.normalize(out["scale_query"], dim=-1)  # only used in cosines
            feats["scale_value"] = out["scale_value"]
        return feats

    def embed_texts(self, token_ids: Tensor) -> dict[str, Tensor]:
        out = self._text_side(token_ids)
        feats = {"global": F.normalize(out["global"], dim=-1)}
        if self.phrases is not None:
            feats["phrase_key"] = F.normalize(out["phrase_key"], dim=-1)
            feats["phrase_value"] = out["phrase_value"]
            feats["phrase_mask"] = out["phrase_mask"]
        return feats

    def cross_scale(self, text_feats: dict[str, Tensor], image_feats: dict[str, Tensor]) -> Tensor:
        """(Q, G) cross-scale scores, in blocks of at most ``method.score_block`` entries."""
        opts = self.options
        return blocked_cross_scale_similarity(text_feats, image_feats, opts.score_block,
                                              attn_lambda=opts.attn_lambda, leaky_slope=opts.leaky_slope,
                                              directions=opts.fuse_directions or opts.directions)

    def similarity(self, text_feats: dict[str, Tensor], image_feats: dict[str, Tensor]) -> Tensor:
        """``a * global cosine + (1 - a) * cross-scale`` on any subset of rows of either side."""
        a = self.options.fuse_weight
        global_sim = text_feats["global"] @ image_feats["global"].t()
        if self.phrases is None or a >= 1.0 or "phrase_key" not in text_feats or "scale_query" not in image_feats:
            return global_sim
        return a * global_sim + (1.0 - a) * self.cross_scale(text_feats, image_feats)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, token_ids, pids = batch["images"], batch["token_ids"], batch["pids"]
        weights, opts = self.loss_weights, self.options
        image_out = self._image_side(images)
        text_out = self._text_side(token_ids)
        image_feats, text_feats = image_out["global"], text_out["global"]
        out: dict[str, Tensor] = {}
        if "cmpm" in weights:
            cmpm = cmpm_loss(image_feats, text_feats, pids, label_norm=opts.cmpm_label_norm)
            active = (cmpm.detach() >= opts.cmpm_gate).to(cmpm.dtype)  # the code's gate, without a host sync
            out["loss_cmpm"] = weights["cmpm"] * active * cmpm
            out["cmpm"] = cmpm.detach()
            out["cmpm_active"] = active
        if self.classifier is not None:
            out["loss_cmpc"] = weights["cmpc"] * cmpc_loss(image_feats, text_feats, pids, self.classifier.weight)
        if "cross_scale" in weights:
            inputs = (text_out["phrase_key"], text_out["phrase_value"], text_out["phrase_mask"],
                      image_out["scale_query"], image_out["scale_value"])
            kwargs = {"attn_lambda": opts.attn_lambda, "leaky_slope": opts.leaky_slope}
            if opts.cross_loss == "image_rows" and opts.directions == "both":
                i2t = cross_scale_similarity(*inputs, directions="i2t", **kwargs)
                t2i = cross_scale_similarity(*inputs, directions="t2i", **kwargs)
                similarity = (i2t + t2i) / 2
                loss = cross_scale_image_rows_loss(i2t, t2i, pids, opts.cross_logit_scale, opts.cmpm_label_norm)
            else:
                similarity = cross_scale_similarity(*inputs, directions=opts.directions, **kwargs)
                loss = cross_scale_loss(similarity, pids, opts.cross_logit_scale, label_norm=opts.cmpm_label_norm)
            out["loss_cross_scale"] = weights["cross_scale"] * loss
            with torch.no_grad():
                same = pids[:, None] == pids[None, :]
                out["cross_pos"] = similarity[same].mean()
                out["cross_neg"] = similarity[~same].mean() if (~same).any() else similarity.new_zeros(())
        with torch.no_grad():
            out["phrases_per_caption"] = text_out["phrase_mask"].sum(dim=1).mean() if "phrase_mask" in text_out \
                else image_feats.new_zeros(())
        return out
