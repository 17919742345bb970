"""CPU-cheap trunks and heads: the mini-dcbench's (``harness.dcbench``) and the paper's
appendix-G small DNN (:class:`SmallCNN`, split by :func:`split_small_cnn`).

dcbench's models are pretrained networks fine-tuned on manipulated data. The mini-dcbench
does the same at CPU scale: a trunk (``image_trunk`` / ``series_trunk``) is pretrained
once per input type on a pool of examples that no problem uses, its features are cached,
and every problem fine-tunes an :class:`MLPHead` on those features. The head is what
InfEmbed differentiates: two layers of width >= 128, so theta has >= 10k parameters and
its Hessian's rank is far above the Arnoldi dimension P.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from harness.errors import InputError
from harness.models import TrunkHead


def _check_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise InputError(f"widths must be a non-empty tuple of positive integers; got {widths}")
    return widths


def _strided_trunk(conv, norm, pool, channels: int, widths: tuple[int, ...], kernel: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = channels
    for width in _check_widths(widths):
        layers += [conv(previous, width, kernel, stride=2, padding=kernel // 2, bias=False), norm(width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers, pool(1), nn.Flatten())


def image_trunk(channels: int, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """Strided 3x3 convolutions (BatchNorm, ReLU), then global average pooling:
    (N, channels, H, W) -> (N, widths[-1]). Padded, so any image size >= 1 works
    (scikit-learn's 8x8 digits included)."""
    return _strided_trunk(nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, channels, widths, 3)


def series_trunk(channels: int, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """Strided 1-D convolutions (kernel 7, BatchNorm, ReLU), then global average pooling:
    (N, channels, L) -> (N, widths[-1])."""
    return _strided_trunk(nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d, channels, widths, 7)


class PretrainNet(nn.Module):
    """A trunk with a linear ``classifier`` on top, trained once on the pretraining pool."""

    def __init__(self, trunk: nn.Module, n_features: int, n_classes: int):
        super().__init__()
        self.trunk = trunk
        self.classifier = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(x))


class MLPHead(nn.Module):
    """``hidden`` (Linear + ReLU: the head's activations) -> ``classifier`` on trunk features."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 128):
        super().__init__()
        if min(n_features, n_classes, hidden) < 1:
            raise InputError(f"n_features, n_classes and hidden must be >= 1; got {n_features}, {n_classes}, {hidden}")
        self.hidden = nn.Linear(n_features, hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.penultimate(x))


class SmallCNN(nn.Module):
    """The paper's appendix-G small DNN: blocks of conv(5x5, stride 1)-ReLU-BatchNorm-max-pool,
    then two fully connected layers (``head.fc1``, ``head.fc2``), on images of ``channels``
    channels (1: X-rays; 3: photos)."""

    def __init__(self, n_classes: int, image_size: int, widths: tuple[int, ...] = (8, 16, 32, 32), hidden: int = 64,
                 channels: int = 1):
        super().__init__()
        if image_size % (2 ** len(widths)):
            raise InputError(f"image_size must be a multiple of {2 ** len(widths)}; got {image_size}")
        blocks = []
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(width), nn.MaxPool2d(2)]
            channels = width
        self.trunk = nn.Sequential(*blocks, nn.Flatten())
        side = image_size // 2 ** len(widths)
        self.head = nn.Sequential(
            OrderedDict(fc1=nn.Linear(channels * side * side, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, n_classes))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))


def split_small_cnn(model: SmallCNN) -> TrunkHead:
    """The convolutional blocks as trunk; the two fully connected layers (``fc1``, ``fc2``) as head."""
    return TrunkHead(model=model, trunk=model.trunk, head=model.head, head_layers=("fc1", "fc2"))
