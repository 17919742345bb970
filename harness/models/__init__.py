"""Model builders and the trunk/head split.

InfEmbed differentiates only a few top layers (paper: ``layer4`` + ``fc`` of a ResNet,
``bert.pooler.dense`` + ``classifier`` of a BERT). Everything below them is a frozen
*trunk*: its output does not depend on the differentiated parameters, so it is computed
once under ``torch.no_grad`` and cached, and every gradient, Hessian-vector product and
embedding runs on the small *head* module fed with those cached features. With the
model in eval mode this gives exactly the gradients of the whole model restricted to the
head's parameters. The head shares its modules (and so its parameters) with the model.

Builders and splits by family: :mod:`.vision` (torchvision ResNets, the grey-scale
ResNet), :mod:`.densenet` (torchxrayvision DenseNets), :mod:`.text` (BERT classifiers),
:mod:`.small` (the mini-dcbench's trunks and heads, the paper's small DNN). Features are
cached by :func:`experiments.pipeline.embed` through :mod:`harness.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.errors import InputError
from harness.hessian import eval_mode, move_to


@dataclass
class TrunkHead:
    """A model split into a frozen feature ``trunk`` (batch inputs -> features) and a
    ``head`` module (features -> logits) holding the ``head_layers`` by their model names."""

    model: nn.Module
    trunk: Callable[[Any], torch.Tensor]
    head: nn.Module
    head_layers: tuple[str, ...]


@torch.no_grad()
def compute_features(
    trunk: Callable[[Any], torch.Tensor], loader: Iterable, model: nn.Module, device: str | torch.device = "cpu",
    progress: bool = True, desc: str = "trunk features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, targets) of every example of ``loader`` (batches ``(inputs, targets)`` or
    dicts with ``labels``), with ``model`` in eval mode, on CPU, in loader order."""
    device = torch.device(device)
    features, targets = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    with eval_mode(model):
        for batch in tqdm(loader, total=total, desc=desc, disable=not progress, leave=False):
            if isinstance(batch, dict):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                labels = batch["labels"]
            else:
                inputs, labels = batch[0], batch[1]
            features.append(trunk(move_to(inputs, device)).float().cpu())
            targets.append(torch.as_tensor(labels).cpu())
    if not features:
        raise InputError(f"empty loader: no {desc} to compute")
    return torch.cat(features), torch.cat(targets)

