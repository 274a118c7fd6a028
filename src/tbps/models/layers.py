"""Blocks that several methods share: the cross-modal transformer and the masked-token head.

IRRA's implicit relation reasoning introduced both; FCSA and CFFA reuse them with other depths and
other query/key modalities, so they are parameterised rather than hard-wired to text -> image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``; IRRA's cross-modal blocks use it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossModalTransformer(nn.Module):
    """Queries of one modality attend to the tokens of the other, then a transformer refines them.

    IRRA's IRR branch: ``x = CrossAttn(LN_q(text), LN_kv(image), LN_kv(image))`` (no residual,
    as in the reference code), then ``layers`` pre-LN transformer blocks of width ``width`` with
    ``heads`` heads (QuickGELU MLP, ratio 4, no dropout), then a final LayerNorm. IRRA uses width
    512, 4 layers, 8 heads; FCSA's image side uses ``layers=0`` (the cross-attention alone).

    ``query_dim`` / ``memory_dim`` different from ``width`` add a linear projection in front, so a
    small cross-modal block can sit on a wide backbone.
    """

    def __init__(self, width: int = 512, layers: int = 4, heads: int = 8, query_dim: int | None = None,
                 memory_dim: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"cross-modal width {width} is not divisible by its {heads} heads")
        self.width, self.layers, self.heads = width, layers, heads
        query_dim, memory_dim = query_dim or width, memory_dim or width
        self.query_proj = nn.Linear(query_dim, width) if query_dim != width else nn.Identity()
        self.memory_proj = nn.Linear(memory_dim, width) if memory_dim != width else nn.Identity()
        self.ln_query = nn.LayerNorm(width)
        self.ln_memory = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=int(width * mlp_ratio), dropout=0.0,
                                       activation=QuickGELU(), batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's transformer initialisation, as IRRA applies it to its new cross-modal layers."""
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * max(self.layers, 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        for block in self.blocks:
            nn.init.normal_(block.self_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.linear1.weight, std=fc_std)
            nn.init.normal_(block.linear2.weight, std=proj_std)

    def forward(self, queries: Tensor, memory: Tensor, query_mask: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        """``queries`` (B, Lq, Dq) attend to ``memory`` (B, Lm, Dm); returns (B, Lq, width).

        ``query_mask`` / ``memory_mask``: optional (B, L) bool, True at real tokens; padding is then
        never attended to (every row must keep at least one real token).
        """
        q = self.ln_query(self.query_proj(queries))
        kv = self.ln_memory(self.memory_proj(memory))
        memory_padding = None if memory_mask is None else ~memory_mask.bool()
        x = self.cross_attn(q, kv, kv, key_padding_mask=memory_padding, need_weights=False)[0]
        query_padding = None if query_mask is None else ~query_mask.bool()
        for block in self.blocks:
            x = block(x, src_key_padding_mask=query_padding)
        return self.ln_post(x)


class MLMHead(nn.Module):
    """Predicts token ids from cross-modal features (IRRA's 2-layer head, BERT's LM head).

    ``Linear(width, width) -> QuickGELU (or GELU) -> LayerNorm -> Linear(width, vocab_size)``.
    Apply it to the selected masked positions only: the vocabulary projection is the largest
    activation of the IRR branch (49,408 logits per token with CLIP).
    """

    def __init__(self, width: int, vocab_size: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"MLM head activation must be 'quick_gelu' or 'gelu', got {activation!r}")
        self.dense = nn.Linear(width, width)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, vocab_size)
        nn.init.normal_(self.dense.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(self.fc.weight, std=width ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.ln(self.act(self.dense(x))))
