"""Training pairs, collate, identity/random batch samplers (DDP split, determinism, resume)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from tbps.config import Config
from tbps.data.loader import (IdentitySampler, RandomBatchSampler, TrainPairs, build_train_loader,
                              collate_train)
from tbps.data.transforms import build_image_transform
from tbps.errors import TBPSError

# 14 identities with 1..7 samples each (some fewer than K, some with leftovers)
PIDS = [pid for pid in range(14) for _ in range(1 + pid % 7)]


@dataclass
class Record:
    pid: int
    image_path: str
    captions: list[str]
    image_id: int
    raw_pid: int = field(default=0)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    """8 identities x 2 images x 2 captions, each image a tiny solid-colour PNG."""
    folder = tmp_path_factory.mktemp("imgs")
    out = []
    for image_id in range(16):
        pid = image_id // 2
        path = folder / f"{image_id}.png"
        Image.new("RGB", (6, 12), (image_id * 15, 255 - pid * 30, 40)).save(path)
        out.append(Record(pid, str(path), [f"person {pid} photo {image_id}", f"a man number {pid}"],
                          image_id, raw_pid=100 + pid))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from tbps.data.tokenizers import build_tokenizer

    return build_tokenizer("clip", 12)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


# ----------------------------------------------------------------------------- identity sampler

def test_every_batch_is_p_identities_of_k():
    sampler = IdentitySampler(PIDS, batch_size=8, num_instances=2, seed=0)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) > 0
        for batch in batches:
            counts = Counter(PIDS[i] for i in batch)
            assert len(batch) == 8 and len(counts) == 4 and set(counts.values()) == {2}


def test_small_identities_are_drawn_with_replacement():
    pids = [0] + [1, 1] * 3 + [2] * 4 + [3] * 4
    sampler = IdentitySampler(pids, batch_size=8, num_instances=2, seed=1)
    seen = [b for e in range(4) for b in _epoch(sampler, e)]
    assert any(b.count(0) == 2 for b in seen)  # the one-sample identity fills its K slots


def test_world_size_two_disjoint_identities_same_length():
    ranks = [IdentitySampler(PIDS, 4, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for epoch in range(4):
        per_rank = [_epoch(s, epoch) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
        ids = [{PIDS[i] for b in batches for i in b} for batches in per_rank]
        assert not ids[0] & ids[1]
        for batches in per_rank:
            for batch in batches:
                assert sorted(Counter(PIDS[i] for i in batch).values()) == [2, 2]


def test_deterministic_per_seed_and_epoch():
    a = IdentitySampler(PIDS, 8, 2, seed=3)
    b = IdentitySampler(PIDS, 8, 2, seed=3)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(IdentitySampler(PIDS, 8, 2, seed=4), 0)


def test_state_dict_resumes_mid_epoch_and_at_boundary():
    full = IdentitySampler(PIDS, 8, 2, seed=2)
    expected = _epoch(full, 1)
    run = IdentitySampler(PIDS, 8, 2, seed=2)
    run.set_epoch(1)
    it = iter(run)
    done = [next(it), next(it)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    blob = _roundtrip(state)
    resumed = IdentitySampler(PIDS, 8, 2, seed=2)
    resumed.load_state_dict(blob)
    resumed.set_epoch(1)  # the trainer's call keeps the resume offset
    assert done + list(resumed) == expected
    assert list(resumed) == expected  # the offset applies to one iteration only

    finished = IdentitySampler(PIDS, 8, 2, seed=2)
    _epoch(finished, 1)
    after = IdentitySampler(PIDS, 8, 2, seed=2)
    after.load_state_dict(finished.state_dict())
    assert after.epoch == 2 and list(after) == _epoch(full, 2)


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_identity_sampler_errors():
    with pytest.raises(TBPSError, match="multiple"):
        IdentitySampler(PIDS, 6, 4)
    with pytest.raises(TBPSError, match="identities"):
        IdentitySampler([0, 0, 1, 1], 8, 2)
    with pytest.raises(TBPSError, match="identities"):
        IdentitySampler(PIDS, 32, 2, world_size=2)


# ----------------------------------------------------------------------------- random sampler

def test_random_sampler_shards_and_drop_last():
    ranks = [RandomBatchSampler(23, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    per_rank = [_epoch(s, 0) for s in ranks]
    flat = [[i for b in batches for i in b] for batches in per_rank]
    assert all(len(b) == 4 for batches in per_rank for b in batches)
    assert not set(flat[0]) & set(flat[1])
    assert _epoch(ranks[0], 0) != _epoch(ranks[0], 1)

    keep = [RandomBatchSampler(23, 4, rank=r, world_size=2, drop_last=False) for r in range(2)]
    batches = [_epoch(s, 0) for s in keep]
    assert len(batches[0]) == len(batches[1]) == len(keep[0]) == 3
    assert {i for bs in batches for b in bs for i in b} == set(range(23))

    run = RandomBatchSampler(23, 4, seed=9)
    it = iter(run)
    first = next(it)
    resumed = RandomBatchSampler(23, 4, seed=9)
    resumed.load_state_dict(run.state_dict())
    assert [first, *resumed] == _epoch(RandomBatchSampler(23, 4, seed=9), 0)


# ----------------------------------------------------------------------------- pairs and loader

def test_train_pairs_and_collate(records, tokenizer):
    pairs = TrainPairs(records, tokenizer, build_image_transform([16, 8], train=True))
    assert len(pairs) == 32
    assert pairs.pids.tolist() == [r.pid for r in records for _ in r.captions]
    sample = pairs[3]
    assert sample["image"].shape == (3, 16, 8)
    assert sample["pid"] == 0 and sample["image_id"] == 1
    assert torch.equal(sample["token_ids"], tokenizer([records[1].captions[1]])[0])
    # with a seed the augmentation is a function of the seed alone
    assert torch.equal(pairs[(3, 77)]["image"], pairs[(3, 77)]["image"])
    batch = collate_train([pairs[i] for i in range(5)])
    assert batch["images"].shape == (5, 3, 16, 8) and batch["images"].dtype == torch.float32
    assert batch["token_ids"].shape == (5, 12) and batch["token_ids"].dtype == torch.long
    assert batch["pids"].dtype == torch.long and batch["pids"].tolist() == [0, 0, 0, 0, 1]
    assert batch["image_ids"].tolist() == [0, 0, 1, 1, 2]


def _cfg(**data) -> Config:
    cfg = Config()
    cfg.data.image_size = [16, 8]
    cfg.data.batch_size = 8
    cfg.data.num_instances = 2
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.train.seed = 7
    return cfg


class _Dataset:
    def __init__(self, train):
        self.train = train


def test_build_train_loader_batches_and_resume(records, tokenizer):
    loader, sampler = build_train_loader(_cfg(), _Dataset(records), tokenizer)
    assert len(loader) == len(sampler) == 4  # 32 pairs / (4 ids x 2)
    sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch["images"].shape == (8, 3, 16, 8) and batch["token_ids"].shape == (8, 12)
        assert sorted(Counter(batch["pids"].tolist()).values()) == [2, 2, 2, 2]

    # stop after two batches, as the trainer does with max_steps, then resume in a fresh loader
    sampler.set_epoch(1)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 2:
            break
    state = sampler.state_dict()
    assert state["position"] == 2
    loader2, sampler2 = build_train_loader(_cfg(), _Dataset(records), tokenizer)
    sampler2.load_state_dict(state)
    sampler2.set_epoch(1)
    rest = list(loader2)
    sampler.set_epoch(1)
    whole = list(loader)
    assert len(rest) == 2
    for got, want in zip(seen + rest, whole):
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["pids"], want["pids"])


def test_loader_same_batches_with_workers(records, tokenizer):
    loader0, sampler0 = build_train_loader(_cfg(), _Dataset(records), tokenizer)
    loader1, sampler1 = build_train_loader(_cfg(num_workers=1), _Dataset(records), tokenizer)
    assert loader1.persistent_workers and not loader0.persistent_workers
    first0, first1 = next(iter(loader0)), next(iter(loader1))
    assert torch.equal(first0["images"], first1["images"])
    assert torch.equal(first0["token_ids"], first1["token_ids"])


def test_build_train_loader_ddp_and_errors(records, tokenizer):
    per_rank = [build_train_loader(_cfg(sampler="random"), _Dataset(records), tokenizer, rank=r, world_size=2)
                for r in range(2)]
    assert [s.batch_size for _, s in per_rank] == [4, 4]
    ids = [{i for b in s for i in b} for _, s in per_rank]
    assert not ids[0] & ids[1]
    with pytest.raises(TBPSError, match="divisible"):
        build_train_loader(_cfg(batch_size=6), _Dataset(records), tokenizer, world_size=4)
    with pytest.raises(TBPSError, match="data.sampler"):
        build_train_loader(_cfg(sampler="balanced"), _Dataset(records), tokenizer)


# ----------------------------------------------------------------------------- same-identity positives

def test_positives_are_other_images_of_the_same_identity(records, tokenizer):
    transform = build_image_transform([16, 8], train=True)
    plain = TrainPairs(records, tokenizer, transform)
    pairs = TrainPairs(records, tokenizer, transform, positives=3)
    for index in (0, 5, 31):
        sample = pairs[(index, 11)]
        assert sample["pos_images"].shape == (3, 3, 16, 8) and sample["pos_token_ids"].shape == (3, 12)
        assert torch.equal(sample["image"], plain[(index, 11)]["image"])  # the anchor is unchanged
        assert torch.equal(sample["token_ids"], plain[index]["token_ids"])
        chosen = pairs.positive_pairs(index, __import__("numpy").random.default_rng(0))
        assert all(int(pairs.pids[j]) == sample["pid"] for j in chosen)
        # the identity's other image has 2 pairs, fewer than 3: drawn with replacement, never this image
        assert set(sample["pos_image_ids"].tolist()) == {sample["image_id"] ^ 1}
        for k in range(3):
            j = [j for j in range(len(pairs)) if torch.equal(pairs.token_ids[j], sample["pos_token_ids"][k])]
            assert j and int(pairs.image_ids[j[0]]) == int(sample["pos_image_ids"][k])
    # a function of the augmentation seed alone
    a, b, c = pairs[(4, 3)], pairs[(4, 3)], pairs[(4, 99)]
    assert torch.equal(a["pos_images"], b["pos_images"]) and torch.equal(a["pos_token_ids"], b["pos_token_ids"])
    assert not torch.equal(a["pos_images"], c["pos_images"])
    assert "pos_images" not in plain[(4, 3)]
    with pytest.raises(TBPSError, match="data.positives"):
        TrainPairs(records, tokenizer, transform, positives=-1)


def test_positives_fall_back_to_other_captions_then_to_itself(records, tokenizer):
    transform = build_image_transform([16, 8], train=False)
    lonely = [Record(0, records[0].image_path, ["a", "b"], 0), Record(1, records[1].image_path, ["c"], 1)]
    pairs = TrainPairs(lonely, tokenizer, transform, positives=2)
    assert pairs[0]["pos_token_ids"].tolist() == [pairs.token_ids[1].tolist()] * 2  # its other caption
    assert pairs[2]["pos_token_ids"].tolist() == [pairs.token_ids[2].tolist()] * 2  # only itself


def test_loader_with_positives_batches_and_exact_resume(records, tokenizer):
    cfg = _cfg(positives=2)
    loader, sampler = build_train_loader(cfg, _Dataset(records), tokenizer)
    sampler.set_epoch(1)
    whole = list(loader)
    for batch in whole:
        assert batch["pos_images"].shape == (8, 2, 3, 16, 8) and batch["pos_token_ids"].shape == (8, 2, 12)
        pos_pids = batch["pos_image_ids"] // 2  # image_id // 2 is the pid in this fixture
        assert torch.equal(pos_pids, batch["pids"].view(-1, 1).expand(-1, 2))
    sampler.set_epoch(1)
    first = next(iter(loader))
    state = sampler.state_dict()
    loader2, sampler2 = build_train_loader(cfg, _Dataset(records), tokenizer)
    sampler2.load_state_dict(state)
    sampler2.set_epoch(1)
    rest = list(loader2)
    for got, want in zip([first] + rest, whole):
        for key in ("images", "pos_images", "pos_token_ids", "pos_image_ids"):
            assert torch.equal(got[key], want[key]), key
    # default 0: the batch keys are exactly the ones without positives
    plain = next(iter(build_train_loader(_cfg(), _Dataset(records), tokenizer)[0]))
    assert set(plain) == {"images", "token_ids", "pids", "image_ids"}
