"""Masked-token corruption of captions, shared by IRRA, FCSA and CFFA.

BERT's recipe as IRRA uses it: each real token is picked with probability ``prob``; a picked token
becomes the mask token (``mask_frac``), a random ordinary token (``random_frac``) or stays as it is
(the rest), and its original id becomes the label to predict. Start, end, padding and other
special ids are never picked.

Two differences from the reference code: the input is never modified (IRRA's in-place edit also
masked the captions that the global losses then used; a method reproduces that by feeding the
corrupted ids to its global losses, ``method.mask_global_text``), and the whole batch is corrupted
with tensor operations instead of a Python loop per token in the data loader.

``augment_tokens`` is the other caption transform on token ids: CFFA's training augmentation, which
masks, replaces or deletes words (no labels; deletions close up and pad the end).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of positions that were not picked (torch's cross-entropy default)


def _ordinary_ids(vocab_size: int, special: Tensor, device: torch.device) -> Tensor:
    """All ids in ``[0, vocab_size)`` except the special ones: the pool for random replacements."""
    keep = torch.ones(vocab_size, dtype=torch.bool, device=device)
    special = special[(special >= 0) & (special < vocab_size)]
    keep[special] = False
    return keep.nonzero().squeeze(1)


def mask_tokens(token_ids: Tensor, *, mask_id: int, vocab_size: int, special_ids: Iterable[int],
                valid_mask: Tensor | None = None, prob: float = 0.15, mask_frac: float = 0.8,
                random_frac: float = 0.1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Corrupt a batch of captions for masked-token prediction.

    Args:
        token_ids: ``(B, L)`` ids; not modified.
        mask_id: the id written at masked positions.
        vocab_size: random replacements are drawn from ``[0, vocab_size)`` minus the special ids.
        special_ids: ids never picked (start, end, padding, mask, ...); ``mask_id`` is always added.
        valid_mask: ``(B, L)`` bool, True at real tokens. Needed when padding shares an id with a
            real token (CLIP pads with 0, the id of ``!``); without it only ``special_ids`` are excluded.
        prob: chance that an eligible token is picked.
        mask_frac, random_frac: shares of picked tokens replaced by ``mask_id`` / by a random id;
            the remaining ``1 - mask_frac - random_frac`` keep their id.
        generator: a ``torch.Generator`` on ``token_ids``' device for reproducible draws; ``None``
            uses torch's global generator (reproducible under ``torch.manual_seed``).

    Returns:
        ``(corrupted_ids, labels)``: ``labels`` holds the original id at picked positions and
        ``-100`` elsewhere. Every caption with at least one eligible token gets at least one pick,
        so no caption contributes nothing to the loss.
    """
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be (batch, length), got shape {tuple(token_ids.shape)}")
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise ValueError(f"invalid masking ratios prob={prob}, mask_frac={mask_frac}, random_frac={random_frac}")
    device = token_ids.device
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=token_ids.dtype,
                           device=device)
    eligible = ~torch.isin(token_ids, special)
    if valid_mask is not None:
        eligible &= valid_mask.to(device=device, dtype=torch.bool)

    draws = torch.rand(token_ids.shape, generator=generator, device=device)
    picked = eligible & (draws < prob)
    # rows left without a pick get one eligible position, chosen uniformly
    needs_one = eligible.any(dim=1) & ~picked.any(dim=1)
    scores = torch.rand(token_ids.shape, generator=generator, device=device).masked_fill(~eligible, -1.0)
    forced = torch.zeros_like(picked).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
    picked |= forced & needs_one.unsqueeze(1)

    labels = torch.where(picked, token_ids, torch.full_like(token_ids, IGNORE_INDEX))
    action = torch.rand(token_ids.shape, generator=generator, device=device)
    to_mask = picked & (action < mask_frac)
    to_random = picked & (action >= mask_frac) & (action < mask_frac + random_frac)

    corrupted = token_ids.masked_fill(to_mask, mask_id)
    pool = _ordinary_ids(vocab_size, special, device)
    choice = torch.randint(len(pool), token_ids.shape, generator=generator, device=device)
    corrupted = torch.where(to_random, pool[choice].to(token_ids.dtype), corrupted)
    return corrupted, labels


def augment_tokens(token_ids: Tensor, *, mask_id: int, vocab_size: int, pad_id: int, special_ids: Iterable[int],
                   valid_mask: Tensor | None = None, prob: float = 0.2, mask_frac: float = 0.6,
                   random_frac: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Token-level caption augmentation (CFFA's text augmentation): mask, replace or delete words.

    Each eligible token (a real word: not special, not padding) is perturbed with probability
    ``prob``; a perturbed token becomes ``mask_id`` (``mask_frac``), a random ordinary id
    (``random_frac``) or is deleted (the rest). Deleted tokens close up: the tokens after them
    (end token included) shift left and ``pad_id`` fills the freed positions at the end, so the
    result keeps the ``[start] words [end] pad...`` layout. Defaults follow CFFA's code (20% of
    tokens; 60% masked, 20% random, 20% deleted). Unlike ``mask_tokens`` there are no labels and
    no forced pick: this is data augmentation, and a caption may come back unchanged.

    Args:
        token_ids: ``(B, L)`` ids; not modified.
        mask_id, vocab_size, special_ids, valid_mask, generator: as in :func:`mask_tokens`.
        pad_id: the id written at the positions freed by deletions.

    Returns:
        the augmented ``(B, L)`` ids.
    """
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be (batch, length), got shape {tuple(token_ids.shape)}")
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise ValueError(f"invalid augmentation ratios prob={prob}, mask_frac={mask_frac}, "
                         f"random_frac={random_frac}")
    device = token_ids.device
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id), int(pad_id)}),
                           dtype=token_ids.dtype, device=device)
    eligible = ~torch.isin(token_ids, special)
    if valid_mask is not None:
        eligible &= valid_mask.to(device=device, dtype=torch.bool)

    perturbed = eligible & (torch.rand(token_ids.shape, generator=generator, device=device) < prob)
    action = torch.rand(token_ids.shape, generator=generator, device=device)
    to_mask = perturbed & (action < mask_frac)
    to_random = perturbed & (action >= mask_frac) & (action < mask_frac + random_frac)
    to_delete = perturbed & (action >= mask_frac + random_frac)

    augmented = token_ids.masked_fill(to_mask, mask_id)
    pool = _ordinary_ids(vocab_size, special, device)
    choice = torch.randint(len(pool), token_ids.shape, generator=generator, device=device)
    augmented = torch.where(to_random, pool[choice].to(token_ids.dtype), augmented)

    # deletion: a stable sort of "kept first, in order" moves every kept token left, then pad the tail
    length = token_ids.shape[1]
    positions = torch.arange(length, device=device).expand_as(token_ids)
    order = torch.where(to_delete, positions + length, positions).argsort(dim=1)
    shifted = augmented.gather(1, order)
    kept = (~to_delete).sum(dim=1, keepdim=True)
    return shifted.masked_fill(positions >= kept, pad_id)
