"""The one training loop and the one prediction pass every experiment uses.

Both take a :class:`harness.Task`, so they run on the same batches as
InfluenceEmbedder. Trained weights are cached by :mod:`harness.cache`
(``Cache.trained`` / ``cached_training``), keyed from the initial weights, the data and
the :class:`TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harness.batching import eval_mode, move_to
from harness.errors import InputError
from harness.task import ClassificationTask, Task


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_model`."""

    epochs: int = field(default=5, metadata={"help": "Passes over the training loader."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (AdamW) or L2 (SGD)."})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' or 'sgd' (momentum 0.9)."})
    schedule: str = field(default="constant", metadata={
        "help": "'constant' keeps lr; 'onecycle' is torch's OneCycleLR stepped every batch: lr/25 rising to lr "
                "over the first 30% of steps, then cosine annealing to lr/2.5e5 (momentum, or Adam's beta1, "
                "cycled 0.95 -> 0.85 -> 0.95); it needs a loader with a length."})
    seed: int = field(default=0, metadata={"help": "Seeds torch before training (init of new layers, dropout)."})
    device: str = field(default="cpu", metadata={"help": "Training device, e.g. 'cpu' or 'cuda'."})
    trainable: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Parameter-name prefixes to train; None trains every parameter."}
    )


def train_model(
    model: nn.Module, loader: Iterable, config: TrainConfig, task: Task | None = None, progress: bool = True,
    on_epoch: Callable[[int, nn.Module, float], None] | None = None,
) -> nn.Module:
    """Minimises the task's mean loss over ``loader`` for ``config.epochs`` epochs.

    ``on_epoch(epoch, model, mean_loss)`` (optional) is called after every epoch (1-based)
    with the model in eval mode and the epoch's mean training loss, e.g. to record a
    learning curve. Returns the model in eval mode. Raises ``InputError`` if the loss
    becomes non-finite.
    """
    task = task or ClassificationTask()
    if config.epochs < 1:
        raise InputError(f"epochs must be >= 1; got {config.epochs}")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device)
    params = [
        p
        for n, p in model.named_parameters()
        if config.trainable is None or any(n.startswith(prefix) for prefix in config.trainable)
    ]
    if not params:
        raise InputError(f"no parameter matches trainable={config.trainable}")
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        raise InputError(f"optimizer must be 'adamw' or 'sgd'; got {config.optimizer!r}")
    scheduler = _scheduler(opt, config, loader)
    model.train()
    for epoch in range(config.epochs):
        bar = tqdm(loader, desc=f"train epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        total, batches = 0.0, 0
        for batch in bar:
            batch = move_to(task.model_batch(batch), device)
            loss = task.loss(model, batch).mean()
            if not torch.isfinite(loss):
                raise InputError(f"training loss became non-finite in epoch {epoch + 1}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            value = loss.item()
            total, batches = total + value, batches + 1
            bar.set_postfix(loss=f"{value:.3f}")
        if on_epoch is not None:
            with eval_mode(model):
                on_epoch(epoch + 1, model, total / max(batches, 1))
    return model.eval()


def _scheduler(opt: torch.optim.Optimizer, config: TrainConfig, loader: Iterable):
    if config.schedule == "constant":
        return None
    if config.schedule != "onecycle":
        raise InputError(f"schedule must be 'constant' or 'onecycle'; got {config.schedule!r}")
    try:
        steps = len(loader)
    except TypeError:
        raise InputError("schedule 'onecycle' needs a loader with a length (its steps per epoch)") from None
    if steps < 1:
        raise InputError("schedule 'onecycle' needs a non-empty loader")
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps)


@dataclass
class Predictions:
    """Output of :func:`predict`: logits (N, C), targets (N,), and derived views."""

    logits: np.ndarray
    targets: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.targets

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, task: Task | None = None, device: str | torch.device = "cpu", progress: bool = True
) -> Predictions:
    """One pass in eval mode: logits and targets of every example, in loader order."""
    task = task or ClassificationTask()
    device = torch.device(device)
    logits, targets = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            batch = move_to(task.model_batch(batch), device)
            logits.append(task.logits(model, batch).float().cpu())
            targets.append(task.targets(batch).cpu())
    if not logits:
        raise InputError("empty loader: nothing to predict")
    return Predictions(torch.cat(logits).numpy(), torch.cat(targets).numpy())

