"""Fit with the frozen prefix run once per fit batch (harness.fastpaths.FrozenPrefix)
against fit without it: the same factors bit for bit, and what it refuses to replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from harness import InfluenceEmbedder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _both(model, layers, loader, **options):
    fits = [
        InfluenceEmbedder(model, layers, 12, 4, seed=3, progress=False, block_size=1, frozen_prefix=flag, **options)
        .fit(loader)
        for flag in (True, False)
    ]
    np.testing.assert_array_equal(fits[0].eigenvalues_.numpy(), fits[1].eigenvalues_.numpy())
    torch.testing.assert_close(fits[0].factors_, fits[1].factors_, rtol=0, atol=0)
    assert fits[1].frozen_prefix_ == []
    return fits[0]


def test_mlp_suffix_replays_the_first_layers(mlp64):
    fitted = _both(mlp64.model, "2", mlp64.loader("train"))
    assert fitted.frozen_prefix_ == ["0", "1"]
    assert _both(mlp64.model, None, mlp64.loader("train")).frozen_prefix_ == []  # nothing before theta
    ggn = _both(mlp64.model, "2", mlp64.loader("train"), curvature="ggn")
    assert ggn.frozen_prefix_ == ["0", "1"]


def test_resnet_layer4_replays_the_stem_and_first_stages():
    torch.manual_seed(0)
    model = resnet18(num_classes=4).double().eval()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 4, (6,))
    fitted = _both(model, ["layer4", "fc"], DataLoader(TensorDataset(x, y), batch_size=3))
    # bn1's output is changed in place by the ReLU(inplace=True) after it: bn1 runs every pass
    assert fitted.frozen_prefix_ == ["conv1", "relu", "maxpool", "layer1", "layer2", "layer3"]


class HiddenUse(nn.Module):
    """`pre` holds no selected parameter but its input already depends on theta (out.weight)."""

    def __init__(self):
        super().__init__()
        self.first, self.pre, self.out = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x):
        h = self.first(x)
        return self.out(self.pre(h @ self.out.weight.T @ self.out.weight))


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.first(x)
        h.mul_(2.0)  # changes the frozen module's output after it returned
        return self.out(h)


def test_hidden_uses_and_in_place_changes_are_not_replayed():
    torch.manual_seed(0)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    hidden = _both(HiddenUse().double(), "out", loader)
    assert hidden.frozen_prefix_ == ["first"]  # not "pre": its output moves with theta
    assert _both(InPlaceAfter().double(), "out", loader).frozen_prefix_ == []
