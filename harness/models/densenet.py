"""torchxrayvision DenseNets: the builder (pretrained weights only from torchxrayvision's
cache, never downloaded; otherwise a reduced DenseNet trained from scratch) and the
trunk/head split before the last dense layer of block 4 (``split_densenet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from harness.errors import InputError
from harness.models import TrunkHead

DENSENET121_BLOCKS = (6, 12, 24, 16)


def _torchxrayvision():
    from harness.data.covid import require_torchxrayvision

    return require_torchxrayvision()


def xray_densenet(weights: str = "none", blocks: Sequence[int] = DENSENET121_BLOCKS, n_classes: int = 2) -> nn.Module:
    """A torchxrayvision DenseNet with an ``n_classes``-way classifier: ``weights`` names
    torchxrayvision pretrained weights (e.g. ``densenet121-res224-all``; they must already
    be in its cache), or ``"none"`` for a fresh model with dense blocks of ``blocks`` layers.
    Seed torch before calling: the new layers are randomly initialised."""
    xrv = _torchxrayvision()
    if weights != "none":
        if weights not in xrv.models.model_urls:
            raise InputError(f"unknown torchxrayvision weights {weights!r}")
        cached = Path(xrv.utils.get_cache_dir()).expanduser() / Path(xrv.models.model_urls[weights]["weights_url"]).name
        if not cached.is_file():
            raise InputError(
                f"torchxrayvision weights {weights!r} are not in its cache ({cached}) and cannot be "
                "downloaded here; use --weights none to train from scratch"
            )
        model = xrv.models.DenseNet(weights=weights)
        model.classifier = nn.Linear(model.classifier.in_features, n_classes)
        model.op_threshs = None
        if hasattr(model, "input_resolution"):
            # Its forward checks the input's resolution and range, which vmap cannot trace.
            del model.input_resolution
        return model
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != 4 or min(blocks) < 1:
        raise InputError(f"blocks must be 4 positive layer counts, e.g. 2,2,2,16; got {blocks}")
    return xrv.models.DenseNet(weights=None, num_classes=n_classes, block_config=blocks)


class DenseNetHead(nn.Module):
    """The last dense layer, the final norm and the classifier of a torchxrayvision DenseNet,
    under the model's own names (``features.denseblock4.denselayer16.conv1``, ...), fed the
    concatenated features of the earlier layers of block 4. Shares its modules with the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        block = model.features.denseblock4
        self.last = f"denselayer{len(block)}"
        self.features = nn.Module()
        self.features.denseblock4 = nn.Module()
        self.features.denseblock4.add_module(self.last, getattr(block, self.last))
        self.features.norm5 = model.features.norm5
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = getattr(self.features.denseblock4, self.last)(features)  # returns cat([input, new features])
        x = torch.relu(self.features.norm5(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseNetTrunk(nn.Module):
    """Everything of a torchxrayvision DenseNet before the last dense layer of block 4."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name, module in self.model.features.named_children():
            if name == "denseblock4":
                for layer in list(module.children())[:-1]:
                    x = layer(x)
                return x
            x = module(x)
        raise InputError("the model has no features.denseblock4")


def split_densenet(model: nn.Module, head_layers: Sequence[str] | None = None) -> TrunkHead:
    """Splits before the last dense layer of block 4. ``head_layers`` (default: the paper's
    ``classifier`` and the last dense layer's ``conv1``/``conv2``) name the differentiated
    layers; every one must be in the head."""
    head = DenseNetHead(model)
    if head_layers is None:
        last = f"features.denseblock4.{head.last}"
        head_layers = ("classifier", f"{last}.conv1", f"{last}.conv2")
    names = dict(head.named_modules())
    missing = [layer for layer in head_layers if layer not in names]
    if missing:
        raise InputError(f"head_layers {missing} are not in the DenseNet head (its layers: {sorted(names)[:8]}...)")
    return TrunkHead(model=model, trunk=DenseNetTrunk(model), head=head, head_layers=tuple(head_layers))
