"""InfluenceEmbedder against explicit Hessians and naive per-example gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from harness import InfluenceEmbedder
from harness.hessian import FunctionalLoss, select_parameters
from harness.errors import InputError
from harness.task import ClassificationTask, Task

from conftest import explicit_gradients, explicit_hessian


def _names(model, layers=None):
    return list(select_parameters(model, layers).names)


def _top_pinv(hessian: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(hessian)
    order = np.argsort(values)[::-1][:d]
    values, vectors = values[order], vectors[:, order]
    return values, (vectors / values) @ vectors.T


def test_per_example_gradients_match_a_loop(mlp64):
    names = _names(mlp64.model)
    loss = FunctionalLoss(mlp64.model, ClassificationTask(), select_parameters(mlp64.model, None))
    x, y = mlp64.test
    fast = loss.per_example_grads(loss.params(), (x[:40], y[:40]))
    naive = explicit_gradients(mlp64.model, x[:40], y[:40], names)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)


def test_hvp_matches_explicit_hessian(mlp64):
    selection = select_parameters(mlp64.model, None)
    loss = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    x, y = mlp64.train
    hessian = explicit_hessian(mlp64.model, x, y, list(selection.names))
    v = torch.randn(selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hvp = loss.hvp(loss.params(), (x, y), v) / len(y)
    torch.testing.assert_close(hvp, hessian @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("problem_name, d", [("logreg64", 30), ("mlp64", 20)])
def test_embeddings_reproduce_explicit_influence(request, problem_name, d):
    """mu_test @ mu_train.T == g_test^T H_D^+ g_train, and Arnoldi eigenvalues == eigh's top-D."""
    problem = request.getfixturevalue(problem_name)
    model = problem.model
    names = _names(model)
    hessian = explicit_hessian(model, *problem.train, names).numpy()
    values, pinv = _top_pinv(hessian, d)
    full = np.sort(np.linalg.eigvalsh(hessian))[::-1]
    assert full[d - 1] - full[d] > 1e-6 * full[0], "top-D eigenspace must be well defined for this check"

    embedder = InfluenceEmbedder(model, arnoldi_dim=len(hessian), embedding_dim=d, progress=False)
    embedder.fit(problem.loader("train"))
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-8)

    mu_train = embedder.transform(problem.loader("train")).astype(np.float64)
    mu_test = embedder.transform(problem.loader("test")).astype(np.float64)
    g_train = explicit_gradients(model, *problem.train, names).numpy()
    g_test = explicit_gradients(model, *problem.test, names).numpy()
    expected = g_test @ pinv @ g_train.T
    # embeddings are returned in float32, so agreement is to float32 precision
    np.testing.assert_allclose(mu_test @ mu_train.T, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_rank_deficient_hessian_gives_the_pseudo_inverse(logreg64):
    """Softmax regression has a null space (shifting all class weights): Arnoldi breaks down
    gracefully and the embeddings reproduce the Moore-Penrose pseudo-inverse."""
    model = logreg64.model
    names = _names(model)
    hessian = explicit_hessian(model, *logreg64.train, names).numpy()
    values = np.linalg.eigvalsh(hessian)
    rtol = 1e-7
    rank = int((values > rtol * values.max()).sum())
    assert rank < len(hessian) - 10  # 13-dimensional null space

    embedder = InfluenceEmbedder(
        model, arnoldi_dim=len(hessian), embedding_dim=len(hessian), eigenvalue_rtol=rtol, progress=False
    )
    with pytest.warns(UserWarning, match=f"kept {rank} of embedding_dim"):
        embedder.fit(logreg64.loader("train"))
    assert embedder.arnoldi_breakdown_ and embedder.arnoldi_iterations_ < len(hessian)
    assert embedder.n_components_ == rank

    mu_train = embedder.transform(logreg64.loader("train")).astype(np.float64)
    mu_test = embedder.transform(logreg64.loader("test")).astype(np.float64)
    g_train = explicit_gradients(model, *logreg64.train, names).numpy()
    g_test = explicit_gradients(model, *logreg64.test, names).numpy()
    expected = g_test @ np.linalg.pinv(hessian, rcond=rtol, hermitian=True) @ g_train.T
    np.testing.assert_allclose(mu_test @ mu_train.T, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_float32_model_agrees_with_explicit_influence(mlp32, mlp64):
    """The float32 path (what users run) matches the float64 explicit reference to float32 precision."""
    d = 20
    names = _names(mlp64.model)
    hessian = explicit_hessian(mlp64.model, *mlp64.train, names).numpy()
    _, pinv = _top_pinv(hessian, d)
    g_train = explicit_gradients(mlp64.model, *mlp64.train, names).numpy()
    g_test = explicit_gradients(mlp64.model, *mlp64.test, names).numpy()
    expected = g_test @ pinv @ g_train.T

    # the float32 model is mlp64's weights rounded to float32
    model32 = mlp32.model
    model32.load_state_dict({k: v.float() for k, v in mlp64.model.state_dict().items()})
    embedder = InfluenceEmbedder(model32, arnoldi_dim=len(hessian), embedding_dim=d, progress=False)
    embedder.fit(mlp32.loader("train"))
    got = embedder.transform(mlp32.loader("test")) @ embedder.transform(mlp32.loader("train")).T
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9999
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())


def test_layer_selection_restricts_theta(mlp64):
    """layers=['2'] (last Linear) equals the explicit Hessian restricted to that layer."""
    model = mlp64.model
    names = _names(model, ["2"])
    assert names == ["2.weight", "2.bias"]
    hessian = explicit_hessian(model, *mlp64.train, names).numpy()
    d = 8
    values, pinv = _top_pinv(hessian, d)
    embedder = InfluenceEmbedder(model, layers=["2"], arnoldi_dim=len(hessian), embedding_dim=d, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder.fit(mlp64.loader("train"))
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-8)
    mu = embedder.transform(mlp64.loader("test")).astype(np.float64)
    g = explicit_gradients(model, *mlp64.test, names).numpy()
    expected = g @ pinv @ g.T
    np.testing.assert_allclose(mu @ mu.T, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_sum_reduction_scales_by_dataset_size(mlp64):
    kwargs = dict(arnoldi_dim=30, embedding_dim=10, progress=False)
    mean = InfluenceEmbedder(mlp64.model, **kwargs).fit(mlp64.loader("train"))
    total = InfluenceEmbedder(mlp64.model, hessian_reduction="sum", **kwargs).fit(mlp64.loader("train"))
    n = len(mlp64.train[1])
    np.testing.assert_allclose(total.eigenvalues_.numpy(), n * mean.eigenvalues_.numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        total.transform(mlp64.loader("test")) * np.sqrt(n),
        mean.transform(mlp64.loader("test")),
        rtol=1e-4,
        atol=1e-6,
    )


def test_batching_does_not_change_the_result(mlp64):
    kwargs = dict(arnoldi_dim=40, embedding_dim=10, progress=False)
    a = InfluenceEmbedder(mlp64.model, **kwargs).fit(mlp64.loader("train", batch_size=500))
    b = InfluenceEmbedder(mlp64.model, chunk_size=7, **kwargs).fit(mlp64.loader("train", batch_size=13))
    np.testing.assert_allclose(a.eigenvalues_.numpy(), b.eigenvalues_.numpy(), rtol=1e-8)
    np.testing.assert_allclose(
        np.abs(a.transform(mlp64.loader("test", 500))),
        np.abs(b.transform(mlp64.loader("test", 13))),
        rtol=1e-5,
        atol=1e-6,
    )


class _DictTask(Task):
    """A classifier whose batches are dicts ({"x": inputs, "y": targets})."""

    def logits(self, model, batch):
        return model(batch["x"])

    def targets(self, batch):
        return batch["y"]


def test_per_example_gradients_of_dict_batches_and_in_chunks(mlp64):
    selection = select_parameters(mlp64.model, None)
    x, y = mlp64.test
    naive = explicit_gradients(mlp64.model, x[:9], y[:9], list(selection.names))
    for chunk_size in (None, 4):
        loss = FunctionalLoss(mlp64.model, _DictTask(), selection, chunk_size=chunk_size)
        fast = loss.per_example_grads(loss.params(), {"x": x[:9], "y": y[:9]})
        torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)


def test_directional_derivatives_are_gradients_times_the_projection(mlp64):
    """(B, D) with B != D: forward-mode derivatives along each column of a (|theta|, D) projection."""
    selection = select_parameters(mlp64.model, None)
    loss = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    x, y = mlp64.test
    gradients = explicit_gradients(mlp64.model, x[:7], y[:7], list(selection.names))
    projection = torch.randn(selection.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for chunk_size in (None, 2):
        derivatives = loss.directional_derivatives(loss.params(), (x[:7], y[:7]), projection, chunk_size=chunk_size)
        assert derivatives.shape == (7, 3)
        torch.testing.assert_close(derivatives, gradients @ projection, rtol=1e-10, atol=1e-12)


def test_saved_bytes_count_every_tensor_autograd_keeps(logreg64):
    """A float64 linear model keeps at least its input (for the weight gradient); every saved
    tensor is float64 or int64, and the count grows linearly with the batch."""
    selection = select_parameters(logreg64.model, None)
    loss = FunctionalLoss(logreg64.model, ClassificationTask(), selection)
    x, y = logreg64.train
    saved = [loss.saved_bytes(loss.params(), (x[:b], y[:b])) for b in (10, 20, 30)]
    assert all(s % 8 == 0 for s in saved)
    assert saved[0] >= x[:10].numel() * 8
    assert saved[2] - saved[1] == saved[1] - saved[0] > 0


def test_ggn_of_a_task_with_its_own_loss_is_refused(mlp64):
    class OwnLoss(ClassificationTask):
        def loss(self, model, batch):
            return super().loss(model, batch) ** 2

    selection = select_parameters(mlp64.model, None)
    loss = FunctionalLoss(mlp64.model, OwnLoss(), selection)
    x, y = mlp64.test
    with pytest.raises(InputError, match=r'^curvature="ggn" needs a task whose loss is cross-entropy of its logits; '
                                         r'OwnLoss overrides Task\.loss, so the split into logits and loss is unknown '
                                         r'\(use curvature="hessian"\)$'):
        loss.ggn_block(loss.params(), (x[:4], y[:4]), torch.zeros(2, selection.numel, dtype=torch.float64))


def test_batch_helpers_walk_nested_batches_by_hand():
    from harness.batching import batch_length, move_to, unsqueeze_leaves

    batch = {"ids": torch.arange(12).reshape(4, 3), "extra": (torch.ones(4), [torch.zeros(4, 2), "note", 7])}
    moved = move_to(batch, torch.device("meta"))
    assert list(moved) == ["ids", "extra"] and type(moved["extra"]) is tuple and type(moved["extra"][1]) is list
    assert moved["ids"].device.type == "meta" and moved["ids"].shape == (4, 3) and moved["ids"].dtype == torch.int64
    assert moved["extra"][0].device.type == "meta" and moved["extra"][1][0].device.type == "meta"
    assert moved["extra"][1][1:] == ["note", 7]
    assert move_to("note", torch.device("meta")) == "note"
    # the first tensor leaf gives the length; later leaves need not be tensors
    assert batch_length(batch) == 4 and batch_length((torch.zeros(5, 2), "caption")) == 5
    assert batch_length([{"x": torch.zeros(3)}, torch.zeros(9)]) == 3
    one = unsqueeze_leaves({"ids": torch.arange(3), "pair": (torch.ones(2), [torch.zeros(())])})
    assert one["ids"].tolist() == [[0, 1, 2]] and type(one["pair"]) is tuple and type(one["pair"][1]) is list
    assert one["pair"][0].shape == (1, 2) and one["pair"][1][0].shape == (1,)


def test_select_parameters_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(3, 2)))
    assert select_parameters(model, "0").names == ("0.weight", "0.bias")
    assert select_parameters(model, "2.0.bias").names == ("2.0.bias",)
    chosen = select_parameters(model, ["2", "0.weight", "2.0.bias"])  # model order, no repeats
    assert chosen.names == ("0.weight", "2.0.weight", "2.0.bias") and chosen.shapes == ((3, 2), (2, 3), (2,))
    assert select_parameters(model, "").names == select_parameters(model, None).names  # "" is the model itself
    with pytest.raises(InputError, match=r"^no trainable parameter selected: `layers` is empty$"):
        select_parameters(model, [])
    with pytest.raises(InputError, match=r"^no trainable parameter selected: module '1' has no parameters$"):
        select_parameters(model, "1")
    with pytest.raises(InputError, match=r"^unknown layer name 'zzz': not a module or parameter of the model$"):
        select_parameters(model, "zzz")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(InputError, match=r"^no trainable parameter selected: the model has no parameter with "
                                         r"requires_grad=True$"):
        select_parameters(frozen, None)
    many = torch.nn.ModuleDict({f"block{i}": torch.nn.Linear(1, 1) for i in range(8)})
    with pytest.raises(InputError) as refused:
        select_parameters(many, "block")
    hint = str(refused.value).split("; did you mean one of ")[1]
    assert hint.endswith("]?") and hint.count("'") == 2 * 5  # the five closest names, quoted


class _KeywordModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x, *, scale=1.0):
        return self.linear(x) * scale


class _KeywordTask(ClassificationTask):
    def logits(self, model, batch):
        return model(batch[0], scale=3.0)


def test_functional_loss_passes_keyword_arguments_and_keeps_the_model_out_of_autograd():
    torch.manual_seed(0)
    model = _KeywordModel().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    loss = FunctionalLoss(model, _KeywordTask(), select_parameters(model, "linear.bias"))
    expected = torch.nn.functional.cross_entropy(model(x, scale=3.0), y, reduction="none")
    got = loss.losses(loss.params(), (x, y))
    torch.testing.assert_close(got, expected.detach())
    assert not got.requires_grad  # frozen parameters enter detached: no graph into the model
    assert set(loss.frozen) == {"linear.weight"}
