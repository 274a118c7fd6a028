"""PCC: part-level cross-modal correspondence (Park, Jeong, Kim & Kwak, "Improving Text-based Person
Search via Part-level Cross-modal Correspondence", ACCV 2024, arXiv:2501.00318).

Three levels of embeddings per image and per caption, all in one joint width D:

- **global**: a ResNet feature map (torchvision, ``models/backbones/resnet.py``) or, the paper's second
  backbone, a CLIP ViT's patch-token grid (``model.image_backbone: ViT-B-16``; 24x8 at 384x128), and
  BERT token features (transformers; the offline MiniLM for tests and SynthPEDES) or, with a CLIP
  ViT, CLIP's text tower (``model.text_backbone: clip``); each projected to D and **globally
  max-pooled** (the paper's pooling; the caption's max runs over its real tokens only).
- **coarse**: an encoder-decoder shared by both modalities. The encoder (pre-LN transformer
  layers) refines the backbone tokens of either modality; the decoder lets K learnable **part
  tokens, the same K for images and captions**, self-attend and cross-attend to them. Part token k
  therefore has to find "the same thing" in a picture and in a sentence, without part labels: the
  K outputs are the coarse embeddings ``(B, K, D)``.
- **fine**: image: the projected feature map cut into K **horizontal stripes** (rows
  ``[floor(k h / K), floor((k+1) h / K))``: a partition of the map, PCB-style), each max-pooled.
  Caption: the same decoder run with a **second set of K learnable text tokens** that learn to
  gather, from the words, what stripe k shows.

Losses (``cfg.loss`` weights ``id``, ``rank``, ``cmr``; the paper's split): global and coarse get an
ID loss (one identity classifier per level, shared by both modalities and, for parts, by the K
parts; ``method.part_classifier=per_part`` gives each part its own, as PCB) and a ranking loss (``tbps.losses.pcc.ranking_loss``: hardest-negative, both directions; the
coarse similarity is the mean of the K part cosines); fine gets an ID loss and **CMR**.

CMR, commonality-based margin ranking: the paper's exact formula is not in our sources (we
searched the stored web pages, documentation, code and issue threads for the paper's text and code:
only the abstract and third-party summaries of arXiv:2501.00318 came back, no method section and no
implementation; the abstract says the loss "quantifies the degree of commonality of each body part
and reflects it during the learning of fine-grained body part details").
We implement the interpretation documented in ``docs/methods.md`` (``tbps.losses.pcc.cmr_loss``)::

    S^k_ij = cos(v_i^k, t_j^k)                              fine image part k vs caption part k
    c_k    = clamp(mean_{y_i != y_j} S^k_ij, 0, 1)          commonality of part k (no gradient)
    m_k    = m0 * (1 - c_k)                                 a common part gets a smaller margin
    L_CMR  = 1/K sum_k ranking_loss(S^k, y, m_k)

Which reading the recipes use, and why (this is the one place that says so): every recipe
(``pcc_base.yaml`` and the files built on it) uses ``cmr_commonality: batch``, the reading written
in ``methods.md``, because it is the one a reader of the abstract would write down and the one the
tests pin to a formula; ``pair`` (below) stays an option, and ``cmr_adaptive: false`` the fixed-margin
baseline, so both readings can be measured against it (benchmarks/README.md, PCC rows).

Why: identity labels say two people differ, not which of their parts differ; a fixed margin pushes
apart even the parts they share (both in jeans), which fights the data. ``method.cmr_adaptive=false``
gives the fixed-margin ranking loss (m_k = m0) for the comparison.

``method.cmr_commonality=pair`` is our second reading, measured beside the first: with a BatchNorm on
every embedding the batch mean above sits near 0 (logged as ``cmr_margin_*``: 0.19-0.20 for m0 = 0.2
on SynthPEDES), so the batch version is in effect a fixed margin. The pair version asks whether *these
two* people share part k, within each modality, and shrinks only their negative pair's margin::

    c^k_ab = (cos(v_a^k, v_b^k) + cos(t_a^k, t_b^k)) / 2     (images' stripe k, captions' part k)
    M^k_ab = m0 * (1 - clamp(c^k_ab, 0, 1))                  margin of negative pair (image a, caption b)

Retrieval: ``embed_*`` return ``global`` ``(B, D)`` and, for the branches with a positive
inference weight, ``coarse`` / ``fine`` ``(B, K, D)``, all L2-normalised per vector;
``similarity`` = sum_l w_l s_l / sum_l w_l with s_global the cosine and s_coarse / s_fine the mean
part cosine (``method.inference_weights``; default: every trained branch, weight 1). The global
cosine alone stays the first-stage shortlist.

``part_attention`` returns the decoder's last cross-attention maps (which stripes, which words each
part token attends to); ``python -m tbps.models.pcc_attention`` draws them.

Choices that are ours (the paper's text being unavailable): encoder 1 layer, decoder 2 layers,
K = 6 at 384x128 with ResNet last stride 1 (24x8 map, 4 rows a stripe), margins 0.2, stripes
max-pooled like the global embedding, encoder and decoder weights shared across modalities ("an
efficient encoder-decoder"), learned position embeddings on the image grid, and a BatchNorm1d on
every embedding (per level and modality; PCB's BN after its stripe reduction, BNNeck in re-id):
without it our first SynthPEDES run collapsed (every hinge at the margin, ID at chance, R1 1%).
``method.rank_negatives=all`` averages the hinge over every negative instead of the hardest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.config import Config, build_dataclass
from tbps.errors import TBPSError
from tbps.losses import id_loss
from tbps.losses.pcc import (CMR_COMMONALITY, cmr_loss, cmr_margins, cmr_pair_margins, part_similarities,
                             ranking_loss)
from tbps.models import METHODS
from tbps.models.base import TBPSModel, parse_loss_weights
from tbps.models.backbones.resnet import RESNET_NAMES, build_resnet, resnet_grid

PCC_LOSSES = ("id", "rank", "cmr")
BRANCHES = ("global", "coarse", "fine")


@dataclass
class PCCOptions:
    """``cfg.method`` keys of PCC (see the module docstring for which defaults are ours)."""

    num_parts: int = 6  # K: part tokens, image stripes and caption part tokens
    encoder_layers: int = 1  # pre-LN transformer layers over backbone tokens (shared by both modalities)
    decoder_layers: int = 2  # decoder layers: part-token self-attention + cross-attention + MLP
    heads: int = 0  # attention heads of encoder/decoder; 0 = D // 64, at least 1
    last_stride: int = 1  # ResNet layer4 stride: 1 doubles the map (24x8 at 384x128), 2 keeps torchvision's
    stripe_pooling: str = "max"  # pooling inside a stripe: "max" (as the global embedding) or "avg"
    rank_margin: float = 0.2  # margin of the ranking loss on global and coarse embeddings
    cmr_margin: float = 0.2  # m0 of CMR
    cmr_adaptive: bool = True  # false: a fixed-margin ranking loss on fine parts (the ablation)
    cmr_commonality: str = "batch"  # "batch": one margin a part (methods.md); "pair": a part and negative pair
    rank_negatives: str = "hardest"  # ranking and CMR against the "hardest" negative or the mean over "all"
    embedding_norm: str = "bn"  # "bn": BatchNorm1d on every embedding (PCB / BNNeck habit); "none"
    part_classifier: str = "shared"  # ID classifier of the part levels: one "shared" by the K parts, or "per_part" (PCB)
    coarse: bool = True  # build and train the coarse branch (false: the "without coarse" ablation)
    fine: bool = True  # build and train the fine branch (false: the "without fine" ablation)
    inference_weights: dict[str, float] = field(default_factory=dict)  # {global, coarse, fine}; unset = 1 if trained

    def __post_init__(self) -> None:
        for name in ("num_parts", "decoder_layers"):
            if getattr(self, name) < 1:
                raise TBPSError(f"method.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_layers", "heads"):
            if getattr(self, name) < 0:
                raise TBPSError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if self.last_stride not in (1, 2):
            raise TBPSError(f"method.last_stride must be 1 or 2, got {self.last_stride}")
        if self.embedding_norm not in ("bn", "none"):
            raise TBPSError(f"method.embedding_norm={self.embedding_norm!r}: choose bn or none")
        if self.rank_negatives not in ("hardest", "all"):
            raise TBPSError(f"method.rank_negatives={self.rank_negatives!r}: choose hardest or all")
        if self.cmr_commonality not in CMR_COMMONALITY:
            raise TBPSError(f"method.cmr_commonality={self.cmr_commonality!r}: choose {' or '.join(CMR_COMMONALITY)}")
        if self.part_classifier not in ("shared", "per_part"):
            raise TBPSError(f"method.part_classifier={self.part_classifier!r}: choose shared or per_part")
        if self.stripe_pooling not in ("max", "avg"):
            raise TBPSError(f"method.stripe_pooling={self.stripe_pooling!r}: choose max or avg")
        if self.rank_margin < 0 or self.cmr_margin < 0:
            raise TBPSError(f"method.rank_margin / cmr_margin must be >= 0, got {self.rank_margin} / {self.cmr_margin}")
        unknown = sorted(set(self.inference_weights) - set(BRANCHES))
        if unknown:
            raise TBPSError(f"method.inference_weights.{unknown[0]}: unknown branch (known: {', '.join(BRANCHES)})")
        weights = {k: float(v) for k, v in self.inference_weights.items()}
        if any(v < 0 for v in weights.values()):
            raise TBPSError(f"method.inference_weights: weights must be >= 0, got {weights}")
        for branch in ("coarse", "fine"):
            if weights.get(branch, 0) > 0 and not getattr(self, branch):
                raise TBPSError(f"method.inference_weights.{branch}={weights[branch]}: the {branch} branch "
                                f"is off (method.{branch}=false)")
        self.inference_weights = weights

    def resolved_inference_weights(self) -> dict[str, float]:
        """Weights of the retrieval score: 1 for global and every trained branch, unless given."""
        weights = {"global": 1.0, "coarse": float(self.coarse), "fine": float(self.fine)}
        weights.update(self.inference_weights)
        if sum(weights.values()) <= 0:
            raise TBPSError("method.inference_weights: at least one weight must be > 0")
        return weights


def stripe_bounds(rows: int, num_parts: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of K horizontal stripes that partition ``rows`` rows.

    ``start_k = floor(k rows / K)``: contiguous, disjoint, covering, and as equal as the rows allow.
    """
    if rows < num_parts:
        raise TBPSError(f"method.num_parts={num_parts}: the image feature map has only {rows} rows "
                        f"(fewer parts, a taller image or method.last_stride=1)")
    return [(k * rows // num_parts, (k + 1) * rows // num_parts) for k in range(num_parts)]


def pool_stripes(feature_map: Tensor, num_parts: int, pooling: str = "max") -> Tensor:
    """``(B, C, h, w)`` -> ``(B, K, C)``: each horizontal stripe pooled over its rows and columns."""
    parts = []
    for start, end in stripe_bounds(feature_map.shape[2], num_parts):
        stripe = feature_map[:, :, start:end, :].flatten(2)
        parts.append(stripe.amax(dim=2) if pooling == "max" else stripe.mean(dim=2))
    return torch.stack(parts, dim=1)


def masked_max(tokens: Tensor, mask: Tensor) -> Tensor:
    """Max over the real tokens: ``(B, L, D)``, ``(B, L)`` bool -> ``(B, D)``."""
    lowest = torch.finfo(tokens.dtype).min
    return tokens.masked_fill(~mask.unsqueeze(-1), lowest).amax(dim=1)


class PartClassifier(nn.Module):
    """K identity classifiers, one per part, applied in one batched product: ``(B, K, D) -> (B, K, C)``.

    PCB's habit: each stripe has to identify the person on its own, with its own class weights (a
    head stripe and a shoe stripe need not map a person to the same vector).
    """

    def __init__(self, parts: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(parts, num_classes, dim) * 0.001)
        self.bias = nn.Parameter(torch.zeros(parts, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bkd,kcd->bkc", x, self.weight) + self.bias


class PartDecoderLayer(nn.Module):
    """Pre-LN decoder layer: part tokens self-attend, cross-attend to the memory, then an MLP.

    Written out (not ``nn.TransformerDecoderLayer``) to return the cross-attention map, which the
    visualisation needs.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: Tensor, memory: Tensor, memory_padding: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.ln_self(queries)
        x = queries + self.self_attn(h, h, h, need_weights=False)[0]
        attended, weights = self.cross_attn(self.ln_cross(x), memory, memory, key_padding_mask=memory_padding,
                                            need_weights=need_weights, average_attn_weights=True)
        x = x + attended
        return x + self.mlp(self.ln_mlp(x)), weights


class PartEncoderDecoder(nn.Module):
    """The modality-shared encoder-decoder: backbone tokens in, one embedding per query token out."""

    def __init__(self, dim: int, heads: int, encoder_layers: int, decoder_layers: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(encoder_layers)
        )
        self.ln_memory = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(PartDecoderLayer(dim, heads) for _ in range(decoder_layers))
        self.ln_out = nn.LayerNorm(dim)

    def encode(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        for layer in self.encoder:
            tokens = layer(tokens, src_key_padding_mask=padding)
        return self.ln_memory(tokens)

    def decode(self, queries: Tensor, memory: Tensor, padding: Tensor | None = None,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``queries`` (K, D) shared by the batch; returns ``(B, K, D)`` and the last cross-attention."""
        x = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        weights = None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            x, w = layer(x, memory, padding, need_weights=need_weights and i == last)
            weights = w if w is not None else weights
        return self.ln_out(x), weights


@METHODS.register("pcc")
class PCC(TBPSModel):
    """ResNet + BERT dual encoder with global, coarse (shared part tokens) and fine (stripes) levels."""

    classifier_keys = ("classifier_global.", "classifier_coarse.", "classifier_fine.")

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__()
        opts = self.options = build_dataclass(PCCOptions, cfg.method, "method")
        self.loss_weights = parse_loss_weights(cfg.loss, PCC_LOSSES, self.name)
        if "cmr" in self.loss_weights and not opts.fine:
            raise TBPSError("loss.cmr: CMR trains the fine branch, which is off (method.fine=false); set loss.cmr=0")
        self.inference_weights = opts.resolved_inference_weights()
        model_cfg = cfg.model
        from tbps.models.backbones import ClipImageEncoder, build_image_encoder, build_text_encoder

        cnn_names = (*RESNET_NAMES, "mobilenet_v2")
        self.vit = model_cfg.image_backbone not in cnn_names
        if self.vit:  # the paper's second backbone: a CLIP ViT's patch grid as the feature map
            encoder = build_image_encoder(model_cfg, tuple(cfg.data.image_size), load_pretrained)
            if not isinstance(encoder, ClipImageEncoder):
                raise TBPSError(f"model.image_backbone={model_cfg.image_backbone!r}: PCC uses a torchvision "
                                f"CNN ({', '.join(cnn_names)}) or a CLIP ViT (e.g. ViT-B-16)")
            self.image_encoder, channels, self.grid = encoder, int(encoder.output_dim), tuple(encoder.grid_size)
        else:
            if model_cfg.image_backbone in RESNET_NAMES and not model_cfg.image_frozen_layers:
                self.image_encoder = build_resnet(model_cfg.image_backbone,
                                                  model_cfg.pretrained if load_pretrained else "", opts.last_stride)
            else:  # MobileNetV2 or frozen blocks: the trunk of models/backbones/torchvision_encoder.py (same map)
                from tbps.models.backbones.torchvision_encoder import trunk_from_config

                self.image_encoder = trunk_from_config(model_cfg, load_pretrained, opts.last_stride)
            channels, self.grid = self.image_encoder.out_channels, resnet_grid(cfg.data.image_size, opts.last_stride)
        if model_cfg.text_backbone != "hf" and not (self.vit and model_cfg.text_backbone == "clip"):
            raise TBPSError("model.text_backbone: PCC uses a BERT-family text encoder (text_backbone: hf), or "
                            "CLIP's text tower beside a CLIP ViT image encoder (text_backbone: clip)")
        self.text_encoder = build_text_encoder(model_cfg, tokenizer, load_pretrained)
        self.set_backbone_prefixes(model_cfg)
        dim = self.embed_dim = int(model_cfg.embed_dim)
        if int(getattr(self.text_encoder, "output_dim", dim)) != dim:
            raise TBPSError(f"model.embed_dim={dim}: CLIP's text tokens are {self.text_encoder.output_dim}-d; "
                            f"set model.embed_dim={self.text_encoder.output_dim}")
        heads = opts.heads or max(dim // 64, 1)
        if dim % heads:
            raise TBPSError(f"model.embed_dim={dim} is not divisible by method.heads={heads}")
        self.stripes = stripe_bounds(self.grid[0], opts.num_parts) if opts.fine else []
        self.image_proj = nn.Linear(channels, dim)

        self.part_model = None
        if opts.coarse or opts.fine:
            self.part_model = PartEncoderDecoder(dim, heads, opts.encoder_layers, opts.decoder_layers)
        self.part_tokens = self.image_pos = None  # coarse: part tokens shared by images and captions
        self.text_part_tokens = None  # fine: caption side of the stripes
        if opts.coarse:  # only the coarse branch runs images through the encoder-decoder
            self.part_tokens = nn.Parameter(torch.randn(opts.num_parts, dim) * 0.02)
            self.image_pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)
        if opts.fine:
            self.text_part_tokens = nn.Parameter(torch.randn(opts.num_parts, dim) * 0.02)

        self.necks = nn.ModuleDict()  # "<level>_<modality>": BatchNorm1d over the batch (and parts)
        if opts.embedding_norm == "bn":
            levels = ["global"] + [level for level in ("coarse", "fine") if getattr(opts, level)]
            for level in levels:
                for side in ("image", "text"):
                    self.necks[f"{level}_{side}"] = nn.BatchNorm1d(dim)

        self.classifier_global = self.classifier_coarse = self.classifier_fine = None
        if "id" in self.loss_weights:
            if num_classes < 1:
                raise TBPSError(f"the ID loss needs training identities, got num_classes={num_classes}")
            self.classifier_global = self._classifier(dim, num_classes)
            if opts.coarse:
                self.classifier_coarse = self._classifier(dim, num_classes, opts)
            if opts.fine:
                self.classifier_fine = self._classifier(dim, num_classes, opts)

    @staticmethod
    def _classifier(dim: int, num_classes: int, parts: PCCOptions | None = None) -> nn.Module:
        if parts is not None and parts.part_classifier == "per_part":
            return PartClassifier(parts.num_parts, dim, num_classes)
        layer = nn.Linear(dim, num_classes)
        nn.init.normal_(layer.weight, std=0.001)
        nn.init.zeros_(layer.bias)
        return layer

    # ------------------------------------------------------------------ features
    def _normalise(self, out: dict[str, Tensor], side: str) -> dict[str, Tensor]:
        """BatchNorm each embedding level (parts share their level's statistics).

        Why: without it the ranking losses from random weights settle in the collapsed state (every
        embedding alike, every hinge at the margin, zero gradient), as our first SynthPEDES run did;
        batch normalisation keeps the embeddings spread out, as PCB's BN after its stripe reduction
        and BNNeck in re-identification do.
        """
        for level in ("global", "coarse", "fine"):
            key = f"{level}_{side}"
            if level in out and key in self.necks:
                x = out[level]
                out[level] = self.necks[key](x.flatten(0, -2)).reshape(x.shape)
        return out

    def image_features(self, images: Tensor, need_weights: bool = False) -> dict[str, Tensor]:
        """``global`` (B, D), ``coarse``/``fine`` (B, K, D) (not normalised), ``map`` (B, D, h, w)."""
        if self.vit:  # patch tokens (CLS dropped) laid out as the (rows, cols) grid, row-major
            patches = self.image_encoder(images)["tokens"][:, 1:]
            batch, (rows, cols) = patches.shape[0], self.grid
            tokens = self.image_proj(patches)
        else:
            feature_map = self.image_encoder(images)
            tokens = self.image_proj(feature_map.flatten(2).transpose(1, 2))  # (B, h*w, D)
            batch, _, rows, cols = feature_map.shape
        out = {"global": tokens.amax(dim=1),
               "map": tokens.transpose(1, 2).reshape(batch, self.embed_dim, rows, cols)}
        if self.options.fine:
            out["fine"] = pool_stripes(out["map"], self.options.num_parts, self.options.stripe_pooling)
        if self.part_tokens is not None:
            if tokens.shape[1] != self.image_pos.shape[0]:
                raise TBPSError(f"images give a {rows}x{cols} feature map but the model was built for "
                                f"{self.grid[0]}x{self.grid[1]} (data.image_size)")
            memory = self.part_model.encode(tokens + self.image_pos)
            out["coarse"], attention = self.part_model.decode(self.part_tokens, memory, need_weights=need_weights)
            if need_weights:
                out["coarse_attention"] = attention.reshape(batch, -1, rows, cols)
        return self._normalise(out, "image")

    def text_features(self, token_ids: Tensor, need_weights: bool = False) -> dict[str, Tensor]:
        """``global`` (B, D), ``coarse``/``fine`` (B, K, D) (not normalised), ``mask`` (B, L)."""
        encoded = self.text_encoder(token_ids)
        tokens, mask = encoded["tokens"], encoded["mask"]
        out = {"global": masked_max(tokens, mask), "mask": mask}
        if self.part_model is not None:
            memory = self.part_model.encode(tokens, ~mask)
            if self.part_tokens is not None:
                out["coarse"], attention = self.part_model.decode(self.part_tokens, memory, ~mask, need_weights)
                if need_weights:
                    out["coarse_attention"] = attention
            if self.text_part_tokens is not None:
                out["fine"], attention = self.part_model.decode(self.text_part_tokens, memory, ~mask, need_weights)
                if need_weights:
                    out["fine_attention"] = attention
        return self._normalise(out, "text")

    @torch.no_grad()
    def part_attention(self, images: Tensor, token_ids: Tensor) -> dict[str, Tensor]:
        """What each part token looks at (last decoder layer, heads averaged), for the visualisation.

        ``image`` (B, K, h, w): coarse token k over the image map; ``text`` (B, K, L): coarse token k
        over the caption's tokens; ``fine_text`` (B, K, L): caption part token k (the one matched to
        stripe k) over the tokens; ``stripes``: the K row ranges of the map.
        """
        if self.part_tokens is None:
            raise TBPSError("part attention needs the coarse branch (this model was trained with method.coarse=false)")
        image_out = self.image_features(images, need_weights=True)
        text_out = self.text_features(token_ids, need_weights=True)
        out = {"image": image_out["coarse_attention"], "text": text_out["coarse_attention"],
               "mask": text_out["mask"], "stripes": torch.tensor(stripe_bounds(self.grid[0], self.options.num_parts))}
        if "fine_attention" in text_out:
            out["fine_text"] = text_out["fine_attention"]
        return out

    # ------------------------------------------------------------------ retrieval
    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_features(images)["global"]

    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self.text_features(token_ids)["global"]

    def _retrieval(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {"global": F.normalize(features["global"], dim=-1)}
        for branch in ("coarse", "fine"):
            if self.inference_weights[branch] > 0:
                out[branch] = F.normalize(features[branch], dim=-1)
        return out

    def embed_images(self, images: Tensor) -> dict[str, Tensor]:
        return self._retrieval(self.image_features(images))

    def embed_texts(self, token_ids: Tensor) -> dict[str, Tensor]:
        return self._retrieval(self.text_features(token_ids))

    def similarity(self, text_feats: dict[str, Tensor], image_feats: dict[str, Tensor]) -> Tensor:
        """``sum_l w_l s_l / sum_l w_l``; part levels score the mean cosine of matching parts.

        Works on any rows of either side: the part cosines are one matrix product of the flattened
        ``(rows, K*D)`` features, divided by K.
        """
        weights = self.inference_weights
        score = weights["global"] * (text_feats["global"] @ image_feats["global"].t())
        for branch in ("coarse", "fine"):
            if weights[branch] > 0:
                text, image = text_feats[branch], image_feats[branch]
                parts = text.shape[1]
                score = score + weights[branch] * (text.flatten(1) @ image.flatten(1).t()) / parts
        return score / sum(weights.values())

    # ------------------------------------------------------------------ training
    def _id(self, classifier: nn.Module, image: Tensor, text: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
        """ID loss of (B, D) or (B, K, D) features (parts: one shared classifier, or one each) and
        the image side's accuracy."""
        image_logits, text_logits = classifier(image.float()), classifier(text.float())
        if image_logits.dim() == 3:  # (B, K, C): every part classifies its person
            parts = image_logits.shape[1]
            image_logits, text_logits = image_logits.flatten(0, 1), text_logits.flatten(0, 1)
            pids = pids.repeat_interleave(parts)
        with torch.no_grad():
            accuracy = (image_logits.argmax(dim=1) == pids).float().mean()
        return id_loss(image_logits, text_logits, pids), accuracy

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pids = batch["pids"]
        weights, opts = self.loss_weights, self.options
        image_out = self.image_features(batch["images"])
        text_out = self.text_features(batch["token_ids"])
        out: dict[str, Tensor] = {}

        levels = [("global", self.classifier_global)]
        if opts.coarse:
            levels.append(("coarse", self.classifier_coarse))
        for level, classifier in levels:
            image, text = image_out[level], text_out[level]
            if "rank" in weights:
                if image.dim() == 3:
                    similarity = part_similarities(image, text).mean(dim=0)
                else:
                    similarity = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()
                out[f"loss_rank_{level}"] = weights["rank"] * ranking_loss(similarity, pids, opts.rank_margin,
                                                                           opts.rank_negatives)
            if classifier is not None:
                loss, accuracy = self._id(classifier, image, text, pids)
                out[f"loss_id_{level}"] = weights["id"] * loss
                out[f"acc_id_{level}"] = accuracy

        if opts.fine:
            image, text = image_out["fine"], text_out["fine"]
            if self.classifier_fine is not None:
                loss, accuracy = self._id(self.classifier_fine, image, text, pids)
                out["loss_id_fine"] = weights["id"] * loss
                out["acc_id_fine"] = accuracy
            if "cmr" in weights:
                out["loss_cmr"] = weights["cmr"] * cmr_loss(image, text, pids, opts.cmr_margin, opts.cmr_adaptive,
                                                             opts.rank_negatives, opts.cmr_commonality)
                if opts.cmr_adaptive:
                    out.update(self._margin_stats(image, text, pids))
        return out

    def _margin_stats(self, image: Tensor, text: Tensor, pids: Tensor) -> dict[str, Tensor]:
        """The CMR margins this batch used (min / mean / max over parts and negative pairs), for the log:
        how far commonality moved them from m0."""
        opts = self.options
        if opts.cmr_commonality == "batch":
            margins = cmr_margins(part_similarities(image.detach(), text.detach()), pids, opts.cmr_margin)
        else:
            negative = pids.unsqueeze(0) != pids.unsqueeze(1)
            margins = cmr_pair_margins(image, text, opts.cmr_margin)[:, negative]
            if margins.numel() == 0:
                return {}
        return {"cmr_margin_min": margins.min(), "cmr_margin_mean": margins.mean(), "cmr_margin_max": margins.max()}
