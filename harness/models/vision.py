"""torchvision ResNets: builders, ImageNet weights from a local file or the torchvision
cache, a ResNet for one-channel X-rays (:class:`GreyResNet`), and the trunk/head splits
(``split_resnet``, ``split_grey_resnet``) for cached-feature InfEmbed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn

from harness.errors import InputError
from harness.io import load_torch_file
from harness.models import TrunkHead

# Order of a torchvision ResNet's forward pass after the stem (conv1, bn1, relu, maxpool).
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4", "fc")
_STEM = ("conv1", "bn1", "relu", "maxpool")
_ARCHES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resnet(arch: str = "resnet18", num_classes: int = 1000) -> nn.Module:
    """A randomly initialised torchvision ResNet (seed torch first for a fixed init)."""
    if arch not in _ARCHES:
        raise InputError(f"arch must be one of {_ARCHES}; got {arch!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def imagenet_weights(arch: str = "resnet18"):
    """torchvision's default ImageNet weights enum member for ``arch``."""
    if arch not in _ARCHES:
        raise InputError(f"arch must be one of {_ARCHES}; got {arch!r}")
    return torchvision.models.get_model_weights(arch).DEFAULT


def cached_imagenet_weights_file(arch: str = "resnet18") -> Path | None:
    """The torchvision-cache file of ``arch``'s default ImageNet weights, if downloaded before."""
    url = imagenet_weights(arch).url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


def imagenet_resnet(arch: str = "resnet18", weights_file: str | os.PathLike | None = None) -> tuple[nn.Module, list[str]]:
    """A ResNet with ImageNet weights read from ``weights_file`` or else the torchvision
    cache (never downloaded), and its 1000 class names."""
    path = Path(weights_file) if weights_file is not None else cached_imagenet_weights_file(arch)
    if path is None or not path.is_file():
        raise InputError(
            f"no ImageNet weights for {arch}: pass a weights file, or place torchvision's "
            f"{os.path.basename(imagenet_weights(arch).url)} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        )
    model = resnet(arch, 1000)
    state = load_torch_file(path, f"{arch} ImageNet state dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # not a dict, or keys/shapes of another model
        raise InputError(f"{path} is not a {arch} ImageNet state dict: {exc}") from exc
    return model.eval(), list(imagenet_weights(arch).meta["categories"])


class ResNetHead(nn.Module):
    """The last stages of a ResNet, under their model names, fed the trunk's features."""

    def __init__(self, model: nn.Module, head_layers: Sequence[str]):
        super().__init__()
        self.order = tuple(head_layers)
        for name in self.order:
            self.add_module(name, getattr(model, name))
        self.avgpool = model.avgpool
        # A head that is fc alone gets already pooled features from the trunk.
        self.pool_before_fc = self.order[0] != "fc"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for name in self.order:
            if name == "fc" and self.pool_before_fc:
                x = torch.flatten(self.avgpool(x), 1)
            x = getattr(self, name)(x)
        return x


class _ResNetTrunk(nn.Module):
    def __init__(self, model: nn.Module, trunk_layers: Sequence[str]):
        super().__init__()
        self.order = tuple(trunk_layers)
        for name in self.order:
            self.add_module(name, getattr(model, name))
        self.avgpool = model.avgpool
        self.pool_at_end = "layer4" in self.order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name in self.order:
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1) if self.pool_at_end else x


def split_resnet(model: nn.Module, head_layers: Sequence[str] = ("layer4", "fc")) -> TrunkHead:
    """Splits a torchvision ResNet before ``head_layers`` (a tail of layer1..layer4, fc).

    The trunk maps images to the input of the first head layer (e.g. layer3's feature
    map; pooled features when the head is ``fc`` alone); the head holds the head layers
    under their model names, so ``InfluenceEmbedder(split.head, layers=["layer4", "fc"])``
    selects the same parameters as on the whole model.
    """
    head_layers = tuple(head_layers)
    missing = [n for n in _STEM + RESNET_STAGES if not hasattr(model, n)]
    if missing:
        raise InputError(f"not a torchvision ResNet: the model has no {missing}")
    n = len(head_layers)
    if n == 0 or head_layers != RESNET_STAGES[len(RESNET_STAGES) - n:]:
        raise InputError(f"head_layers must be a tail of {RESNET_STAGES}, e.g. ('layer4', 'fc'); got {head_layers}")
    trunk = _ResNetTrunk(model, _STEM + RESNET_STAGES[: len(RESNET_STAGES) - n])
    return TrunkHead(model=model, trunk=trunk, head=ResNetHead(model, head_layers), head_layers=head_layers)


class GreyResNet(nn.Module):
    """A torchvision ResNet fed one-channel X-rays (the channel is repeated to three)."""

    def __init__(self, n_classes: int, arch: str = "resnet50"):
        super().__init__()
        self.net = resnet(arch, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.expand(-1, 3, -1, -1))


class _GreyTrunk(nn.Module):
    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images.expand(-1, 3, -1, -1))


def split_grey_resnet(model: GreyResNet, head_layers: Sequence[str] = ("fc",)) -> TrunkHead:
    """:func:`split_resnet` of the inner ResNet, its trunk fed the repeated channel."""
    split = split_resnet(model.net, head_layers)
    return TrunkHead(model=model, trunk=_GreyTrunk(split.trunk), head=split.head, head_layers=split.head_layers)
