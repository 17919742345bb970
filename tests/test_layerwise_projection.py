"""The layer-wise projection (inputs x output gradients, no per-example backward) against
per-example gradients by vmap(grad), layer type by layer type, and its fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from harness import InfluenceEmbedder, InputError
from harness.fastpaths import LayerwiseProjection
from harness.batching import eval_mode
from harness.hessian import FunctionalLoss, select_parameters
from harness.task import ClassificationTask


pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(nn.Module):
    """Linear layers on (B, T, H) token states, a LayerNorm, a residual and mean pooling."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(x + self.down(torch.relu(self.up(x))))
        return self.out(h.mean(1))


class Convs(nn.Module):
    """Conv2d (stride, padding, dilation), BatchNorm2d, an in-place ReLU and residual +=,
    a Conv1d and BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.line = nn.Conv1d(4, 5, 2)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        out = self.bn(self.conv2(h))
        out += h
        out = self.relu(out)
        seq = self.line(out.mean(2))
        return self.fc(self.bn1(seq).mean(2))


def _randomise_batchnorm(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _check(model: nn.Module, layers, batch, dtype=torch.float64, rtol=1e-10, atol=1e-12, n_columns=4):
    model = model.to(dtype)
    selection = select_parameters(model, layers)
    loss = FunctionalLoss(model, ClassificationTask(), selection)
    projection = torch.randn(selection.numel, n_columns, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with eval_mode(model):
        params = loss.params()
        expected = loss.per_example_grads(params, batch) @ projection
        layerwise = LayerwiseProjection.find(model, selection, loss)
        assert layerwise is not None
        got = layerwise.project(params, batch, projection)
    assert got is not None and layerwise.checked
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    else:  # float32 sums of |theta| terms: compare at the scale of the whole embedding
        assert float((got - expected).norm() / expected.norm()) < rtol


def test_linear_layernorm_on_tokens_match_per_example_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, 6), torch.randint(0, 3, (7,))
    _check(Tokens(), None, (x.double(), y))
    _check(Tokens(), ["up", "norm.weight", "out"], (x.double(), y))  # a subset, one bias left out
    long = torch.randn(7, 20, 6).double()  # many positions x columns: per-example weight gradients first
    _check(Tokens(), None, (long, y), n_columns=8)


def test_convolutions_and_batchnorm_with_in_place_ops_match_per_example_gradients():
    torch.manual_seed(0)
    model = Convs()
    _randomise_batchnorm(model)
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 3, (6,))
    _check(model, None, (x.double(), y))


def test_resnet18_block_matches_per_example_gradients_in_float32():
    """The bench's W2 selection (layer4 + fc of a torchvision ResNet-18) in float32."""
    torch.manual_seed(0)
    model = resnet18(num_classes=5)
    _randomise_batchnorm(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("layer4.", "fc.")))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    _check(model, ["layer4", "fc"], (x, y), dtype=torch.float32, rtol=1e-5)


class Tied(nn.Module):
    """The output layer's weight is also used outside it: layer-wise terms miss that use."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) @ self.out.weight.T @ self.out.weight))


def _assert_auto_falls_back(model: nn.Module, x: torch.Tensor, batch_size: int, arnoldi_dim: int) -> None:
    """projection="auto" does not pick layer-wise, agrees with per-example gradients, and an
    explicit "layerwise" is refused with a message naming the model's problem."""
    y = torch.randint(0, 3, (len(x),))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    auto = InfluenceEmbedder(model, None, arnoldi_dim, 3, progress=False, block_size=1).fit(loader)
    got = auto.transform(loader)
    assert auto.projection_mode_ in ("forward", "gradients")
    reference = torch.cat(list(auto.gradients(loader))) @ auto.projection_
    np.testing.assert_allclose(got, reference.numpy(), rtol=1e-5, atol=1e-7)
    auto.projection_mode = "layerwise"
    with pytest.raises(InputError, match="layerwise.*examples interact"):
        auto.transform(loader)


def test_auto_falls_back_where_the_check_fails_and_explicit_layerwise_raises():
    torch.manual_seed(0)
    _assert_auto_falls_back(Tied().double(), torch.randn(40, 4).double(), batch_size=20, arnoldi_dim=10)


class BatchCentred(nn.Module):
    """Examples interact after the first selected layer: its outputs are centred on the batch mean."""

    def forward(self, h):
        return h - h.mean(0)


def test_examples_interacting_after_a_selected_layer_fall_back_to_per_example_gradients():
    """The summed-gradient check cannot see a batch mean after a selected layer (the batch gradient
    is still right); the first example embedded alone can, so auto falls back and agrees with vmap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), BatchCentred(), nn.Tanh(), nn.Linear(6, 3)).double()
    _assert_auto_falls_back(model, torch.randn(24, 5).double(), batch_size=24, arnoldi_dim=12)


def test_embedder_picks_layerwise_and_matches_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(48, 5, 6).double(), torch.randint(0, 3, (48,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    embedder = InfluenceEmbedder(Tokens().double(), None, 20, 4, progress=False, block_size=1).fit(loader)
    got = embedder.transform(loader)
    assert embedder.projection_mode_ == "layerwise"
    embedder.projection_mode = "gradients"
    np.testing.assert_allclose(got, embedder.transform(loader), rtol=1e-6, atol=1e-9)


def test_unsupported_layers_are_not_layerwise():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3)).double()
    selection = select_parameters(model, None)
    assert LayerwiseProjection.find(model, selection, FunctionalLoss(model, ClassificationTask(), selection)) is None
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3))
    selection = select_parameters(grouped, ["0"])
    assert LayerwiseProjection.find(grouped, selection, FunctionalLoss(grouped, ClassificationTask(), selection)) is None
    with pytest.raises(InputError, match="layerwise"):
        x, y = torch.randn(8, 4).double(), torch.randint(0, 3, (8,))
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        InfluenceEmbedder(model, None, 4, 2, progress=False, projection="layerwise").fit(loader).transform(loader)


# ---------------------------------------------------------------- every layer type, each variant
def _layerwise_and_reference(model: nn.Module, layers, batch, projection: torch.Tensor):
    """(layer-wise embeddings, per-example gradients by vmap times ``projection``) on a fresh
    LayerwiseProjection, the reference in the projection's dtype."""
    selection = select_parameters(model, layers)
    loss = FunctionalLoss(model, ClassificationTask(), selection)
    with eval_mode(model):
        params = loss.params()
        expected = loss.per_example_grads(params, batch).to(projection.dtype) @ projection
        layerwise = LayerwiseProjection.find(model, selection, loss)
        assert layerwise is not None and layerwise.checked is False
        got = layerwise.project(params, batch, projection)
    assert got is not None and layerwise.checked is True
    return got, expected


class Mixed(nn.Module):
    """One of each layer variant the layer-wise terms treat apart: Conv2d with stride, padding and
    dilation; a bias-free Conv1d with all three; BatchNorm1d and LayerNorm on 2-D features (no
    position dimension to sum over); a LayerNorm with a large eps and no bias; a bias-free Linear
    called twice (its terms are summed over calls)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.line = nn.Conv1d(3, 4, 2, stride=2, padding=1, dilation=2, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.norm = nn.LayerNorm(8)
        self.twice = nn.Linear(8, 8, bias=False)
        self.norm_no_bias = nn.LayerNorm(8, eps=0.5, bias=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(2)  # (B, 3, 4)
        h = self.line(h).flatten(1)  # (B, 8)
        h = self.norm(torch.tanh(self.bn(h)))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.out(self.norm_no_bias(h))


def _mixed(dtype: torch.dtype) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = Mixed()
    _randomise_batchnorm(model)
    with torch.no_grad():
        for norm in (model.bn, model.norm, model.norm_no_bias):  # not the default ones/zeros
            norm.weight.uniform_(0.5, 1.5)
            if norm.bias is not None:
                norm.bias.normal_()
    x, y = torch.randn(5, 2, 9, 9), torch.randint(0, 3, (5,))
    return model.to(dtype), (x.to(dtype), y)


def test_each_layer_variant_matches_per_example_gradients():
    model, batch = _mixed(torch.float64)
    selection = select_parameters(model, None)
    projection = torch.randn(selection.numel, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, expected = _layerwise_and_reference(model, None, batch, projection)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_float32_layers_with_a_float64_projection_match_per_example_gradients():
    """float64_basis gives a float64 projection for a float32 model: each layer's terms are
    cast to the projection's dtype before they meet it."""
    model, batch = _mixed(torch.float32)
    selection = select_parameters(model, None)
    projection = torch.randn(selection.numel, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, expected = _layerwise_and_reference(model, None, batch, projection)
    assert got.dtype == torch.float64
    assert float((got - expected).norm() / expected.norm()) < 1e-5


class Reused(nn.Module):
    """One Linear on (B, T, 5) tokens; T and the projection's width D pick the contraction."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)).mean(1))


@pytest.mark.parametrize("positions, width, forms_gradients", [
    (8, 8, False),  # T D = 4 (T + D): the boundary itself contracts a_it V_d^T
    (8, 9, True),
    (9, 8, True),
    (5, 20, False),  # = 4 (T + D) again, far from T = D
    (2, 30, False),
])
def test_per_example_weight_gradients_only_where_t_d_exceeds_4_t_plus_d(monkeypatch, positions, width, forms_gradients):
    """The cost rule of the class docstring: per-example weight gradients (one bmm per layer) only
    when T D > 4 (T + D); both contractions give the per-example gradients times the projection."""
    torch.manual_seed(0)
    model = Reused().double()
    batch = (torch.randn(3, positions, 5, dtype=torch.float64), torch.randint(0, 3, (3,)))
    n_theta = select_parameters(model, ["lin"]).numel
    projection = torch.randn(n_theta, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: bmm_calls.append(1) or real_bmm(*args))
    got, expected = _layerwise_and_reference(model, ["lin"], batch, projection)
    monkeypatch.undo()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the first call checks the batch and then projects the first example alone (T positions too)
    assert bool(bmm_calls) == forms_gradients
