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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_a_head_after_a_trunk_replays_its_own_frozen_layers(mlp64):
    """The trunk runs once per example; the head's frozen layers before theta are replayed too."""
    trunk = nn.Linear(8, 8).double().requires_grad_(False)
    fitted = _both(mlp64.model, "2", mlp64.loader("train"), trunk=lambda batch: (trunk(batch[0]), batch[1]))
    assert fitted.frozen_prefix_ == ["0", "1"]


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


def test_merged_fit_batches_give_the_same_factors(mlp64):
    """Batches of 50 merged into one per pass: the same Hessian up to round-off."""
    loader = mlp64.loader("train", batch_size=50)
    options = dict(arnoldi_dim=20, embedding_dim=6, seed=1, progress=False, block_size=1)
    merged = InfluenceEmbedder(mlp64.model, **options).fit(loader)
    streamed = InfluenceEmbedder(mlp64.model, merge_fit_batches=False, **options).fit(loader)
    assert merged.n_fit_batches_ == 1 and streamed.n_fit_batches_ is None
    np.testing.assert_allclose(merged.eigenvalues_.numpy(), streamed.eigenvalues_.numpy(), rtol=1e-9)
    test = mlp64.loader("test")
    np.testing.assert_allclose(merged.transform(test), streamed.transform(test), rtol=1e-6, atol=1e-9)
    suffix = InfluenceEmbedder(mlp64.model, "2", **options).fit(loader)  # merged, then the prefix replayed
    assert suffix.n_fit_batches_ == 1 and suffix.frozen_prefix_ == ["0", "1"]


def test_batches_of_other_layouts_are_not_merged():
    from harness.fastpaths import concatenate_batches, same_layout

    a = (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    b = (torch.ones(2, 5), torch.ones(2, dtype=torch.long))
    assert same_layout(a, b) and not same_layout(a, (torch.zeros(2, 6), b[1]))
    assert not same_layout(a, (b[0].double(), b[1])) and not same_layout({"x": a[0]}, {"y": a[0]})
    joined = concatenate_batches([a, b])
    assert joined[0].shape == (5, 5) and joined[1].tolist() == [0, 0, 0, 1, 1]
    x = torch.randn(20, 4, dtype=torch.float64)
    ragged = [(x[:10], torch.zeros(10, dtype=torch.long)), (x[10:, :4], torch.ones(10, dtype=torch.long))]
    model = nn.Linear(4, 2).double()
    fitted = InfluenceEmbedder(model, None, 6, 2, progress=False, block_size=1).fit(ragged)
    assert fitted.n_fit_batches_ == 1


# ---------------------------------------------------------------- FrozenPrefix.find on one batch
def _find(model: nn.Module, layers, batch):
    from harness.fastpaths import FrozenPrefix
    from harness.hessian import FunctionalLoss, select_parameters
    from harness.task import ClassificationTask

    loss = FunctionalLoss(model, ClassificationTask(), select_parameters(model, layers))
    return loss, FrozenPrefix.find(loss, loss.params(), batch)


class HeadOutsideItsBlock(nn.Module):
    """`block` holds the selected `block.head` but the root calls the head after `block` returned:
    `block` holds theta, so only its frozen child `block.pre` is replayed."""

    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.pre, self.block.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.block.forward = lambda x: torch.tanh(self.block.pre(x))

    def forward(self, x):
        return self.block.head(self.block(x))


class RootScale(nn.Module):
    """The root module owns a selected parameter: theta is reached when the root's call starts."""

    def __init__(self):
        super().__init__()
        self.first, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.out(self.first(x)) * self.scale


class Scaled(nn.Module):
    """Owns a selected scale and calls a frozen child: theta is reached when Scaled starts."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.inner(x) * self.scale


class ScaledInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.scaled, self.out = nn.Linear(4, 4), Scaled(), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.scaled(self.first(x)))


class WeightOnly(nn.Module):
    """The selected layer is never called, its weight is used directly."""

    def __init__(self):
        super().__init__()
        self.first, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.first(x)), self.out.weight)


class Router(nn.Module):
    """Frozen, but its call encloses the first call of the selected gate."""

    def forward(self, h, gate):
        return gate(h).argmax(1)


class Routed(nn.Module):
    """Hard routing by a selected gate: the router's output (an argmax, with margins far larger
    than the check's perturbation) does not move with theta, but its call reaches theta."""

    def __init__(self):
        super().__init__()
        self.first, self.gate, self.router, self.out = nn.Linear(4, 4), nn.Linear(4, 2), Router(), nn.Linear(4, 3)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([50.0, -50.0]))

    def forward(self, x):
        h = torch.tanh(self.first(x))
        route = self.router(h, self.gate)
        return self.out(h) * (1 + route[:, None])


@pytest.mark.parametrize("model, layers, expected", [
    (HeadOutsideItsBlock(), "block.head", ["block.pre"]),
    (RootScale(), ["scale", "out"], None),
    (ScaledInside(), "scaled.scale", ["first"]),  # not scaled.inner: it runs after theta is reached
    (WeightOnly(), "out", None),  # no selected module is ever called
    (Routed(), ["gate", "out"], ["first"]),
    # 0's output is changed in place by the ReLU (which returns it): only the ReLU is replayed
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)), "2", ["1"]),
], ids=["head called outside its block", "root owns theta", "frozen child of theta's owner", "weight used directly",
        "frozen call enclosing theta's", "idempotent in-place ReLU"])
def test_prefix_is_what_ends_before_the_first_call_of_a_module_owning_theta(model, layers, expected):
    torch.manual_seed(0)
    model = model.double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    _, prefix = _find(model, layers, batch)
    assert (prefix.names if prefix is not None else None) == expected


class Gain(nn.Module):
    def __init__(self, g: float):
        super().__init__()
        self.g = nn.Parameter(torch.tensor([g]))

    def forward(self, x):
        return x / self.g


class HiddenGain(nn.Module):
    """`pre` holds no selected parameter, but its input is scaled by the selected gain."""

    def __init__(self, g: float):
        super().__init__()
        self.first, self.pre, self.gain, self.out = nn.Linear(4, 8), nn.Identity(), Gain(g), nn.Linear(8, 3)
        with torch.no_grad():
            self.out.weight.mul_(0.1)

    def forward(self, x):
        return self.out(self.gain(self.pre(self.first(x) * self.gain.g)))


@pytest.mark.parametrize("g, dtype", [
    (0.5, torch.float64),
    (1e-3, torch.float64),  # |g| - 1e-3 would be no perturbation at all
    (1e9, torch.float64),  # a perturbation not scaled up by |g| would vanish below g's round-off
    (0.5, torch.bfloat16),  # the perturbation in theta's dtype
])
def test_the_check_moves_every_entry_of_theta_by_about_a_tenth_of_its_scale(g, dtype):
    """Condition (2) of the class docstring: theta perturbed by 0.1 (mean |p| + 1e-3) times a
    normal draw per entry, every entry moved, from a generator of its own (the global RNG is left
    as it was, and the same draw comes every time)."""
    torch.manual_seed(0)
    model = HiddenGain(g).to(dtype)
    with torch.no_grad():
        model.gain.g.fill_(g)  # g itself in theta's dtype, not its float32 rounding
    batch = (torch.randn(10, 4).to(dtype), torch.randint(0, 3, (10,)))
    seen = []
    model.out.register_forward_pre_hook(lambda module, _args: seen.append(module.weight.detach().clone()))
    state = torch.get_rng_state()
    prefixes = [_find(model, ["gain", "out"], batch)[1] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert [p.names for p in prefixes] == [["first"], ["first"]]  # not "pre": its output moves with g
    theta = model.out.weight.detach()
    moved = [w for w in seen if not torch.equal(w, theta)]
    assert len(moved) == 2 and torch.equal(moved[0], moved[1]) and moved[0].dtype == dtype
    ratio = ((moved[0] - theta) / (theta.abs().mean() + 1e-3)).double()
    assert bool((ratio != 0).all()) and float(ratio.abs().max()) < 0.5 and float(ratio.std()) > 0.03


class InPlaceLater(nn.Module):
    """`first`'s output is changed in place only once `clip` is set (after the first batch)."""

    def __init__(self):
        super().__init__()
        self.first, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
        self.clip = False

    def forward(self, x):
        h = self.first(x)
        if self.clip:
            h.clamp_(-1, 1)
        return self.out(h)


def test_a_frozen_output_changed_in_place_on_a_later_batch_is_an_input_error():
    from harness import InputError

    torch.manual_seed(0)
    model = InPlaceLater().double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    loss, prefix = _find(model, "out", batch)
    assert prefix.names == ["first"]
    prefix.add_batch(loss.params(), batch)
    model.clip = True
    with pytest.raises(InputError, match=r"^a frozen module's output was changed in place after the first fit batch$"):
        prefix.add_batch(loss.params(), batch)


def test_bytes_per_batch_counts_the_first_held_batch_outputs_and_inputs():
    from harness.fastpaths import FrozenPrefix, tensor_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    loss, found = _find(model, "2", batch)
    assert found.names == ["0", "1"] and found.bytes_per_batch() == 0  # nothing held yet
    prefix = FrozenPrefix(loss, ["0", "1"])  # by hand: holds nothing until add_batch
    assert prefix.bytes_per_batch() == 0
    prefix.add_batch(loss.params(), batch)
    prefix.add_batch(loss.params(), (batch[0][:3], batch[1][:3]))
    # two (10, 6) float64 outputs, then the batch: (10, 4) float64 inputs and (10,) int64 targets
    assert prefix.bytes_per_batch() == 2 * 10 * 6 * 8 + 10 * 4 * 8 + 10 * 8
    assert len(prefix.outputs) == 2 and torch.equal(prefix.outputs[1]["1"], torch.tanh(model[0](batch[0][:3])))
    assert tensor_bytes({"a": torch.zeros(2, 3), "b": [torch.zeros(5, dtype=torch.int8)], "c": "text"}) == 2 * 3 * 4 + 5
