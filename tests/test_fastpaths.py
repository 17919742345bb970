"""The closed-form linear-head fast path against the autograd path of the core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, InputError
from harness.fastpaths import (
    FastInfluenceEmbedder,
    LinearHeadEmbedder,
    LinearHeadLoss,
    LinearizedHessianLoss,
    capture_inputs,
    forward_mode_embeddings,
    fixed_batches,
    tensor_batches,
)
from harness.hessian import FunctionalLoss, select_parameters
from harness.task import ClassificationTask, HuggingFaceClassificationTask


pytestmark = pytest.mark.usefixtures("one_thread")


def _autograd_loss(head: nn.Module) -> FunctionalLoss:
    return FunctionalLoss(head, ClassificationTask(), select_parameters(head, None))


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_gradients_hvp_and_projection_match_autograd(logreg64, bias):
    head = logreg64.model if bias else nn.Linear(12, 10, bias=False).double()
    x, y = logreg64.test
    batch = (x, y)
    fast, slow = LinearHeadLoss(head, ClassificationTask()), _autograd_loss(head)
    params = slow.params()

    grads = fast.per_example_grads(params, batch)
    torch.testing.assert_close(grads, slow.per_example_grads(params, batch), rtol=1e-10, atol=1e-12)

    vector = torch.randn(slow.selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast.hvp(params, batch, vector), slow.hvp(params, batch, vector), rtol=1e-10, atol=1e-12)

    projection = torch.randn(slow.selection.numel, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast.project(params, batch, projection), grads @ projection, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.losses(params, batch), slow.losses(params, batch))


def test_linear_head_embedder_reproduces_the_core_on_the_full_model(mlp64):
    """Cached activations of the last layer + closed form == the core with layers='2'."""
    model = mlp64.model
    core = InfluenceEmbedder(model, layers="2", arnoldi_dim=20, embedding_dim=8, seed=5, progress=False)
    core.fit(mlp64.loader("train"))

    train_acts, train_y = capture_inputs(model, "2", mlp64.loader("train"), progress=False)
    test_acts, test_y = capture_inputs(model, "2", mlp64.loader("test"), progress=False)
    torch.testing.assert_close(train_acts, model[:2](mlp64.train[0]).detach())
    torch.testing.assert_close(train_y, mlp64.train[1])

    def loader(acts, y):
        return DataLoader(TensorDataset(acts, y), batch_size=50)

    fast = LinearHeadEmbedder(model[2], arnoldi_dim=20, embedding_dim=8, seed=5, progress=False)
    fast.fit(loader(train_acts, train_y))
    np.testing.assert_allclose(fast.eigenvalues_.numpy(), core.eigenvalues_.numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        fast.transform(loader(test_acts, test_y)), core.transform(mlp64.loader("test")), rtol=1e-5, atol=1e-6
    )


def test_linear_head_embedder_survives_refit_and_save_load(logreg64, tmp_path):
    loader = logreg64.loader("train")
    fast = LinearHeadEmbedder(logreg64.model, arnoldi_dim=15, embedding_dim=5, progress=False)
    first = fast.fit(loader).transform(logreg64.loader("test"))
    second = fast.fit(loader).transform(logreg64.loader("test"))
    np.testing.assert_array_equal(first, second)
    assert isinstance(fast._loss, LinearHeadLoss)
    loaded = LinearHeadEmbedder.load(fast.save(tmp_path / "head.pt"), logreg64.model, progress=False)
    np.testing.assert_array_equal(loaded.transform(logreg64.loader("test")), first)


def test_bad_inputs_raise_input_error(mlp64):
    with pytest.raises(InputError, match="nn.Linear"):
        LinearHeadEmbedder(mlp64.model)
    with pytest.raises(InputError, match="ClassificationTask"):
        LinearHeadEmbedder(mlp64.model[2], task=HuggingFaceClassificationTask())
    with pytest.raises(InputError, match="layers"):
        LinearHeadEmbedder(mlp64.model[2], layers="weight")
    with pytest.raises(InputError, match="unknown module"):
        capture_inputs(mlp64.model, "head", mlp64.loader("test"), progress=False)
    frozen = nn.Linear(8, 4).double().requires_grad_(False)
    with pytest.raises(InputError, match="trainable"):
        LinearHeadLoss(frozen, ClassificationTask())
    with pytest.raises(InputError, match=r"^the linear-head fast path needs an nn\.Linear model with nn\.Linear's own "
                                         r"forward; got _DoubledLinear$"):
        LinearHeadLoss(_DoubledLinear(8, 4).double(), ClassificationTask())


class _DoubledLinear(nn.Linear):
    """An nn.Linear whose own forward doubles the output: x W^T + b no longer gives the logits."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_auto_projection_of_a_linear_subclass_with_its_own_forward_is_exact():
    """The closed form assumes nn.Linear's forward; a subclass changing it gets another path
    whose embeddings equal explicit per-example gradients times the projection."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _DoubledLinear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    embedder = InfluenceEmbedder(model, layers="2", arnoldi_dim=12, embedding_dim=4, progress=False).fit(loader)
    got = embedder.transform(loader)
    loss = FunctionalLoss(model, ClassificationTask(), embedder.selection)
    grads = loss.per_example_grads(loss.params(), (x, y))
    np.testing.assert_allclose(got, (grads @ embedder.projection_).numpy(), rtol=1e-6, atol=1e-9)
    assert embedder.projection_mode_ != "closed_form"
    with pytest.raises(InputError, match="closed_form"):
        InfluenceEmbedder(model, layers="2", arnoldi_dim=12, embedding_dim=4, projection="closed_form",
                          progress=False).fit(loader).transform(loader)


def test_linearized_hvp_matches_forward_over_reverse(mlp64):
    selection = select_parameters(mlp64.model, None)
    plain = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    traced = LinearizedHessianLoss(FunctionalLoss(mlp64.model, ClassificationTask(), selection))
    params = plain.params()
    batch = tuple(mlp64.train)
    for seed in (1, 2):  # the second call reuses the trace
        vector = torch.randn(selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(traced.hvp(params, batch, vector), plain.hvp(params, batch, vector), rtol=1e-10, atol=1e-12)
    assert len(traced._traced) == 1


@pytest.mark.parametrize("projection", ["gradients", "forward"])
def test_fast_embedder_reproduces_the_core(mlp64, projection):
    batches = fixed_batches(mlp64.train, 256)
    core = InfluenceEmbedder(mlp64.model, arnoldi_dim=30, embedding_dim=10, seed=2, progress=False).fit(batches)
    fast = FastInfluenceEmbedder(
        mlp64.model, arnoldi_dim=30, embedding_dim=10, seed=2, progress=False, projection=projection
    )
    fast.fit(batches)
    assert len(fast._loss._traced) == 0, "traces must be released after fit"
    np.testing.assert_allclose(fast.eigenvalues_.numpy(), core.eigenvalues_.numpy(), rtol=1e-9)
    test = mlp64.loader("test")
    np.testing.assert_allclose(fast.transform(test), core.transform(test), rtol=1e-5, atol=1e-7)


def test_forward_mode_embeddings_equal_gradients_times_projection(mlp64):
    selection = select_parameters(mlp64.model, None)
    loss = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    params, batch = loss.params(), tuple(mlp64.test)
    projection = torch.randn(selection.numel, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = loss.per_example_grads(params, batch) @ projection
    torch.testing.assert_close(forward_mode_embeddings(loss, params, batch, projection), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="projection"):
        FastInfluenceEmbedder(mlp64.model, projection="jvp")


def test_tensor_batches_slice_whole_batches_in_order(logreg64):
    x, y = logreg64.test
    batches = list(tensor_batches((x, y), 50))
    assert [len(b[1]) for b in batches] == [50] * (len(y) // 50) + ([len(y) % 50] if len(y) % 50 else [])
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), x)
    fixed = fixed_batches((x, y), 50)
    assert all(a[0] is b[0] for a, b in zip(fixed, fixed))
    with pytest.raises(InputError, match="batch_size"):
        tensor_batches((x, y), 0)
