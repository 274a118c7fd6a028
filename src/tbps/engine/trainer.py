"""The one training loop every method uses.

It owns what the reference code gets wrong: model selection on val (never silently on test), an
image check before the first step, atomic ``last.pt``/``best.pt`` and exact ``--resume`` (optimizer,
scheduler, scaler, sampler and every RNG), and DDP under ``torchrun`` with the identity sampler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tbps.config import Config, config_from_dict, save_config
from tbps.errors import TBPSError
from tbps.engine import distributed as D
from tbps.engine.checkpoint import (capture_rng_state, fine_tuning_tokenizer, load_model_weights, read_checkpoint,
                                    restore_rng_state, save_checkpoint, unwrap)
from tbps.engine.optim import build_optimizer, build_scheduler
from tbps.inference import amp_dtype
from tbps.io import remove_stale_temp_files, write_text_atomic

log = logging.getLogger("tbps.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (mid-epoch resume)
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


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


class Trainer:
    def __init__(self, cfg: Config, output_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False) -> None:
        from tbps.data.datasets import check_images, load_dataset
        from tbps.data.loader import build_train_loader
        from tbps.data.tokenizers import build_tokenizer
        from tbps.data.transforms import build_image_transform
        from tbps.models import build_model

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
            saved = config_from_dict(ckpt["config"])
            # the run continues as it was configured; only the step budget may be extended
            saved.train.max_steps = cfg.train.max_steps
            saved.train.epochs = max(saved.train.epochs, cfg.train.epochs)
            cfg = saved
        self.cfg = cfg
        seed_everything(cfg.train.seed + self.dist.rank)

        self.dataset = load_dataset(cfg.data.dataset, cfg.data.root)
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
        self.tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
        self.num_classes = self.dataset.num_train_ids
        model = build_model(cfg, self.num_classes, self.tokenizer, load_pretrained=ckpt is None)
        if init is not None:
            load_model_weights(model, init["model"], source=cfg.train.init_checkpoint)
        self.model = model.to(self.device)
        self.loader, self.sampler = build_train_loader(cfg, self.dataset, self.tokenizer,
                                                       rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise TBPSError(f"data.batch_size={cfg.data.batch_size} is larger than the training set allows "
                            "(no full batch per epoch); lower it")
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.autocast_dtype = amp_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.state = TrainState()
        if ckpt is not None:
            self._restore(ckpt)
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.eval_records = self._eval_records()
        self.image_transform = build_image_transform(cfg.data.image_size, train=False)
        self.writer = self._tensorboard()

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

    def _tensorboard(self):
        if not (self.cfg.train.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TBPSError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.out / "tensorboard"))

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
    def _save(self, name: str) -> None:
        rng = {str(self.dist.rank): capture_rng_state()}
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = {k: v for part in gathered for k, v in part.items()}
        if not self.dist.is_main:
            return
        st = self.state
        save_checkpoint(
            self.out / name, model=self.model, cfg=self.cfg, num_classes=self.num_classes,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            sampler=self.sampler.state_dict(), rng_per_rank=rng,
            train_state={"epoch": st.epoch, "step": st.step, "batch_in_epoch": st.batch_in_epoch,
                         "best_metric": st.best_metric, "best_epoch": st.best_epoch},
            dataset=self.cfg.data.dataset,
        )

    def _log_row(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        from tbps.engine.evaluator import append_metrics_jsonl

        append_metrics_jsonl(self.out / "metrics.jsonl", row)
        self.state.history.append(row)
        if self.writer is not None:
            prefix = row.get("split", "train")
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
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
        self.state.step += 1
        row = {"loss": float(total.detach())}
        row.update({k: float(v.detach()) for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1})
        return row

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
        cfg, st = self.cfg, self.state
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            params = sum(p.numel() for p in self.model.parameters())
            log.info("training %s on %s: %d pairs, %d ids, %d steps/epoch, %d epochs, %.1fM params, device %s%s",
                     cfg.model.name, cfg.data.dataset, len(self.loader.dataset), self.num_classes,
                     self.steps_per_epoch, cfg.train.epochs, params / 1e6, self.device,
                     f" x{self.dist.world_size}" if self.dist.enabled else "")
        max_steps = cfg.train.max_steps
        stopped_early = False
        while st.epoch < cfg.train.epochs and not stopped_early:
            epoch = st.epoch
            self.sampler.set_epoch(epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=st.batch_in_epoch, disable=not self.dist.is_main,
                       desc=f"epoch {epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True, leave=False)
            t0, pairs = time.perf_counter(), 0
            running: dict[str, float] = {}
            for batch in self.loader:
                row = self.train_step(batch)
                st.batch_in_epoch += 1
                pairs += int(batch["images"].shape[0]) * self.dist.world_size
                for k, v in row.items():
                    running[k] = running.get(k, 0.0) * 0.9 + v * 0.1 if k in running else v
                rate = pairs / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{running['loss']:.3f}", pairs_s=f"{rate:.0f}")
                bar.update(1)
                if st.step % cfg.train.log_every == 0 or st.step == 1:
                    self._log_row({"split": "train", "epoch": epoch + st.batch_in_epoch / self.steps_per_epoch,
                                   "step": st.step, "lr": self.optimizer.param_groups[0]["lr"],
                                   "pairs_per_s": rate, **row})
                if max_steps and st.step >= max_steps:
                    stopped_early = True
                    break
            bar.close()
            if st.batch_in_epoch >= self.steps_per_epoch:  # also when the step budget ends on the last batch
                st.epoch += 1
                st.batch_in_epoch = 0
            if self.dist.is_main:
                log.info("epoch %d: loss %.4f, %.0f pairs/s", epoch + 1, running.get("loss", float("nan")),
                         pairs / max(1e-9, time.perf_counter() - t0))
            should_eval = stopped_early or st.epoch == cfg.train.epochs or (
                cfg.train.eval_every > 0 and st.epoch % cfg.train.eval_every == 0)
            metrics = self.validate() if should_eval else None
            if metrics is not None:
                self._log_row({"split": cfg.train.eval_split, "epoch": st.epoch, "step": st.step,
                               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
                if self.dist.is_main:
                    log.info("%s R1 %.3f R5 %.3f R10 %.3f mAP %.3f mINP %.3f", cfg.train.eval_split,
                             metrics["R1"], metrics["R5"], metrics["R10"], metrics["mAP"], metrics["mINP"])
            improved = metrics is not None and metrics["R1"] > st.best_metric
            if improved:
                st.best_metric, st.best_epoch = float(metrics["R1"]), st.epoch
            # best.pt first: last.pt must never record a best score that no file holds
            if self.dist.is_main and (improved or self.eval_records is None):
                save_checkpoint(self.out / "best.pt", model=self.model, cfg=cfg, num_classes=self.num_classes,
                                best_metric=st.best_metric, epoch=st.epoch, step=st.step)
            self._save("last.pt")
        if self.writer is not None:
            self.writer.close()
        D.barrier(self.dist)
        summary = {"output_dir": str(self.out), "epochs": st.epoch, "steps": st.step,
                   "best_R1": st.best_metric if st.best_metric >= 0 else None, "best_epoch": st.best_epoch,
                   "param_checksum": float(sum(p.detach().double().sum() for p in self.model.parameters())),
                   "rank": self.dist.rank, "world_size": self.dist.world_size}
        if self.dist.is_main:
            write_text_atomic(self.out / "train_summary.json", json.dumps(summary, indent=2))
        return summary


def train(cfg: Config, output_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``output_dir``; with ``resume`` continue exactly from its ``last.pt``.

    A fresh run refuses a folder that holds another run unless ``overwrite`` (which deletes it)."""
    trainer = Trainer(cfg, output_dir=output_dir, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        D.cleanup(trainer.dist)
