"""Training batches: (image, caption) pairs, identity-balanced batch sampling that works under DDP,
and exact resume.

Why a custom sampler: the field's losses (SDM, ID, CMPM) need several images of the same person in a
batch, so batches are P identities x K instances. The reference implementation's identity sampler
has no notion of ranks, so under DDP every process drew the same batches (or hung when counts
differed). Here identities are partitioned across ranks each epoch, every rank yields exactly
``len(sampler)`` batches, and everything random is a function of (seed, epoch, rank, position), so
a resumed run sees the same remaining batches, and the same augmentations, as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tbps.data.images import load_image
from tbps.errors import TBPSError


# ----------------------------------------------------------------------------- pairs

class TrainPairs(Dataset):
    """One sample per (image, caption) pair, the unit every method in the field trains on.

    All captions are tokenised once, up front, into one ``(num_pairs, L)`` tensor: a batch call is
    far faster than per-item tokenisation, and workers then need no tokenizer at all.
    An index may be an ``int`` or ``(int, augmentation_seed)``; with a seed the image augmentation
    is drawn from that seed alone, so it does not depend on worker count or on resuming.

    ``positives`` = K > 0 attaches K other pairs of the same identity to every sample (FCSA's
    hard-positive swap picks among them): ``pos_images`` (K, 3, H, W), ``pos_token_ids`` (K, L),
    ``pos_image_ids`` (K,). They come from other images of the person where it has any (else other
    captions of the same image, else the sample itself), drawn without replacement when there are K
    or more; which pairs, and their augmentations, are a function of the sample's augmentation seed,
    so resume stays exact.
    """

    def __init__(self, records: Sequence[Any], tokenizer, transform, positives: int = 0) -> None:
        captions: list[str] = []
        pair_record: list[int] = []
        for rec_index, record in enumerate(records):
            for caption in record.captions:
                captions.append(caption)
                pair_record.append(rec_index)
        if not captions:
            raise TBPSError("the training split has no captions: nothing to train on")
        self.transform = transform
        self.image_paths = [str(r.image_path) for r in records]
        self.pair_record = torch.tensor(pair_record, dtype=torch.long)
        record_pids = torch.tensor([int(r.pid) for r in records], dtype=torch.long)
        record_image_ids = torch.tensor([int(r.image_id) for r in records], dtype=torch.long)
        self.pids = record_pids[self.pair_record]  # per pair, what the identity sampler groups by
        self.image_ids = record_image_ids[self.pair_record]
        self.token_ids = tokenizer(captions)
        if positives < 0:
            raise TBPSError(f"data.positives must be 0 or more, got {positives}")
        self.positives = int(positives)
        self._identity_pairs: dict[int, np.ndarray] = {}
        if self.positives:
            pids = self.pids.numpy()
            order = np.argsort(pids, kind="stable")
            unique, starts = np.unique(pids[order], return_index=True)
            for pid, group in zip(unique.tolist(), np.split(order, starts[1:])):
                self._identity_pairs[pid] = group

    def __len__(self) -> int:
        return int(self.pair_record.numel())

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, (tuple, list)):
            index, aug_seed = int(item[0]), int(item[1])
        else:
            index, aug_seed = int(item), None
        sample = {
            "image": self._image(index, aug_seed),
            "token_ids": self.token_ids[index],
            "pid": int(self.pids[index]),
            "image_id": int(self.image_ids[index]),
        }
        if self.positives:
            # a stream of its own, so the anchor's augmentation is the same with or without positives
            seed = int(torch.randint(2**62, (1,))) if aug_seed is None else [aug_seed, 1]
            rng = np.random.default_rng(seed)
            chosen = self.positive_pairs(index, rng)
            pos_seeds = rng.integers(2**62, size=len(chosen)).tolist()
            sample["pos_images"] = torch.stack([
                self._image(int(j), None if aug_seed is None else int(s)) for j, s in zip(chosen, pos_seeds)])
            sample["pos_token_ids"] = self.token_ids[torch.as_tensor(chosen, dtype=torch.long)]
            sample["pos_image_ids"] = self.image_ids[torch.as_tensor(chosen, dtype=torch.long)]
        return sample

    def _image(self, index: int, aug_seed: int | None) -> torch.Tensor:
        image = load_image(self.image_paths[int(self.pair_record[index])])
        if aug_seed is None:
            return self.transform(image)
        # CPU generator only, restored afterwards: the caller's RNG stream (and CUDA's) is untouched
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(aug_seed)
            return self.transform(image)

    def positive_pairs(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """``self.positives`` pair indices of the same identity as ``index``, other images first."""
        group = self._identity_pairs[int(self.pids[index])]
        records = self.pair_record.numpy()
        pool = group[records[group] != records[index]]  # other images of the person
        if len(pool) == 0:
            pool = group[group != index]  # a one-image identity: its other captions
        if len(pool) == 0:
            pool = np.array([index])
        k = self.positives
        return rng.choice(pool, size=k, replace=len(pool) < k)


def collate_train(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch dict that ``TBPSModel.forward`` takes.

    Samples with positives add ``pos_images`` (B, K, 3, H, W), ``pos_token_ids`` (B, K, L) and
    ``pos_image_ids`` (B, K).
    """
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "token_ids": torch.stack([torch.as_tensor(s["token_ids"], dtype=torch.long) for s in samples]),
        "pids": torch.tensor([int(s["pid"]) for s in samples], dtype=torch.long),
        "image_ids": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
    }
    if samples and "pos_images" in samples[0]:
        batch["pos_images"] = torch.stack([s["pos_images"] for s in samples])
        batch["pos_token_ids"] = torch.stack([torch.as_tensor(s["pos_token_ids"], dtype=torch.long)
                                              for s in samples])
        batch["pos_image_ids"] = torch.stack([torch.as_tensor(s["pos_image_ids"], dtype=torch.long)
                                              for s in samples])
    return batch


# ----------------------------------------------------------------------------- samplers

def _seed_int(value: int) -> int:
    """numpy seed sequences take non-negative integers only."""
    return int(value) % (2**63)


class EpochBatchSampler:
    """Shared machinery of the batch samplers: per-epoch batch lists, DDP rank, exact resume.

    Position semantics: ``state_dict()["position"]`` is the number of this epoch's batches already
    consumed. A loader from ``build_train_loader`` counts batches as the training loop receives them
    (so prefetching workers do not skew it); a sampler iterated directly counts batches as it yields
    them. ``load_state_dict`` makes the next iteration (or ``set_epoch`` with the same epoch) start
    after the consumed batches.
    """

    kind = "base"

    def __init__(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world size {world_size}")
        if batch_size < 1:
            raise TBPSError(f"data.batch_size must be at least 1 per process, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self._resume_batch = 0  # pending start offset for the next iteration of self.epoch
        self._position = 0  # batches of self.epoch consumed so far
        self._counted_by_loader = False  # set by the training loader, which counts consumption itself
        self._cache: tuple[int, list[list[int]]] | None = None

    # -- subclasses
    def _make_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for ``epoch``; exactly ``len(self)`` of them."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _layout(self) -> dict[str, int]:
        """What must match for a saved position to mean the same batches."""
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "num_batches": len(self)}

    # -- shared
    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All of this rank's batches for an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._make_batches(epoch))
        return self._cache[1]

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        """Select the epoch to iterate. ``start_batch=None`` keeps a pending resume offset when
        ``epoch`` is the resumed one (so ``load_state_dict`` then ``set_epoch`` both work)."""
        epoch = int(epoch)
        if start_batch is None:
            start_batch = self._resume_batch if epoch == self.epoch else 0
        self.epoch = epoch
        self._resume_batch = max(0, min(int(start_batch), len(self)))
        self._position = self._resume_batch

    def __iter__(self) -> Iterator[list[int]]:
        yield from (batch for _, batch in self.iter_numbered())

    def iter_numbered(self) -> Iterator[tuple[int, list[int]]]:
        """``(batch number within the epoch, batch)`` from the resume offset on."""
        start, self._resume_batch = self._resume_batch, 0
        self._position = start
        batches = self.batches()
        for number in range(start, len(batches)):
            if not self._counted_by_loader:
                self._position = number + 1
            yield number, batches[number]

    def mark_consumed(self) -> None:
        """Called by the training loader once per batch handed to the training loop."""
        self._position = min(self._position + 1, len(self))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "position": self._position, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
        saved = {k: state.get(k) for k in self._layout()}
        if state.get("kind", self.kind) != self.kind or saved != self._layout():
            old_batches = int(state.get("num_batches") or 0)
            position = round(position * len(self) / old_batches) if old_batches else 0
            warnings.warn(
                f"resuming with a different sampler set-up ({state.get('kind')} {saved} -> {self.kind} "
                f"{self._layout()}): epoch {epoch} continues at batch {position}, not the same batches",
                stacklevel=2,
            )
        if position >= len(self):  # the saved epoch was finished
            epoch, position = epoch + 1, 0
        self.epoch = epoch
        self._resume_batch = self._position = max(0, position)


class IdentitySampler(EpochBatchSampler):
    """Batches of P = batch_size // K identities x K = num_instances samples each (IRRA/fast-reid).

    ``batch_size`` is this rank's batch. Each epoch: identities are shuffled from (seed, epoch) and
    dealt round-robin to ranks, so ranks hold disjoint identities; each rank splits every identity's
    shuffled samples into chunks of K (an identity with fewer than K samples is drawn with
    replacement) and fills batches by repeatedly drawing P identities that still have chunks. Every
    rank yields the same ``len()`` = total chunks // (P * world_size) batches: a rank that runs out
    early tops up with freshly drawn P x K batches of its own identities, one with more stops there.
    """

    kind = "identity"

    def __init__(
        self,
        pids: Sequence[int] | torch.Tensor | np.ndarray,
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        if num_instances < 1:
            raise TBPSError(f"data.num_instances must be at least 1, got {num_instances}")
        if batch_size % num_instances:
            raise TBPSError(
                f"the batch per process ({batch_size}) must be a multiple of data.num_instances "
                f"({num_instances}) for the identity sampler"
            )
        self.num_instances = int(num_instances)
        self.num_pids_per_batch = batch_size // num_instances
        if isinstance(pids, torch.Tensor):
            pids = pids.detach().cpu().numpy()
        pid_array = np.asarray(pids, dtype=np.int64).reshape(-1)
        if pid_array.size == 0:
            raise TBPSError("the identity sampler got no training samples")
        unique, inverse = np.unique(pid_array, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
        self.pids = unique
        self.groups: list[np.ndarray] = np.split(order, bounds)  # sample indices of each identity
        per_rank = len(unique) // world_size
        if per_rank < self.num_pids_per_batch:
            raise TBPSError(
                f"identity sampler: {len(unique)} training identities over {world_size} process(es) "
                f"cannot fill batches of {self.num_pids_per_batch} identities x {num_instances}; lower "
                f"data.batch_size, raise data.num_instances, or use data.sampler=random"
            )
        chunks = sum(max(1, len(g) // num_instances) for g in self.groups)
        self._num_batches = chunks // (self.num_pids_per_batch * world_size)

    def __len__(self) -> int:
        return self._num_batches

    def _layout(self) -> dict[str, int]:
        return {**super()._layout(), "num_instances": self.num_instances}

    def identities(self, epoch: int | None = None) -> np.ndarray:
        """Positions (into ``self.pids``) of the identities this rank draws from in ``epoch``."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = np.random.default_rng([_seed_int(self.seed), epoch]).permutation(len(self.pids))
        return order[self.rank :: self.world_size]

    def _draw(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        k = self.num_instances
        if len(members) < k:
            return rng.choice(members, size=k, replace=True)
        return rng.permutation(members)

    def _make_batches(self, epoch: int) -> list[list[int]]:
        k, p, target = self.num_instances, self.num_pids_per_batch, len(self)
        mine = self.identities(epoch)
        rng = np.random.default_rng([_seed_int(self.seed), epoch, 1 + self.rank])
        chunks: dict[int, list[np.ndarray]] = {}
        for ident in mine.tolist():
            drawn = self._draw(rng, self.groups[ident])
            chunks[ident] = [drawn[j * k : (j + 1) * k] for j in range(len(drawn) // k)]
        available = [ident for ident in mine.tolist() if chunks[ident]]
        batches: list[list[int]] = []
        while len(available) >= p and len(batches) < target:
            picked = sorted(rng.choice(len(available), size=p, replace=False).tolist(), reverse=True)
            batch: list[int] = []
            for slot in picked:  # descending, so swap-removal never disturbs a slot still to visit
                ident = available[slot]
                batch.extend(chunks[ident].pop().tolist())
                if not chunks[ident]:
                    available[slot] = available[-1]
                    available.pop()
            batches.append(batch)
        while len(batches) < target:  # top-up: this rank's identities ran short of chunks
            batch = []
            for ident in rng.choice(mine, size=p, replace=False).tolist():
                batch.extend(self._draw(rng, self.groups[ident])[:k].tolist())
            batches.append(batch)
        return batches


class RandomBatchSampler(EpochBatchSampler):
    """Uniformly shuffled batches (data.sampler=random), each rank a disjoint shard of the epoch's
    permutation. With ``drop_last`` every batch is full; without it, the permutation is wrapped so
    all ranks still yield the same number of batches (the last may be smaller)."""

    kind = "random"

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        if num_samples < 1:
            raise TBPSError("the random sampler got no training samples")
        self.num_samples = int(num_samples)
        self.drop_last = bool(drop_last)
        if drop_last:
            self._per_rank = num_samples // (batch_size * world_size) * batch_size
        else:
            self._per_rank = math.ceil(num_samples / world_size)

    def __len__(self) -> int:
        return math.ceil(self._per_rank / self.batch_size)

    def _layout(self) -> dict[str, int]:
        return {**super()._layout(), "num_samples": self.num_samples}

    def _make_batches(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([_seed_int(self.seed), epoch]).permutation(self.num_samples)
        total = self._per_rank * self.world_size
        if total > len(perm):
            perm = np.resize(perm, total)  # wraps around
        mine = perm[:total][self.rank :: self.world_size].tolist()
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]


# ----------------------------------------------------------------------------- loader

class _SeededBatches:
    """Wraps a batch sampler so each index travels with its own augmentation seed, derived from
    (seed, epoch, rank, batch number): augmentations then do not depend on the worker count and
    repeat exactly after a resume."""

    def __init__(self, sampler: EpochBatchSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = _seed_int(seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for number, batch in s.iter_numbered():
            seeds = np.random.SeedSequence([self.seed, s.epoch, s.rank, number]).generate_state(len(batch))
            yield list(zip(batch, seeds.tolist()))


class TrainLoader(DataLoader):
    """A DataLoader that tells its sampler each time a batch reaches the training loop, so
    ``sampler.state_dict()`` is exact mid-epoch even with prefetching workers."""

    def __iter__(self):
        progress: EpochBatchSampler = self.batch_sampler.sampler
        progress._counted_by_loader = True
        for batch in super().__iter__():
            progress.mark_consumed()
            yield batch


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a worker from the seed torch gave it (itself derived from
    the loader's generator), for any transform that uses them."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


def build_train_loader(cfg, dataset, tokenizer, rank: int = 0, world_size: int = 1):
    """``(loader, sampler)`` for training: this rank's share of the (image, caption) pairs.

    ``cfg.data.batch_size`` is the global batch; each of ``world_size`` processes loads
    ``batch_size // world_size``. Call ``sampler.set_epoch(e)`` before each epoch and save
    ``sampler.state_dict()`` in checkpoints.
    """
    from tbps.data.transforms import build_image_transform

    data = cfg.data
    if world_size < 1 or data.batch_size % world_size:
        raise TBPSError(
            f"data.batch_size={data.batch_size} must be divisible by the number of processes ({world_size})"
        )
    per_rank = data.batch_size // world_size
    records = dataset.train if hasattr(dataset, "train") else list(dataset)
    transform = build_image_transform(data, train=True)  # reads image_size, augment and flip
    pairs = TrainPairs(records, tokenizer, transform, positives=int(getattr(data, "positives", 0)))
    seed = int(cfg.train.seed)
    if data.sampler == "identity":
        sampler: EpochBatchSampler = IdentitySampler(
            pairs.pids, per_rank, data.num_instances, seed=seed, rank=rank, world_size=world_size
        )
    elif data.sampler == "random":
        sampler = RandomBatchSampler(len(pairs), per_rank, seed=seed, rank=rank, world_size=world_size)
    else:
        raise TBPSError(f"data.sampler={data.sampler!r}: choose identity or random")
    num_workers = int(data.num_workers)
    if num_workers < 0:
        raise TBPSError(f"data.num_workers must be 0 or more, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(_seed_int(seed * 1000 + rank))
    loader = TrainLoader(
        pairs,
        batch_sampler=_SeededBatches(sampler, seed),
        collate_fn=collate_train,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )
    return loader, sampler
