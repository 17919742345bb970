"""Batches as the harness passes them around, and the model mode they run in.

A batch is a tensor or a nest of dicts, tuples and lists of tensors (``(inputs, targets)``,
a tokenizer's dict, ...), whose leaves share their first dimension: the examples. Other
leaves (strings, numbers) ride along untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The batch with ``fn`` applied to every tensor leaf (other leaves unchanged)."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def move_to(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor leaf on ``device``."""
    return map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=True))


def batch_length(batch: Any) -> int:
    """The number of examples: the first dimension of the first tensor leaf."""
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_length(next(iter(batch.values())))
    return batch_length(batch[0])


def first_examples(batch: Any, n: int) -> Any:
    """The batch's first ``n`` examples (every tensor leaf cut to its first ``n`` rows)."""
    return map_tensors(batch, lambda tensor: tensor[:n])


def unsqueeze_leaves(example: Any) -> Any:
    """One example (a batch entry without its first dimension) as a batch of one."""
    if torch.is_tensor(example):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {k: unsqueeze_leaves(v) for k, v in example.items()}
    return type(example)(unsqueeze_leaves(v) for v in example)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm and Dropout behave as at inference; the caller's modes are restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
