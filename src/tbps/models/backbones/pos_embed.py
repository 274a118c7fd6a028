"""Position and token embeddings resized to the input a run uses: a 224x224 checkpoint serves 384x128
images, a 77-token text tower serves another caption length, a tokenizer with added ids gets rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps.errors import TBPSError


def interpolate_grid_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                               num_prefix: int = 1, mode: str = "bilinear") -> Tensor:
    """Resize a (prefix + h*w, C) position embedding from ``old_grid`` to ``new_grid`` (rows, cols).

    The prefix rows (CLS / pooled token) are kept as they are; the grid part is resampled as an image
    (IRRA: bilinear, ``align_corners=False``) so a 224x224 checkpoint serves 384x128 inputs.
    """
    prefix, grid = pos_embed[:num_prefix], pos_embed[num_prefix:]
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed.clone()
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, **kwargs)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], channels).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)


def resize_text_pos_embed(pos_embed: Tensor, length: int) -> Tensor:
    """(L0, C) -> (length, C): the first ``length`` rows when shorter, linear interpolation when longer."""
    if length <= pos_embed.shape[0]:
        return pos_embed[:length].clone()
    resized = F.interpolate(pos_embed.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(pos_embed.dtype).contiguous()


def resize_token_embedding(weight: Tensor, vocab_size: int) -> Tensor:
    """Append rows up to ``vocab_size`` (e.g. ``<|mask|>``), each the mean of the existing rows."""
    extra = vocab_size - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def infer_grid(num_positions: int, target: tuple[int, int], hint: tuple[int, int] | None,
                where: str) -> tuple[int, int]:
    if hint is not None and hint[0] * hint[1] == num_positions:
        return hint
    side = math.isqrt(num_positions)
    if side * side == num_positions:
        return side, side
    if target[0] * target[1] == num_positions:
        return target
    raise TBPSError(f"{where}: cannot tell the grid of a position embedding with {num_positions} "
                    f"positions (not square, not the target {target[0]}x{target[1]})")
