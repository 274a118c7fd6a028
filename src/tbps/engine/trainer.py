"""The one training loop every method uses.

It owns what the reference code gets wrong: model selection on val (never silently on test), an
image check before the first step, atomic ``last.pt``/``best.pt`` and exact ``--resume`` (optimizer,
scheduler, scaler, sampler and every RNG), and DDP under ``torchrun`` with the identity sampler.

``Trainer`` is a :class:`~tbps.engine.train_loop.TrainerBase`: ``run_step`` is one optimiser step,
and the progress bar, metrics, evaluation with best-model tracking, checkpoints and the step budget
are hooks (``tbps.engine.hooks``). To change one part, subclass and override a ``build_*`` method
(dataset, tokenizer, model, loader, optimizer, scheduler, hooks), or pass your own hooks:
``train(cfg, hooks=[MyHook()])``. A model's ``on_step_end()`` (``TBPSModel``: nothing by default) runs
after every optimiser step (TextReID's momentum update of its key encoders), never in a forward pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from tbps.config import Config, save_config
from tbps.errors import TBPSError
from tbps.engine import distributed as D
from tbps.engine.checkpoint import (capture_rng_state, fine_tuning_tokenizer, load_model_weights, read_checkpoint,
                                    restore_rng_state, save_checkpoint, saved_config, unwrap)
from tbps.engine import optim
from tbps.engine.hooks import Checkpointer, Evaluation, MaxSteps, MetricsWriter, ProgressBar, TrainMetrics
from tbps.engine.train_loop import HookBase, TrainerBase, TrainState
from tbps.inference import amp_dtype
from tbps.io import remove_stale_temp_files, write_text_atomic

log = logging.getLogger("tbps.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "train_summary.json")


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to start a fresh run over an old one (its log would be appended to and its ``best.pt``
    replaced), unless ``overwrite``; remove temporary files that a killed run left behind.

    Every rank checks (so all of them stop together); only the ``main`` one deletes."""
    if out.exists() and not out.is_dir():
        raise TBPSError(f"{out}: the output folder is a file")
    if not out.is_dir():
        return
    if main:
        remove_stale_temp_files(out)
    if resume:
        return
    old = [name for name in RUN_FILES if (out / name).exists()]
    if old and not overwrite:
        raise TBPSError(f"{out} already holds a run ({', '.join(old)}): continue it with --resume, choose "
                        "another --output-dir, or pass --overwrite to replace it")
    if not main:
        return
    for name in old:
        (out / name).unlink()
    if overwrite and (out / "tensorboard").is_dir():
        import shutil

        shutil.rmtree(out / "tensorboard")


class Trainer(TrainerBase):
    """``tbps train``: set-up from a config, one optimiser step per batch, the standard hooks.

    Hooks read: ``cfg``, ``out``, ``dist``, ``device``, ``model`` (unwrapped), ``optimizer``,
    ``scheduler``, ``steps_per_epoch``, ``eval_records``, ``pairs_per_s`` (this epoch, at the last
    step), ``throughput()`` (now), ``validate()`` and ``save_checkpoint(name, resumable)``.
    """

    def __init__(self, cfg: Config, output_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, hooks: list[HookBase] | None = None) -> None:
        from tbps.data.datasets import check_images
        from tbps.data.transforms import build_image_transform

        super().__init__()
        self.out = Path(output_dir or cfg.train.output_dir)
        self.dist = D.init_distributed(cfg.train.device)
        self.device = self.dist.device
        last = self.out / "last.pt"
        ckpt = None
        prepare_output_dir(self.out, resume, overwrite, main=self.dist.is_main)
        if resume:
            if not last.is_file():
                raise TBPSError(f"{last}: nothing to resume from (no last.pt in the output folder)")
            ckpt = read_checkpoint(last)
            saved = saved_config(ckpt, last)
            # the run continues as it was configured; only the step budget may be extended
            saved.train.max_steps = cfg.train.max_steps
            saved.train.epochs = max(saved.train.epochs, cfg.train.epochs)
            cfg = saved
        self.cfg = cfg
        seed_everything(cfg.train.seed + self.dist.rank)

        self.dataset = self.build_dataset(cfg)
        if not self.dataset.train:
            raise TBPSError(f"{self.dataset.annotation_file}: the train split is empty")
        if cfg.data.check != "off" and self.dist.is_main:
            report = check_images(self.dataset, decode=cfg.data.check == "decode", progress=False)
            if not report.ok:
                raise TBPSError(report.summary(limit=5).replace("\n", "; "))
        init = read_checkpoint(cfg.train.init_checkpoint) if cfg.train.init_checkpoint and ckpt is None else None
        if init is not None:
            tokenizer_name = fine_tuning_tokenizer(cfg.data.tokenizer, init)
            if tokenizer_name != cfg.data.tokenizer:
                if self.dist.is_main:
                    log.info("%s: data.tokenizer=%s, the layout of its weights (written before <|mask|> took "
                             "id 49405)", cfg.train.init_checkpoint, tokenizer_name)
                cfg = replace(cfg, data=replace(cfg.data, tokenizer=tokenizer_name))
                self.cfg = cfg
        self.tokenizer = self.build_tokenizer(cfg)
        self.num_classes = self.dataset.num_train_ids
        model = self.build_model(cfg, load_pretrained=ckpt is None)
        if init is not None:
            load_model_weights(model, init["model"], source=cfg.train.init_checkpoint)
        self.model = model.to(self.device)
        self.loader, self.sampler = self.build_train_loader(cfg)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise TBPSError(f"data.batch_size={cfg.data.batch_size} is larger than the training set allows "
                            "(no full batch per epoch); lower it")
        self.max_epochs = cfg.train.epochs
        self.optimizer = self.build_optimizer(cfg, self.model)
        self.scheduler = self.build_scheduler(cfg, self.optimizer)
        self.autocast_dtype = amp_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        if ckpt is not None:
            self._restore(ckpt)
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.eval_records = self._eval_records()
        self.image_transform = build_image_transform(cfg.data.image_size, train=False)
        self.pairs_per_s = 0.0
        self._epoch_start, self._epoch_pairs = time.perf_counter(), 0
        self.register_hooks(self.build_hooks())
        self.register_hooks(hooks or [])

    # ------------------------------------------------------------------ parts to override
    def build_dataset(self, cfg: Config):
        from tbps.data.datasets import load_dataset

        return load_dataset(cfg.data.dataset, cfg.data.root)

    def build_tokenizer(self, cfg: Config):
        from tbps.data.tokenizers import build_tokenizer

        return build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)

    def build_model(self, cfg: Config, load_pretrained: bool) -> torch.nn.Module:
        """The method (on the CPU; the trainer moves it). ``load_pretrained`` is False on resume."""
        from tbps.models import build_model

        return build_model(cfg, self.num_classes, self.tokenizer, load_pretrained=load_pretrained)

    def build_train_loader(self, cfg: Config):
        """``(DataLoader, sampler)``; the sampler needs ``set_epoch``, ``state_dict`` and ``len``."""
        from tbps.data.loader import build_train_loader

        return build_train_loader(cfg, self.dataset, self.tokenizer, rank=self.dist.rank,
                                  world_size=self.dist.world_size)

    def build_optimizer(self, cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
        return optim.build_optimizer(model, cfg.optim)

    def build_scheduler(self, cfg: Config, optimizer: torch.optim.Optimizer):
        return optim.build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)

    def build_hooks(self) -> list[HookBase]:
        """The standard hooks, in order (``Evaluation`` before ``Checkpointer``: best.pt first)."""
        main = self.dist.is_main
        tensorboard = self.out / "tensorboard" if self.cfg.train.tensorboard and main else None
        return [MaxSteps(self.cfg.train.max_steps),
                ProgressBar(enabled=main),
                TrainMetrics(self.cfg.train.log_every),
                MetricsWriter(self.out / "metrics.jsonl", tensorboard) if main else None,
                Evaluation(self.cfg.train.eval_every),
                Checkpointer()]

    # ------------------------------------------------------------------ set-up helpers
    def _eval_records(self):
        split = self.cfg.train.eval_split
        if split == "none":
            return None
        if split == "val" and not self.dataset.val:
            if self.dist.is_main:
                log.warning("%s has no val split (as ICFG-PEDES): no model selection, best.pt is the last "
                            "epoch; pass train.eval_split=test to select on test knowingly",
                            self.cfg.data.dataset)
            return None
        if split == "test" and self.dist.is_main:
            log.warning("selecting the model on the TEST split (train.eval_split=test): its numbers are not "
                        "a fair held-out estimate")
        if split not in ("val", "test"):
            raise TBPSError(f"train.eval_split={split!r}: choose val, test or none")
        return self.dataset.split(split)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        load_model_weights(self.model, ckpt["model"], source=str(self.out / "last.pt"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        st = ckpt["train_state"]
        self.state = TrainState(epoch=st["epoch"], step=st["step"], batch_in_epoch=st["batch_in_epoch"],
                                best_metric=st["best_metric"], best_epoch=st["best_epoch"])
        if self.state.batch_in_epoch >= self.steps_per_epoch:  # stopped at an epoch's last batch (old runs)
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        if self.dist.is_main:
            self._check_best()
            self._drop_rows_after(self.state.step)
        rng = ckpt.get("rng_per_rank", {}).get(str(self.dist.rank))
        if rng is not None:
            restore_rng_state(rng)
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d, step %d", self.out / "last.pt", self.state.epoch, self.state.step)

    def _check_best(self) -> None:
        """``last.pt`` may claim a best score only if ``best.pt`` holds it; otherwise forget the claim,
        so that the next evaluation writes ``best.pt`` again (a kill or a full disk between the two)."""
        st = self.state
        if st.best_metric < 0 or self.eval_split_is_none():
            return
        best = self.out / "best.pt"
        reason = None
        if not best.is_file():
            reason = "is missing"
        else:
            try:
                saved = read_checkpoint(best)
                matches = (float(saved.get("best_metric", -2)) == st.best_metric
                           and int(saved.get("epoch", -2)) == st.best_epoch)
                ahead = int(saved.get("step", -1)) > st.step  # written just before a kill: redone below
                if not (matches or ahead):
                    reason = (f"holds R1 {saved.get('best_metric')} of epoch {saved.get('epoch')}, not "
                              f"R1 {st.best_metric} of epoch {st.best_epoch}")
            except TBPSError as exc:  # truncated or foreign file
                reason = f"is unreadable ({exc})"
        if reason is not None:
            log.warning("%s %s although last.pt records it: the next evaluation writes it again", best, reason)
            st.best_metric, st.best_epoch = -1.0, -1

    def eval_split_is_none(self) -> bool:
        return self.cfg.train.eval_split == "none"

    def _drop_rows_after(self, step: int) -> None:
        """Remove ``metrics.jsonl`` rows of steps after the resumed one: they are redone, once each."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(kept))

    # ------------------------------------------------------------------ checkpoints and logs
    def save_checkpoint(self, name: str, resumable: bool) -> None:
        """The one save path. ``resumable`` (``last.pt``): weights plus every piece of training state,
        RNGs of all ranks gathered (every rank must call it); otherwise (``best.pt``) the weights with
        the best score, epoch and step, written by the main process only."""
        st = self.state
        if not resumable:
            if self.dist.is_main:
                save_checkpoint(self.out / name, model=self.model, cfg=self.cfg, num_classes=self.num_classes,
                                best_metric=st.best_metric, epoch=st.epoch, step=st.step)
            return
        rng = {str(self.dist.rank): capture_rng_state()}
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = {k: v for part in gathered for k, v in part.items()}
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.out / name, model=self.model, cfg=self.cfg, num_classes=self.num_classes,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            sampler=self.sampler.state_dict(), rng_per_rank=rng,
            train_state={"epoch": st.epoch, "step": st.step, "batch_in_epoch": st.batch_in_epoch,
                         "best_metric": st.best_metric, "best_epoch": st.best_epoch},
            dataset=self.cfg.data.dataset,
        )

    def log_row(self, row: dict[str, Any]) -> None:
        """A metrics row: to every hook's ``on_log`` (``metrics.jsonl``, TensorBoard), main process only."""
        if self.dist.is_main:
            super().log_row(row)

    # ------------------------------------------------------------------ loop
    def run_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.ddp_model.train()
        batch = move_batch(batch, self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            outputs = self.ddp_model(batch)
        losses = {k: v for k, v in outputs.items() if k.startswith("loss_")}
        if not losses:
            raise TBPSError(f"method {self.cfg.model.name!r} returned no loss_* terms")
        total = sum(v.float() for v in losses.values())
        if not torch.isfinite(total):
            raise TBPSError(f"loss became {total.item()} at step {self.state.step} (lower optim.lr, or "
                            "use train.amp=off / optim.grad_clip=1.0)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.on_step_end()  # the method's own per-step update (TextReID's momentum encoders)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self._epoch_pairs += int(batch["images"].shape[0]) * self.dist.world_size
        self.pairs_per_s = self.throughput()
        row = {"loss": float(total.detach())}
        row.update({k: float(v.detach()) for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1})
        return row

    def throughput(self) -> float:
        """Training pairs per second since the epoch (or the resumed part of it) began, all ranks."""
        return self._epoch_pairs / max(1e-9, time.perf_counter() - self._epoch_start)

    def epoch_batches(self):
        return self.loader

    def before_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch_index)
        self._epoch_start, self._epoch_pairs = time.perf_counter(), 0
        super().before_epoch()

    def end_epoch(self) -> None:
        st = self.state
        if st.batch_in_epoch >= self.steps_per_epoch:  # also when the step budget ends on the last batch
            st.epoch += 1
            st.batch_in_epoch = 0

    def before_train(self) -> None:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            params = sum(p.numel() for p in self.model.parameters())
            log.info("training %s on %s: %d pairs, %d ids, %d steps/epoch, %d epochs, %.1fM params, device %s%s",
                     cfg.model.name, cfg.data.dataset, len(self.loader.dataset), self.num_classes,
                     self.steps_per_epoch, cfg.train.epochs, params / 1e6, self.device,
                     f" x{self.dist.world_size}" if self.dist.enabled else "")
        super().before_train()

    def validate(self) -> dict[str, float] | None:
        """Rank 0 evaluates on the selection split; every rank gets the result.

        Every RNG is restored afterwards, so whether and when validation runs never changes the
        training randomness (a resumed run matches an uninterrupted one exactly).
        """
        result = None
        if self.eval_records is not None and self.dist.is_main:
            from tbps.engine.evaluator import Evaluator

            rng = capture_rng_state()
            evaluator = Evaluator(unwrap(self.model), self.eval_records, self.tokenizer, self.image_transform,
                                  self.cfg.eval, self.device, progress=False,
                                  num_workers=min(self.cfg.data.num_workers, 2))
            result = evaluator.evaluate()
            restore_rng_state(rng)
        return D.broadcast_object(result, self.dist)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or the step budget); returns the run's summary (also train_summary.json)."""
        self.train()
        st = self.state
        D.barrier(self.dist)
        summary = {"output_dir": str(self.out), "epochs": st.epoch, "steps": st.step,
                   "best_R1": st.best_metric if st.best_metric >= 0 else None, "best_epoch": st.best_epoch,
                   "param_checksum": float(sum(p.detach().double().sum() for p in self.model.parameters())),
                   "rank": self.dist.rank, "world_size": self.dist.world_size}
        if self.dist.is_main:
            write_text_atomic(self.out / "train_summary.json", json.dumps(summary, indent=2))
        return summary


def train(cfg: Config, output_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, hooks: list[HookBase] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; with ``resume`` continue exactly from its ``last.pt``.

    A fresh run refuses a folder that holds another run unless ``overwrite`` (which deletes it).
    ``hooks`` run after the standard ones (``tbps.engine.train_loop.HookBase``)."""
    trainer = Trainer(cfg, output_dir=output_dir, resume=resume, overwrite=overwrite, hooks=hooks)
    try:
        return trainer.fit()
    finally:
        D.cleanup(trainer.dist)
