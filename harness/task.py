"""Tasks: how a batch turns into per-example losses.

InfluenceEmbedder never looks inside a batch itself. A task says how to run the
model on a batch and how to score the output, so any batch layout (tuples of
tensors, Hugging Face dicts with attention masks, cached features) works.

Per-example gradients are computed with ``torch.func.vmap``: the task's
:meth:`Task.loss` is called on a batch of *one* example, built by slicing every
tensor leaf of the batch along dimension 0. A batch may therefore hold only
tensors whose first dimension is the example dimension (use
:meth:`Task.model_batch` to drop anything else, e.g. raw strings).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.errors import InputError

ModelFn = Callable[..., torch.Tensor]


class Task:
    """Maps a batch to one loss per example.

    Override :meth:`logits` and :meth:`targets` for classifiers (the loss is then
    cross-entropy), or :meth:`loss` for anything else. ``model`` is a callable (the
    real module or its functional twin); use only operations that ``torch.func.vmap``
    supports (all standard layers do).
    """

    def logits(self, model: ModelFn, batch: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def targets(self, batch: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """Per-example losses, shape (B,). Default: cross-entropy of logits vs targets."""
        return F.cross_entropy(self.logits(model, batch), self.targets(batch), reduction="none")

    def model_batch(self, batch: Any) -> Any:
        """The part of a loader's batch that :meth:`loss` needs (tensors only)."""
        return batch

    def validate(self, model: ModelFn, batch: Any) -> None:
        """Checks a (full) batch once before differentiating; raise ``InputError``."""


class ClassificationTask(Task):
    """Cross-entropy on batches ``(inputs, targets)`` (extra tuple items are ignored).

    Targets are class indices. The loss is the paper's L(z; theta) = -log softmax(f(x))_y.
    """

    def model_batch(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            raise InputError(
                "ClassificationTask expects batches (inputs, targets); got a dict. "
                "Pass a Task for dict batches (see harness.HuggingFaceClassificationTask)."
            )
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError(
                f"ClassificationTask expects batches (inputs, targets); got {type(batch).__name__}"
            )
        inputs, targets = batch[0], batch[1]
        if not torch.is_tensor(targets):
            targets = torch.as_tensor(targets)
        return inputs, targets

    def logits(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return model(batch[0])

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def validate(self, model: ModelFn, batch: Any) -> None:
        inputs, targets = batch
        _check_targets(targets, _first_dim(inputs))
        logits = _checked_forward(model, (inputs,), {})
        _check_class_range(targets, logits)


class HuggingFaceClassificationTask(Task):
    """Cross-entropy for Hugging Face sequence classifiers fed dict batches.

    The batch is a dict with the tokenizer's tensors plus ``label_key`` (default
    ``"labels"``); every other tensor is passed to the model as a keyword argument.
    """

    def __init__(self, label_key: str = "labels"):
        self.label_key = label_key

    def model_batch(self, batch: Any) -> Any:
        if not isinstance(batch, dict) or self.label_key not in batch:
            raise InputError(
                f"HuggingFaceClassificationTask expects dict batches with a {self.label_key!r} key"
            )
        return {k: v for k, v in batch.items() if torch.is_tensor(v)}

    def logits(self, model: ModelFn, batch: Any) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != self.label_key}
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # transformers inspects a 2-D padding mask with data-dependent branches (``mask.all()``) that
            # torch.func.vmap cannot trace; the equivalent additive 4-D mask skips them.
            inputs["attention_mask"] = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[self.label_key]

    def validate(self, model: ModelFn, batch: Any) -> None:
        targets = batch[self.label_key]
        inputs = {k: v for k, v in batch.items() if k != self.label_key}
        _check_targets(targets, min(_first_dim(v) for v in inputs.values()))
        lengths = {k: _first_dim(v) for k, v in inputs.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"batch tensors disagree on the number of examples: {lengths}")
        out = _checked_forward(model, (), inputs)
        _check_class_range(targets, out.logits if hasattr(out, "logits") else out)


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def _checked_forward(model: ModelFn, args: tuple, kwargs: dict) -> Any:
    """The model's output on a validation batch; ``InputError`` when the model cannot run on
    it (inputs of the wrong width or dtype for its layers), naming what the batch holds."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        given = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"the model cannot run on the batch ({given}): {reason}") from exc


def _first_dim(x: Any) -> int:
    if not torch.is_tensor(x) or x.dim() == 0:
        raise InputError(f"batch inputs must be tensors with an example dimension; got {type(x).__name__}")
    return x.shape[0]


def _check_targets(targets: torch.Tensor, n_inputs: int) -> None:
    if targets.dim() != 1:
        raise InputError(f"targets must be a 1-D tensor of class indices; got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InputError(f"targets must be integer class indices; got dtype {targets.dtype}")
    if targets.shape[0] != n_inputs:
        raise InputError(
            f"mismatched lengths: batch has {n_inputs} inputs but {targets.shape[0]} targets"
        )


def _check_class_range(targets: torch.Tensor, logits: torch.Tensor) -> None:
    n_classes = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
        raise InputError(
            f"targets out of range: the model has {n_classes} classes but targets span "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
