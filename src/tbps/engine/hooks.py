"""The standard hooks of ``tbps train`` (``Trainer.build_hooks`` registers them in this order).

- :class:`MaxSteps`: stop after ``train.max_steps`` optimiser steps;
- :class:`ProgressBar`: the per-epoch bar (loss, pairs/s) and the "epoch N: loss" line;
- :class:`TrainMetrics`: a training row every ``train.log_every`` steps (and at step 1);
- :class:`MetricsWriter`: every logged row to ``metrics.jsonl`` and, with ``train.tensorboard``, TensorBoard;
- :class:`Evaluation`: validation every ``train.eval_every`` epochs, at the last epoch and at a stop;
  best-model tracking on R1, and ``best.pt``;
- :class:`Checkpointer`: ``last.pt`` after every epoch (and at a stop), for exact ``--resume``.

``Evaluation`` comes before ``Checkpointer``: ``best.pt`` is written first, so ``last.pt`` never
records a best score that no file holds. They call the trainer's one save path,
``Trainer.save_checkpoint``. The trainer's attributes they read are listed in ``Trainer``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tbps.engine.train_loop import HookBase
from tbps.errors import TBPSError

log = logging.getLogger("tbps.train")


class MaxSteps(HookBase):
    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def after_step(self) -> None:
        if self.max_steps and self.trainer.state.step >= self.max_steps:
            self.trainer.request_stop()


class ProgressBar(HookBase):
    """A tqdm bar per epoch on the main process, with a running loss (EMA, 0.9) and pairs/s."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.running: dict[str, float] = {}

    def before_epoch(self) -> None:
        t = self.trainer
        self.running = {}
        self.bar = tqdm(total=t.steps_per_epoch, initial=t.state.batch_in_epoch, disable=not self.enabled,
                        desc=f"epoch {t.epoch_index + 1}/{t.max_epochs}", dynamic_ncols=True, leave=False)

    def after_step(self) -> None:
        for key, value in self.trainer.outputs.items():
            self.running[key] = self.running[key] * 0.9 + value * 0.1 if key in self.running else value
        self.bar.set_postfix(loss=f"{self.running['loss']:.3f}", pairs_s=f"{self.trainer.pairs_per_s:.0f}")
        self.bar.update(1)

    def after_epoch(self) -> None:
        self._close()
        if self.enabled:
            log.info("epoch %d: loss %.4f, %.0f pairs/s", self.trainer.epoch_index + 1,
                     self.running.get("loss", float("nan")), self.trainer.throughput())

    def after_train(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainMetrics(HookBase):
    """Logs ``{"split": "train", "epoch", "step", "lr", "pairs_per_s", "loss", ...}`` every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        st = t.state
        if st.step % self.every == 0 or st.step == 1:
            t.log_row({"split": "train", "epoch": t.epoch_index + st.batch_in_epoch / t.steps_per_epoch,
                       "step": st.step, "lr": t.optimizer.param_groups[0]["lr"], "pairs_per_s": t.pairs_per_s,
                       **t.outputs})


class MetricsWriter(HookBase):
    """Every row the trainer logs, as one JSON line of ``path`` and (optionally) TensorBoard scalars
    ``<split>/<key>`` at the row's step. Registered on the main process only."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TBPSError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def on_log(self, row: dict[str, Any]) -> None:
        from tbps.engine.evaluator import append_metrics_jsonl

        append_metrics_jsonl(self.path, row)
        if self.writer is not None:
            prefix = row.get("split", "train")
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Evaluation(HookBase):
    """Validation on ``train.eval_split`` and best-model tracking: ``best.pt`` holds the epoch with the
    highest R1 (the latest epoch when there is no selection split)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_epoch(self) -> None:
        t = self.trainer
        st, cfg = t.state, t.cfg
        should_eval = t.stop_requested or st.epoch == t.max_epochs or (
            self.every > 0 and st.epoch % self.every == 0)
        metrics = t.validate() if should_eval else None
        if metrics is not None:
            t.log_row({"split": cfg.train.eval_split, "epoch": st.epoch, "step": st.step,
                       **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            if t.dist.is_main:
                log.info("%s R1 %.3f R5 %.3f R10 %.3f mAP %.3f mINP %.3f", cfg.train.eval_split,
                         metrics["R1"], metrics["R5"], metrics["R10"], metrics["mAP"], metrics["mINP"])
        improved = metrics is not None and metrics["R1"] > st.best_metric
        if improved:
            st.best_metric, st.best_epoch = float(metrics["R1"]), st.epoch
        if improved or t.eval_records is None:
            t.save_checkpoint("best.pt", resumable=False)


class Checkpointer(HookBase):
    """``last.pt`` (weights and every piece of training state) at the end of every epoch and at a stop."""

    def after_epoch(self) -> None:
        self.trainer.save_checkpoint("last.pt", resumable=True)
