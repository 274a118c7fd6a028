"""CLIP's text tower (causal transformer; global = the end token by default) and what the BERT encoder
shares with it: the valid-token mask, pooling, and the tokenizer/vocabulary check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tbps.data.tokenizers import caption_valid_mask
from tbps.errors import TBPSError
from tbps.models.backbones.architectures import (ActivationMixin, get_arch_config, install_switchable_gelu,
                                                 resolve_quick_gelu, run_blocks)
from tbps.models.backbones.pos_embed import resize_text_pos_embed, resize_token_embedding
from tbps.models.backbones.weights import clip_text_state, load_tower

if TYPE_CHECKING:
    from tbps.config import ModelConfig


def clip_valid_mask(token_ids: Tensor, eot_id: int, pad_id: int) -> Tensor:
    """Valid positions: start through the first end token (found by value, never by ``argmax``).

    Rows without an end token fall back to ``ids != pad_id``; position 0 is always valid.
    """
    mask = caption_valid_mask(token_ids, eot_id, pad_id)
    mask[:, 0] = True
    return mask


def pool_tokens(tokens: Tensor, mask: Tensor, pooling: str, token_ids: Tensor, eot_id: int) -> Tensor:
    if pooling == "mean":
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if pooling == "cls":
        return tokens[:, 0]
    # "eot": the first end token, or the last valid position in rows without one
    is_end = token_ids == eot_id
    first_end = is_end.long().argmax(dim=1)
    last_valid = mask.long().cumsum(dim=1).argmax(dim=1)
    index = torch.where(is_end.any(dim=1), first_end, last_valid)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index]


def text_pooling(model_cfg: ModelConfig, default: str) -> str:
    pooling = model_cfg.text_pooling or "default"
    if pooling == "default":
        return default
    if pooling not in ("eot", "cls", "mean"):
        raise TBPSError(f"model.text_pooling: expected default, eot, cls or mean, got {pooling!r}")
    return pooling


class ClipTextEncoder(ActivationMixin, nn.Module):
    """CLIP text transformer (open_clip ``TextTransformer`` under ``backbone``), causal, length L.

    tokens = ln_final(x) @ text_projection at every position; global = the EOT token (by default).
    """

    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, tokenizer: Any, pooling: str, quick_gelu: bool,
                 arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.pooling = pooling
        self.pad_id, self.eot_id = int(tokenizer.pad_id), int(tokenizer.eot_id)
        self.context_length = int(backbone.positional_embedding.shape[0])
        self.vocab_size = int(backbone.token_embedding.weight.shape[0])
        self.output_dim = int(self._projection_dim())
        self._init_activation(quick_gelu)

    def _projection_dim(self) -> int:
        proj = self.backbone.text_projection
        if proj is None:
            return self.backbone.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.transformer.grad_checkpointing = enable

    def forward(self, token_ids: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        text = self.backbone
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text encoder built for {self.context_length} tokens, got {length}")
        x = text.token_embedding(token_ids)
        x = x + text.positional_embedding[:length].to(x.dtype)
        attn_mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        use_ckpt = bool(text.transformer.grad_checkpointing) and self.training
        x, attention = run_blocks(text.transformer.resblocks, x, attn_mask, use_ckpt, return_attention)
        x = text.ln_final(x)
        proj = text.text_projection
        tokens = x if proj is None else (proj(x) if isinstance(proj, nn.Linear) else x @ proj)
        mask = clip_valid_mask(token_ids, self.eot_id, self.pad_id)
        out = {"tokens": tokens, "global": pool_tokens(tokens, mask, self.pooling, token_ids, self.eot_id),
               "mask": mask}
        if return_attention:
            out["attention"] = attention
        return out


def _build_clip_text_tower(arch_cfg: dict[str, Any], context_length: int) -> nn.Module:
    from open_clip.model import CLIPTextCfg, _build_text_tower as build_tower

    text = dict(arch_cfg["text_cfg"])
    text["context_length"] = int(context_length)
    tower = build_tower(arch_cfg["embed_dim"], CLIPTextCfg(**text))
    install_switchable_gelu(tower)
    return tower


def _set_token_embedding(tower: nn.Module, weight: Tensor) -> None:
    embedding = nn.Embedding(weight.shape[0], weight.shape[1])
    embedding.weight.data.copy_(weight)
    tower.token_embedding = embedding
    tower.vocab_size = weight.shape[0]


_MAX_ADDED_TOKENS = 16


def check_vocab(tokenizer: Any, rows: int, what: str) -> None:
    """A tokenizer of another vocabulary would run but mean nothing: refuse it early.

    The tokenizer may add a few special tokens (``<|mask|>``), which get new embedding rows.
    """
    vocab = int(tokenizer.vocab_size)
    if vocab < rows or vocab > rows + _MAX_ADDED_TOKENS:
        name = getattr(tokenizer, "name", "the tokenizer")
        raise TBPSError(f"data.tokenizer: {name!r} has {vocab} ids but {what} has {rows} token "
                        f"embeddings (use the tokenizer that matches model.text_backbone)")


def build_clip_text(model_cfg: ModelConfig, tokenizer: Any,
                     weights: tuple[dict[str, Tensor], dict[str, Any]] | None) -> ClipTextEncoder:
    arch = model_cfg.image_backbone
    arch_cfg = get_arch_config(arch)
    context_length = int(tokenizer.context_length)
    tower = _build_clip_text_tower(arch_cfg, context_length)
    meta = weights[1] if weights is not None else None
    if weights is not None:
        state = clip_text_state(weights[0])
        if "token_embedding.weight" not in state:
            raise TBPSError(f"{meta['path']}: no text-tower weights ('token_embedding.weight') in this file")
        token_weight = state.pop("token_embedding.weight")
        width = tower.token_embedding.weight.shape[1]
        if token_weight.ndim != 2 or token_weight.shape[1] != width:
            raise TBPSError(f"{meta['path']}: does not fit architecture {arch!r}: token_embedding.weight has "
                            f"shape {list(token_weight.shape)} in the file but [*, {width}] in the model")
        _set_token_embedding(tower, token_weight)
        state["token_embedding.weight"] = token_weight
        pos = state.get("positional_embedding")
        if pos is not None and pos.ndim == 2 and pos.shape[1] == width:
            state["positional_embedding"] = resize_text_pos_embed(pos, context_length)
        load_tower(tower, state, arch, meta["path"])
    check_vocab(tokenizer, tower.token_embedding.weight.shape[0], f"the CLIP text tower of {arch!r}")
    vocab = int(tokenizer.vocab_size)
    if vocab > tower.token_embedding.weight.shape[0]:
        _set_token_embedding(tower, resize_token_embedding(tower.token_embedding.weight.data, vocab))
    pooling = text_pooling(model_cfg, "eot")
    return ClipTextEncoder(tower, tokenizer, pooling, resolve_quick_gelu(model_cfg, meta, arch_cfg), arch)
