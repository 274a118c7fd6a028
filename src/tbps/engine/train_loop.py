"""The training loop and its hooks, as fast-reid's ``TrainerBase`` / ``HookBase``.

The loop knows nothing about logging, evaluation or checkpoints: it calls ``run_step`` on each batch
and lets hooks act around it::

    before_train
    per epoch:   before_epoch
                 per batch:  before_step, run_step(batch), after_step
                 after_epoch
    after_train                    (also when a step fails, in a ``finally``)

Hooks run in the order they were registered. ``on_log(row)`` sees every metrics row the trainer
logs (training rows and evaluation rows), so a writer of another format is one more hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (mid-epoch resume)
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


class HookBase:
    """Override any of these; ``self.trainer`` is set when the hook is registered.

    What a hook may read: ``trainer.state`` (epoch, step, batch_in_epoch, best), ``trainer.outputs``
    (the last ``run_step`` row: ``loss`` and every scalar the model returned), ``trainer.epoch_index``
    (the epoch the loop is in, 0-based), and whatever the concrete trainer exposes (model, optimizer)."""

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def on_log(self, row: dict[str, Any]) -> None:
        """A metrics row the trainer logged (``trainer.log_row``)."""


class TrainerBase:
    """An epoch loop over ``epoch_batches()`` calling ``run_step``; subclasses supply both."""

    def __init__(self) -> None:
        self.hooks: list[HookBase] = []
        self.state = TrainState()
        self.max_epochs = 0
        self.epoch_index = 0
        self.outputs: dict[str, float] = {}
        self.stop_requested = False

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        for hook in hooks:
            if hook is None:
                continue
            hook.trainer = self
            self.hooks.append(hook)

    def request_stop(self) -> None:
        """End training after the current step (the epoch's hooks still run)."""
        self.stop_requested = True

    def log_row(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        for hook in self.hooks:
            hook.on_log(row)

    # ------------------------------------------------------------------ to supply
    def epoch_batches(self) -> Iterable[Any]:
        raise NotImplementedError

    def run_step(self, batch: Any) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the scalars to log (at least ``loss``)."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Bookkeeping after an epoch's last batch (or a stop), before ``after_epoch`` hooks."""

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        try:
            self.before_train()
            while self.state.epoch < self.max_epochs and not self.stop_requested:
                self.epoch_index = self.state.epoch
                self.before_epoch()
                for batch in self.epoch_batches():
                    self.before_step()
                    self.outputs = self.run_step(batch)
                    self.after_step()
                    if self.stop_requested:
                        break
                self.end_epoch()
                self.after_epoch()
        finally:
            self.after_train()

    def call_hooks(self, event: str) -> None:
        """``hook.<event>()`` for every hook, in registration order."""
        for hook in self.hooks:
            getattr(hook, event)()

    # a subclass adds its own work around these (calling super())
    def before_train(self) -> None:
        self.call_hooks("before_train")

    def after_train(self) -> None:
        self.call_hooks("after_train")

    def before_epoch(self) -> None:
        self.call_hooks("before_epoch")

    def after_epoch(self) -> None:
        self.call_hooks("after_epoch")

    def before_step(self) -> None:
        self.call_hooks("before_step")

    def after_step(self) -> None:
        self.call_hooks("after_step")
