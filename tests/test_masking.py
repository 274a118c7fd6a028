"""Masked-token corruption: what may be picked, in what proportions, and that input stays intact."""

from __future__ import annotations

import torch

from tbps.models.masking import IGNORE_INDEX, mask_tokens

VOCAB, SOT, EOT, MASK, PAD = 49409, 49406, 49407, 49408, 0
SPECIAL = [SOT, EOT, MASK, PAD]


def _captions(batch: int, length: int = 40, seed: int = 0):
    """CLIP-like rows: start, words (ids 1..999, some equal to the pad id 0 on purpose), end, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[b, 0] = SOT
        ids[b, 1:n + 1] = torch.randint(1, 1000, (n,), generator=g)
        ids[b, n + 1] = EOT
        valid[b, : n + 2] = True
    return ids, valid


def _mask(ids, valid=None, **kw):
    return mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, valid_mask=valid, **kw)


def test_specials_and_padding_never_picked_and_labels_hold_originals():
    ids, valid = _captions(64)
    original = ids.clone()
    corrupted, labels = _mask(ids, valid, prob=0.5)
    assert torch.equal(ids, original), "input modified in place"
    picked = labels != IGNORE_INDEX
    assert not picked[~valid].any()
    assert not picked[torch.isin(ids, torch.tensor(SPECIAL))].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(corrupted[~picked], ids[~picked])  # only picked positions change
    assert corrupted.dtype == ids.dtype and corrupted.shape == ids.shape


def test_padding_value_shared_with_a_word_is_told_apart_by_valid_mask():
    ids = torch.tensor([[SOT, 0, 5, EOT, 0, 0]])  # CLIP: id 0 is "!" inside the caption, pad after EOT
    valid = torch.tensor([[True, True, True, True, False, False]])
    for seed in range(20):
        _, labels = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=[SOT, EOT, MASK],
                                valid_mask=valid, prob=0.9, generator=torch.Generator().manual_seed(seed))
        assert (labels[0, 4:] == IGNORE_INDEX).all()


def test_ratio_and_80_10_10_split():
    ids, valid = _captions(2000, length=60, seed=1)
    corrupted, labels = _mask(ids, valid, generator=torch.Generator().manual_seed(0))
    eligible = valid & ~torch.isin(ids, torch.tensor(SPECIAL))
    picked = labels != IGNORE_INDEX
    ratio = picked.sum().item() / eligible.sum().item()
    assert 0.145 < ratio < 0.165  # 15% plus the few forced picks in short captions
    n = picked.sum().item()
    masked = (corrupted[picked] == MASK).sum().item() / n
    kept = (corrupted[picked] == ids[picked]).sum().item() / n
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.015  # a random draw equal to the original is ~1e-5 likely
    randomised = corrupted[picked & (corrupted != MASK) & (corrupted != ids)]
    assert abs(randomised.numel() / n - 0.1) < 0.015
    assert not torch.isin(randomised, torch.tensor(SPECIAL)).any()
    assert (randomised >= 0).all() and (randomised < VOCAB).all()
    assert randomised.max() > 1000  # drawn from the whole vocabulary, not from the batch


def test_every_caption_with_a_word_gets_a_pick():
    ids = torch.tensor([[SOT, 11, EOT, PAD], [SOT, 12, 13, EOT], [SOT, EOT, PAD, PAD]])
    valid = ids != PAD
    for seed in range(30):
        _, labels = _mask(ids, valid, prob=0.0, generator=torch.Generator().manual_seed(seed))
        picked = labels != IGNORE_INDEX
        assert picked[0].sum() == 1 and labels[0, 1] == 11
        assert picked[1].sum() == 1
        assert picked[2].sum() == 0  # nothing eligible: nothing picked


def test_deterministic_with_generator_and_global_seed():
    ids, valid = _captions(16)
    a = _mask(ids, valid, generator=torch.Generator().manual_seed(5))
    b = _mask(ids, valid, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(9)
    c = _mask(ids, valid)
    torch.manual_seed(9)
    d = _mask(ids, valid)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_without_valid_mask_only_special_ids_are_excluded():
    ids = torch.tensor([[SOT, 7, 8, 9, EOT, PAD, PAD]])
    _, labels = _mask(ids, prob=1.0, mask_frac=1.0, random_frac=0.0)
    assert labels.tolist() == [[IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
