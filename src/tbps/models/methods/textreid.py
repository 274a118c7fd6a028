"""TextReID: text-based person search with limited data (Han, He, Song, Xiang; BMVC 2021).

A dual encoder with cross-modal momentum contrast:

- Image: a CLIP ModifiedResNet-50/101 (``model.image_backbone``, OpenAI weights in
  ``model.pretrained``) with the last stage's stride set to 1 (``model.resnet_last_stride: 1``) and
  the attention pool's position embedding resized to the feature map (24x8 at 384x128), all done by
  ``tbps.models.backbones``; its attention-pool output is projected to ``model.embed_dim`` (256).
- Text: a bidirectional GRU (``method.gru_hidden`` 512 per direction, no biases, as the authors'
  code) over frozen word embeddings, max-pooled over the caption's real tokens (start to end
  token; the authors' code also pools over the zero padding of the batch), projected to 256.
  The frozen embeddings follow ``model.text_backbone``: ``clip`` takes ``method.word_embeddings``
  when set, else the ``token_embedding`` of the CLIP file in ``model.pretrained`` (a random frozen
  table when there is neither, for the tiny CPU tests). The authors' table is CLIP ViT's even with
  RN50/RN101 images: their ``clip_vocab_vit.npy`` (or any CLIP ViT weights file) goes in
  ``method.word_embeddings``; ``hf`` takes the input word embeddings of ``model.text_pretrained``
  (e.g. the MiniLM that ships offline, tokenizer ``minilm``): our choice for SynthPEDES, where no
  CLIP text weights exist offline.
- Losses (``cfg.loss``, each weight 1 in the paper):
  ``instance``: the instance loss, one identity projection with normalised columns shared by
  both modalities, label-smoothed CE (``tbps.losses.textreid.instance_loss``);
  ``align``: the global alignment loss (``global_align_loss``);
  ``moco``: cross-modal momentum contrast. Momentum copies of the image encoder and of the GRU
  (m = 0.999, ``requires_grad=False``, so the optimiser never sees them) encode keys; two queues
  (``method.queue_size`` 2048) hold earlier image and text keys with their person ids; image
  queries are contrasted with their paired text key against the text queue and the reverse
  (``queue_infonce_loss``, T = 0.07), same-identity queue entries removed from the negatives.
  As in the authors' code the key path reuses the online 256-d projections (under no_grad);
  unlike it, each query masks only its own identity (the code drops every entry matching any
  identity of the batch) and slots not filled yet are never negatives (the code starts from
  random vectors). ``loss.moco=0`` is the paper's baseline: no momentum encoders, no queues.
- Queues, their ids and the write pointer are registered buffers: they travel in the
  checkpoint's ``model`` state dict, so ``--resume`` continues with the same queue. Under DDP the
  keys and ids of every rank are gathered before they are enqueued, so every rank holds the same
  queue (ranks must have equal batch sizes, which the identity sampler guarantees).

Inference uses the online encoders' normalised 256-d global features only (the base class's
``embed_*``/``similarity``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tbps.config import Config, build_dataclass
from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError
from tbps.losses.textreid import global_align_loss, instance_loss, queue_infonce_loss
from tbps.models import METHODS
from tbps.models.base import TBPSModel, parse_loss_weights

TEXTREID_LOSSES = ("instance", "align", "moco")
_MAX_ADDED_TOKENS = 16  # the tokenizer may add a few ids (a mask token) beyond the table


@dataclass
class TextReIDOptions:
    """``cfg.method`` keys of TextReID; defaults are the paper's (methods.md) or its code's."""

    gru_hidden: int = 512  # GRU hidden size per direction
    gru_layers: int = 1  # stacked bidirectional GRU layers
    momentum: float = 0.999  # key encoders: k <- m k + (1 - m) q, once per training step
    queue_size: int = 2048  # keys per modality; keep it well below the training pairs on small data
    temperature: float = 0.07  # InfoNCE temperature of the momentum contrast
    id_smoothing: float = 0.1  # label smoothing of the instance loss
    align_alpha: float = 0.6  # global alignment: positive margin
    align_beta: float = 0.4  # global alignment: negative margin
    align_scale_pos: float = 10.0
    align_scale_neg: float = 40.0
    # frozen word table: a .npy (TextReID's clip_vocab_vit.npy) or CLIP weights; "" = model.pretrained's
    word_embeddings: str = ""

    def __post_init__(self) -> None:
        if self.gru_hidden < 1 or self.gru_layers < 1:
            raise TBPSError(f"method.gru_hidden ({self.gru_hidden}) and method.gru_layers "
                            f"({self.gru_layers}) must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise TBPSError(f"method.momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 1:
            raise TBPSError(f"method.queue_size must be >= 1, got {self.queue_size}")
        if self.temperature <= 0:
            raise TBPSError(f"method.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.id_smoothing < 1.0:
            raise TBPSError(f"method.id_smoothing must be in [0, 1), got {self.id_smoothing}")
        if self.align_scale_pos <= 0 or self.align_scale_neg <= 0:
            raise TBPSError("method.align_scale_pos and method.align_scale_neg must be > 0")


class BiGRUTextEncoder(nn.Module):
    """Bidirectional GRU over (frozen) word embeddings, max-pooled over each caption's real tokens.

    Packed sequences make the backward direction start at the caption's end token, not in padding.
    """

    def __init__(self, input_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden, num_layers=layers, bias=False, batch_first=True,
                          bidirectional=True)
        self.output_dim = 2 * hidden

    def forward(self, embedded: Tensor, valid: Tensor) -> Tensor:
        """``embedded`` (B, L, E), ``valid`` (B, L) bool prefix mask -> (B, 2 * hidden)."""
        lengths = valid.sum(dim=1).clamp(min=1).cpu()  # pack_padded_sequence wants them on the CPU
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.gru(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, padding_value=float("-inf"),
                                        total_length=embedded.shape[1])
        return output.max(dim=1).values


def read_word_table(path: str) -> Tensor:
    """TextReID's frozen word table from ``path``: a ``.npy`` array (their ``clip_vocab_vit.npy``,
    one row per CLIP token) or a CLIP weights file, whose ``token_embedding.weight`` is taken."""
    from tbps.models.backbones import read_clip_weights
    from tbps.safe_load import load_npy

    if str(path).endswith(".npy"):
        array = load_npy(path, "word-embedding table")
        if array.ndim != 2 or array.dtype.kind != "f":
            raise TBPSError(f"{path}: a word-embedding table must be a 2-D float array (tokens x width), "
                            f"got shape {list(array.shape)} of {array.dtype}")
        return torch.from_numpy(array.astype("float32"))
    state, _ = read_clip_weights(path)
    table = state.get("token_embedding.weight")
    if table is None or table.ndim != 2:
        raise TBPSError(f"{path}: no CLIP text token embedding ('token_embedding.weight') in this file; "
                        f"method.word_embeddings needs a .npy table or CLIP weights")
    return table.float()


def _word_embedding_table(cfg: Config, tokenizer, load_pretrained: bool,
                          clip_weights: tuple[dict[str, Tensor], dict] | None, word_file: str = "") -> Tensor:
    """The frozen word-embedding table (rows = the tokenizer's vocabulary), by ``model.text_backbone``."""
    from tbps.models import backbones as B

    kind = cfg.model.text_backbone
    vocab = int(tokenizer.vocab_size)
    if kind == "clip" and word_file and load_pretrained:
        table, source = read_word_table(word_file), word_file
    elif kind == "clip":
        width = int(B.get_arch_config(cfg.model.image_backbone)["text_cfg"]["width"])
        if word_file:  # a checkpoint is about to overwrite the table: only its width matters
            if str(word_file).endswith(".npy") and Path(word_file).is_file():
                import numpy as np

                shape = np.load(word_file, mmap_mode="r", allow_pickle=False).shape
                width = int(shape[1]) if len(shape) == 2 else width
            return torch.zeros(vocab, width)
        if clip_weights is None:  # no file (tiny CPU architectures), or a checkpoint will overwrite it
            return torch.randn(vocab, width) * 0.02
        table = clip_weights[0].get("token_embedding.weight")
        if table is None or table.ndim != 2:
            raise TBPSError(f"{clip_weights[1]['path']}: no CLIP text token embedding "
                            f"('token_embedding.weight') in this file; TextReID's GRU reads it")
        source = clip_weights[1]["path"]
    elif kind == "hf":
        encoder = B.build_hf_text(cfg.model, tokenizer, load_pretrained)  # resizes for added tokens
        table = encoder.backbone.get_input_embeddings().weight.detach().clone()
        source = cfg.model.text_pretrained
    else:
        raise TBPSError(f"model.text_backbone: expected 'clip' or 'hf', got {kind!r}")
    rows = table.shape[0]
    if vocab < rows or vocab > rows + _MAX_ADDED_TOKENS:
        raise TBPSError(f"data.tokenizer: {getattr(tokenizer, 'name', 'the tokenizer')!r} has {vocab} ids but "
                        f"{source} has {rows} word embeddings (use the tokenizer that matches model.text_backbone)")
    return B.resize_token_embedding(table.float(), vocab)


@METHODS.register("textreid")
class TextReID(TBPSModel):
    """CLIP ResNet + BiGRU dual encoder, 256-d projections, instance/alignment/momentum-contrast losses."""

    classifier_keys = ("id_projection",)

    def __init__(self, cfg: Config, num_classes: int, tokenizer, load_pretrained: bool = True) -> None:
        super().__init__()
        from tbps.models import backbones as B
        from tbps.models.backbones import build_image_encoder, read_clip_weights

        self.options: TextReIDOptions = build_dataclass(TextReIDOptions, cfg.method, "method")
        self.loss_weights = parse_loss_weights(cfg.loss, TEXTREID_LOSSES, self.name)
        opts = self.options
        dim = int(cfg.model.embed_dim)
        if dim < 1:
            raise TBPSError(f"model.embed_dim must be >= 1, got {dim}")
        self.embed_dim = dim
        clip_weights = None
        if load_pretrained and cfg.model.pretrained and not B.is_torchvision_backbone(cfg.model.image_backbone):
            clip_weights = read_clip_weights(cfg.model.pretrained)  # read once: image tower + token table
        self.image_encoder = build_image_encoder(cfg.model, tuple(cfg.data.image_size), load_pretrained,
                                                 _weights=clip_weights)
        table = _word_embedding_table(cfg, tokenizer, load_pretrained, clip_weights, opts.word_embeddings)
        self.word_embedding = nn.Embedding.from_pretrained(table, freeze=True)
        self.text_encoder = BiGRUTextEncoder(table.shape[1], opts.gru_hidden, opts.gru_layers)
        self.image_proj = nn.Linear(int(self.image_encoder.output_dim), dim)
        self.text_proj = nn.Linear(self.text_encoder.output_dim, dim)
        for layer in (self.image_proj, self.text_proj):  # the authors' initialisation
            nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_out")
            nn.init.zeros_(layer.bias)
        self.eot_id, self.pad_id = int(tokenizer.eot_id), int(tokenizer.pad_id)
        # only a pretrained image tower trains at optim.lr; GRU and projections are new modules
        self.backbone_prefixes = ("image_encoder.backbone.",) if cfg.model.pretrained else ()

        self.id_projection = None
        if "instance" in self.loss_weights:
            if num_classes < 1:
                raise TBPSError(f"the instance loss needs training identities, got num_classes={num_classes}")
            self.id_projection = nn.Parameter(torch.empty(dim, num_classes))
            nn.init.xavier_uniform_(self.id_projection)

        self.image_encoder_k = self.text_encoder_k = None
        if "moco" in self.loss_weights:
            self.image_encoder_k = copy.deepcopy(self.image_encoder)
            self.text_encoder_k = copy.deepcopy(self.text_encoder)
            for param in [*self.image_encoder_k.parameters(), *self.text_encoder_k.parameters()]:
                param.requires_grad_(False)
            size = opts.queue_size
            self.register_buffer("image_queue", torch.zeros(size, dim))
            self.register_buffer("text_queue", torch.zeros(size, dim))
            self.register_buffer("queue_pids", torch.full((size,), -1, dtype=torch.long))  # -1: empty
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ encoders
    def _text_global(self, encoder: BiGRUTextEncoder, token_ids: Tensor) -> Tensor:
        valid = caption_valid_mask(token_ids, self.eot_id, self.pad_id)
        valid[:, 0] = True
        return encoder(self.word_embedding(token_ids), valid)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_proj(self.image_encoder(images)["global"])

    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self.text_proj(self._text_global(self.text_encoder, token_ids))

    # ------------------------------------------------------------------ momentum contrast
    def key_encoder_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs whose parameters the momentum update ties together."""
        return [(self.image_encoder, self.image_encoder_k), (self.text_encoder, self.text_encoder_k)]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``k <- m k + (1 - m) q`` for every parameter of the key encoders (MoCo)."""
        m = self.options.momentum
        for online, key in self.key_encoder_pairs():
            for param_q, param_k in zip(online.parameters(), key.parameters(), strict=True):
                param_k.mul_(m).add_(param_q.detach(), alpha=1.0 - m)

    def on_step_end(self) -> None:
        """After every optimiser step (the trainer calls it), never in a forward pass: the key
        encoders follow the online ones, so this step's keys come from the encoders of the last."""
        if "moco" in self.loss_weights:
            self.momentum_update()

    @torch.no_grad()
    def encode_keys(self, images: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised image and text keys from the momentum encoders (and the online projections)."""
        image_keys = self.image_proj(self.image_encoder_k(images)["global"])
        text_keys = self.text_proj(self._text_global(self.text_encoder_k, token_ids))
        return F.normalize(image_keys.float(), dim=-1), F.normalize(text_keys.float(), dim=-1)

    @staticmethod
    def _gather(x: Tensor) -> Tensor:
        """Rows of every rank, in rank order (identity under one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def enqueue(self, image_keys: Tensor, text_keys: Tensor, pids: Tensor) -> None:
        """Write the keys (of all ranks) at the pointer, wrapping around; the oldest are overwritten."""
        image_keys, text_keys, pids = self._gather(image_keys), self._gather(text_keys), self._gather(pids)
        size = self.queue_pids.shape[0]
        if pids.shape[0] > size:  # more keys than slots: keep the newest
            image_keys, text_keys, pids = image_keys[-size:], text_keys[-size:], pids[-size:]
        count = pids.shape[0]
        index = (self.queue_ptr + torch.arange(count, device=pids.device)) % size
        self.image_queue.index_copy_(0, index, image_keys.to(self.image_queue.dtype))
        self.text_queue.index_copy_(0, index, text_keys.to(self.text_queue.dtype))
        self.queue_pids.index_copy_(0, index, pids.to(self.queue_pids.dtype))
        self.queue_ptr.copy_((self.queue_ptr + count) % size)

    def moco_loss(self, image_feats: Tensor, text_feats: Tensor, image_keys: Tensor, text_keys: Tensor,
                  pids: Tensor) -> Tensor:
        """Image queries vs the text queue plus text queries vs the image queue (paired key positive).

        The queues are cloned: they are written in place after this step's loss is built.
        """
        opts = self.options
        image_q, text_q = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
        queue_pids = self.queue_pids.clone()
        return (queue_infonce_loss(image_q, text_keys, self.text_queue.clone(), pids, queue_pids, opts.temperature)
                + queue_infonce_loss(text_q, image_keys, self.image_queue.clone(), pids, queue_pids,
                                     opts.temperature))

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, token_ids, pids = batch["images"], batch["token_ids"], batch["pids"]
        weights, opts = self.loss_weights, self.options
        image_feats, text_feats = self.encode_image(images), self.encode_text(token_ids)
        out: dict[str, Tensor] = {}
        if self.id_projection is not None:
            out["loss_instance"] = weights["instance"] * instance_loss(
                image_feats, text_feats, self.id_projection, pids, epsilon=opts.id_smoothing)
        if "align" in weights:
            out["loss_align"] = weights["align"] * global_align_loss(
                image_feats, text_feats, pids, alpha=opts.align_alpha, beta=opts.align_beta,
                scale_pos=opts.align_scale_pos, scale_neg=opts.align_scale_neg)
        if "moco" in weights:
            image_keys, text_keys = self.encode_keys(images, token_ids)
            out["loss_moco"] = weights["moco"] * self.moco_loss(image_feats, text_feats, image_keys,
                                                                 text_keys, pids)
            if self.training:
                self.enqueue(image_keys, text_keys, pids)
            with torch.no_grad():
                out["queue_fill"] = (self.queue_pids >= 0).float().mean()
        return out
