"""The layer-wise projection (inputs x output gradients, no per-example backward) against
per-example gradients by vmap(grad), layer type by layer type, and its fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
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


# ---------------------------------------------------------------- the first batch's check and its refusals
def _project_once(model: nn.Module, layers, batch, projection=None, calls: int = 1):
    """(LayerwiseProjection, the embeddings of its last ``project`` call) on ``batch``."""
    selection = select_parameters(model, layers)
    loss = FunctionalLoss(model, ClassificationTask(), selection)
    if projection is None:
        projection = torch.randn(selection.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layerwise = LayerwiseProjection.find(model, selection, loss)
    assert layerwise is not None
    with eval_mode(model):
        for _ in range(calls):
            got = layerwise.project(loss.params(), batch, projection)
    return layerwise, got


class UsedOutside(nn.Module):
    """A selected parameter also used outside its layer, in ways the summed-gradient check must
    see: in one element of the first or of the last parameter of theta, with gradients below
    float32's range, or small next to the whole gradient but not next to its own."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
        self.big = nn.Linear(4, 3)
        with torch.no_grad():  # big(100 x): ordinary logits, a gradient 100 x everyone else's
            self.big.weight.mul_(0.01)

    def forward(self, x):
        first_logit = torch.zeros(3, dtype=x.dtype)
        first_logit[0] = 1
        if self.where == "tiny":
            return self.out(x) + F.linear(x, self.out.weight)
        h = torch.tanh(self.a(x))
        logits = self.out(h)
        if self.where == "first element":
            return logits + self.a.weight[0, 0] * x[:, :1] * first_logit
        if self.where == "last element":
            return logits + self.out.bias[2] * x[:, :1] * first_logit
        return logits + self.big(100 * x) + 0.02 * F.linear(h, self.out.weight)  # "small"


@pytest.mark.parametrize("where, layers, scale", [
    ("first element", ["a", "out"], 1.0),  # a.weight[0, 0]: the first entry of theta
    ("last element", ["a", "out"], 1.0),  # out.bias[2]: the last entry of theta
    ("tiny", ["out.weight"], 1e-50),  # float64 gradients that float32 would flush to zero
    ("small", ["a", "out", "big"], 1.0),  # 2% of out.weight's gradient, 0.02% of theta's
])
def test_first_batch_check_catches_a_parameter_used_outside_its_layer(where, layers, scale):
    """Each parameter's layer terms summed over the batch are compared with its own autograd
    gradient, entry for entry of theta, in the projection's dtype, to 1e-3 of that parameter's
    gradient plus 1e-5 of theta's."""
    torch.manual_seed(0)
    model = UsedOutside(where).double()
    batch = (scale * torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    layerwise, got = _project_once(model, layers, batch)
    assert got is None and layerwise.checked is False


def test_batches_with_zero_gradients_pass_the_check_with_zero_embeddings():
    """A dead ReLU after the selected layer: every gradient is exactly zero, the check's differences
    and tolerances are all zero, and zero equals zero (<=, not <)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    layerwise, got = _project_once(model, ["0"], batch)
    assert layerwise.checked is True and got is not None
    assert torch.equal(got, torch.zeros(6, 3, dtype=torch.float64))


class LoopedConv(nn.Module):
    """A Conv2d run example by example on unbatched (C, H, W) inputs: its input's or its output's
    first dimension (channels) can equal the batch size while the other does not."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv, self.out = nn.Conv2d(channels_in, channels_out, 3), nn.Linear(channels_out, 3)

    def forward(self, x):
        return self.out(torch.stack([self.conv(example) for example in x]).mean((2, 3)))


class SideBranch(nn.Module):
    """`unused` is selected and called, but its output never reaches the loss."""

    def __init__(self):
        super().__init__()
        self.unused, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        self.unused(x)
        return self.out(x)


class InputChangedLater(nn.Module):
    """The input of the selected layer is changed in place after the layer ran."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x) + 1
        logits = self.out(h)
        h.mul_(2.0)
        return logits


@pytest.mark.parametrize("model, layers, shape", [
    (LoopedConv(2, 3), ["conv"], (2, 2, 5, 5)),  # inputs' first dimension == the batch size, outputs' not
    (LoopedConv(3, 2), ["conv"], (2, 3, 5, 5)),  # outputs' first dimension == the batch size, inputs' not
    (SideBranch(), None, (2, 4)),
    (InputChangedLater(), ["out"], (2, 4)),
], ids=["looped conv, C_in = B", "looped conv, C_out = B", "output unused", "input changed in place"])
def test_layers_whose_terms_do_not_apply_give_none(model, layers, shape):
    torch.manual_seed(0)
    batch = (torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],)))
    _, got = _project_once(model.double(), layers, batch)
    assert got is None


class DeadMiddle(nn.Module):
    """A selected layer in the middle of theta that the forward never calls: its per-example
    gradients are zero, and the other layers' rows of theta stay where they are."""

    def __init__(self):
        super().__init__()
        self.a, self.dead, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)))


def test_a_selected_layer_the_forward_never_calls_gets_zero_terms():
    torch.manual_seed(0)
    model = DeadMiddle().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    projection = torch.randn(select_parameters(model, None).numel, 3, dtype=torch.float64)
    got, expected = _layerwise_and_reference(model, None, batch, projection)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_interacting_examples_are_caught_for_a_batch_of_two_and_on_every_later_try():
    """A batch mean after the selected layer, batch of two (the smallest the alone check runs for):
    the first example alone differs from the first of the two. A failed check leaves the
    projection unchecked, so the next batch is checked again (and fails again)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), BatchCentred(), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(2, 5, dtype=torch.float64), torch.randint(0, 3, (2,)))
    layerwise, got = _project_once(model, None, batch, calls=2)
    assert got is None and layerwise.checked is False


def test_alone_check_accepts_up_to_1e_3_of_the_example_plus_1e_5_of_the_batch():
    """The alone check's rule at its boundaries, on in-batch embeddings set by hand around the
    first example's embedding alone: |alone - e_0| <= 1e-3 |e_0| + 1e-5 mean_i |e_i|, the
    relative part on e_0 itself (not e_1), the floor on the mean row norm (not the whole matrix's)."""
    from harness.batching import first_examples

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)))
    layerwise, _ = _project_once(model, None, batch)
    params = {n: p.detach() for n, p in model.named_parameters()}
    projection = torch.randn(select_parameters(model, None).numel, 3, dtype=torch.float64)
    alone = layerwise.project(params, first_examples(batch, 1), projection)[0]
    projection = projection * (100 / float(alone.norm()))  # |e_0| = 100
    alone = layerwise.project(params, first_examples(batch, 1), projection)[0]
    unit = alone / alone.norm()
    others = torch.randn(8, 3, dtype=torch.float64)
    others = 100 * others / others.norm(dim=1, keepdim=True)

    def accepted(distance: float, second_row_norm: float = 100.0) -> bool:
        rows = torch.cat([(alone + distance * unit)[None], others])
        rows[1] *= second_row_norm / 100
        return layerwise._alone_as_in_batch(params, batch, projection, rows)

    floor = 1e-5 * 100  # rows of norm 100
    assert accepted(1e-3 * 100 + 0.5 * floor)
    assert not accepted(1e-3 * 100 + 2 * floor)
    assert accepted(0.05, second_row_norm=0.0)  # e_0's tolerance, though e_1 = 0


def test_batchnorm_in_training_mode_is_an_input_error_and_without_running_stats_unsupported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    selection = select_parameters(model, None)
    loss = FunctionalLoss(model, ClassificationTask(), selection)
    layerwise = LayerwiseProjection.find(model, selection, loss)
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    projection = torch.randn(selection.numel, 2, dtype=torch.float64)
    with pytest.raises(InputError, match=r"^layer-wise projection needs BatchNorm in eval mode$"):
        layerwise.project(loss.params(), batch, projection.clone())
    # without running statistics BatchNorm normalises by the batch's even in eval mode
    model[1].running_mean = model[1].running_var = None
    assert LayerwiseProjection.find(model, selection, loss) is None
    untracked = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    selection = select_parameters(untracked, None)
    assert LayerwiseProjection.find(untracked, selection, FunctionalLoss(untracked, ClassificationTask(), selection)) is None


def test_a_float32_projection_checks_a_float64_model_in_float32():
    """The check compares the layer terms with autograd's gradient both in the projection's dtype:
    a float64 model's weight gradients of 1e-50 are zero terms in a float32 projection and zero
    gradients there too, so the batch passes with zero embeddings."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    batch = (1e-50 * torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    projection = torch.randn(12, 3, dtype=torch.float32)
    layerwise, got = _project_once(model, None, batch, projection)
    assert layerwise.checked is True and torch.equal(got, torch.zeros(6, 3))
