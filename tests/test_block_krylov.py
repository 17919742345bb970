"""Block Krylov FactorHessian, the Gauss-Newton curvature and the automatic projection,
each against a naive reference: explicit Hessians and Gauss-Newton matrices in float64,
a textbook scalar Arnoldi, per-example gradients and Captum."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, InputError
from harness.fastpaths import FastInfluenceEmbedder, LinearHeadLoss, LinearizedHessianLoss, fixed_batches
from harness.hessian import FunctionalLoss, automatic_block_size, full_precision, select_parameters
from harness.task import ClassificationTask, Task

from conftest import _digits, explicit_gradients, explicit_hessian, train_lbfgs


@pytest.fixture(scope="module")
def wide_mlp():
    """A 16-16-10 tanh MLP on digits (442 parameters, float64): P << |theta| is possible."""
    train, test = _digits(16, 10, torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    train_lbfgs(model, *train, weight_decay=1e-3)
    names = list(select_parameters(model, None).names)
    hessian = explicit_hessian(model, *train, names).numpy()
    return model, train, test, names, hessian


def _loader(x, y, batch_size=200):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _top(matrix: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1][:d]
    return values[order], vectors[:, order]


def _fit(model, loader, **kwargs) -> InfluenceEmbedder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return InfluenceEmbedder(model, progress=False, **kwargs).fit(loader)


def test_block_size_one_is_textbook_arnoldi(mlp64):
    """block_size=1 reproduces a plain Arnoldi on the explicit Hessian from the same start vector."""
    model = mlp64.model
    hessian = explicit_hessian(model, *mlp64.train, list(select_parameters(model, None).names)).numpy()
    p, d = 25, 6
    start = torch.randn(len(hessian), generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    basis = [start / np.linalg.norm(start)]
    restriction = np.zeros((p, p))
    for k in range(p):
        w = hessian @ basis[k]
        for j in range(k + 1):  # modified Gram-Schmidt, twice
            for _ in range(2):
                h = basis[j] @ w
                w = w - h * basis[j]
                restriction[j, k] += h
        if k + 1 < p:
            restriction[k + 1, k] = np.linalg.norm(w)
            basis.append(w / restriction[k + 1, k])
    values, vectors = _top((restriction + restriction.T) / 2, d)
    expected = np.stack(basis, axis=1) @ vectors

    embedder = _fit(model, mlp64.loader("train"), arnoldi_dim=p, embedding_dim=d, seed=3, block_size=1)
    assert embedder.block_size_ == 1
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-10)
    got = embedder.factors_.numpy()
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=0, atol=1e-7)


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_block_krylov_with_p_equal_to_theta_gives_the_exact_eigenpairs(mlp64, block_size):
    model = mlp64.model
    names = list(select_parameters(model, None).names)
    hessian = explicit_hessian(model, *mlp64.train, names).numpy()
    d = 10
    values, vectors = _top(hessian, d)
    embedder = _fit(model, mlp64.loader("train"), arnoldi_dim=len(hessian), embedding_dim=d, block_size=block_size)
    assert embedder.block_size_ == block_size
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-9)
    overlap = np.linalg.svd(vectors.T @ embedder.factors_.numpy(), compute_uv=False)
    np.testing.assert_allclose(overlap, 1, atol=1e-8)


@pytest.mark.parametrize("p, block_size", [(40, 1), (40, "auto"), (64, 4), (64, "auto"), (80, 8)])
def test_block_krylov_with_p_much_smaller_than_theta(wide_mlp, p, block_size):
    """The regime experiments use (P = 5-10 D << |theta| = 442): top-D eigenvalues and
    the top-D influence of the explicit Hessian, for the block sizes auto picks."""
    model, train, test, names, hessian = wide_mlp
    d = 8
    values, vectors = _top(hessian, d)
    embedder = _fit(model, _loader(*train), arnoldi_dim=p, embedding_dim=d, block_size=block_size, seed=1)
    assert block_size != "auto" or embedder.block_size_ == {40: 1, 64: 3}[p]
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-6)
    g = explicit_gradients(model, *test, names).numpy()
    expected = (g @ vectors / values) @ (vectors.T @ g.T)
    mu = embedder.transform(_loader(*test)).astype(np.float64)
    assert np.corrcoef((mu @ mu.T).ravel(), expected.ravel())[0, 1] > 0.99999


def test_block_krylov_agrees_with_plain_arnoldi_and_captum(tmp_path, mlp32):
    captum_arnoldi = pytest.importorskip("captum.influence._core.arnoldi_influence_function")
    model = mlp32.model
    (train_x, train_y), (test_x, test_y) = mlp32.train, mlp32.test
    n_params = sum(p.numel() for p in model.parameters())
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    captum = captum_arnoldi.ArnoldiInfluenceFunction(
        model, TensorDataset(train_x, train_y), str(checkpoint),
        checkpoints_load_func=lambda net, path: net.load_state_dict(torch.load(path, weights_only=True)) and 1.0,
        loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=len(train_y), projection_dim=10,
        arnoldi_dim=n_params, arnoldi_tol=1e-6, hessian_reg=0.0, hessian_inverse_tol=0.0, seed=0,
    )
    theirs = captum.influence((test_x, test_y)).numpy()

    def influence(block_size: int) -> np.ndarray:
        embedder = _fit(model, _loader(train_x, train_y), arnoldi_dim=n_params, embedding_dim=10, block_size=block_size)
        return embedder.transform(_loader(test_x, test_y)) @ embedder.transform(_loader(train_x, train_y)).T

    plain, block = influence(1), influence(8)
    assert np.corrcoef(plain.ravel(), block.ravel())[0, 1] > 0.99999
    assert np.corrcoef(block.ravel() / len(train_y), theirs.ravel())[0, 1] >= 0.999


def test_automatic_block_size_follows_p_over_d_and_memory():
    cpu = torch.device("cpu")
    assert automatic_block_size(1, n_iterations=20, n_components=5, device=cpu) == 1
    assert automatic_block_size(1, n_iterations=500, n_components=100, device=cpu) == 1  # the paper's P = 5 D
    assert automatic_block_size(1, n_iterations=1000, n_components=100, device=cpu) == 4
    assert automatic_block_size(1, n_iterations=5000, n_components=100, device=cpu) == 8
    assert automatic_block_size(2**60, n_iterations=5000, n_components=100, device=cpu) == 1  # no memory


def test_float64_basis_and_full_precision(mlp32, mlp64):
    """A float64 basis on a float32 model stays as close to the float64 reference, and TF32
    is off inside fit/transform and restored after."""
    model32 = mlp32.model
    model32.load_state_dict({k: v.float() for k, v in mlp64.model.state_dict().items()})
    names = list(select_parameters(mlp64.model, None).names)
    values, _ = _top(explicit_hessian(mlp64.model, *mlp64.train, names).numpy(), 5)
    embedder = _fit(model32, mlp32.loader("train"), arnoldi_dim=60, embedding_dim=5, float64_basis=True)
    assert embedder.factors_.dtype == torch.float32
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-4)

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_unconverged_eigenpairs_warn(wide_mlp):
    model, train, *_ = wide_mlp
    with pytest.warns(UserWarning, match="have not converged"):
        InfluenceEmbedder(model, arnoldi_dim=10, embedding_dim=8, progress=False).fit(_loader(*train))


# ---------------------------------------------------------------- Gauss-Newton
def _explicit_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> np.ndarray:
    """mean_i J_i^T (diag(p_i) - p_i p_i^T) J_i, every Jacobian formed explicitly."""
    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}
    flat = torch.cat([chosen[n].reshape(-1) for n in names])

    def logits(vec):
        out, start = {}, 0
        for n in names:
            out[n] = vec[start : start + chosen[n].numel()].view_as(chosen[n])
            start += chosen[n].numel()
        return functional_call(model, {**frozen, **out}, (x,))

    jac = jacrev(logits)(flat)  # (N, C, |theta|)
    probs = torch.softmax(logits(flat), dim=-1)
    h_z = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_z, jac).numpy() / len(y)


def test_ggn_products_and_eigenpairs_match_the_explicit_gauss_newton_matrix(mlp64):
    model = mlp64.model
    selection = select_parameters(model, None)
    names = list(selection.names)
    ggn = _explicit_ggn(model, *mlp64.train, names)
    loss = FunctionalLoss(model, ClassificationTask(), selection)
    vectors = torch.randn(3, selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = loss.ggn_block(loss.params(), tuple(mlp64.train), vectors) / len(mlp64.train[1])
    torch.testing.assert_close(got, vectors @ torch.as_tensor(ggn).T, rtol=1e-9, atol=1e-12)

    d = 10
    values, _ = _top(ggn, d)
    embedder = _fit(model, mlp64.loader("train"), arnoldi_dim=len(ggn), embedding_dim=d, curvature="ggn")
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values, rtol=1e-8)
    assert embedder.arnoldi_spectrum_.min() > -1e-10 * embedder.arnoldi_spectrum_.max()  # positive semi-definite
    hessian_values, _ = _top(explicit_hessian(model, *mlp64.train, names).numpy(), d)
    assert not np.allclose(values, hessian_values, rtol=1e-3)  # a different curvature


def test_ggn_of_a_linear_model_is_its_hessian(logreg64):
    """Softmax regression: J^T H_z J is the Hessian; the closed-form head uses that."""
    model = logreg64.model
    selection = select_parameters(model, None)
    autograd, closed = FunctionalLoss(model, ClassificationTask(), selection), LinearHeadLoss(model, ClassificationTask())
    vectors = torch.randn(4, selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    batch = tuple(logreg64.train)
    params = autograd.params()
    expected = torch.stack([autograd.hvp(params, batch, v) for v in vectors])
    for got in (autograd.ggn_block(params, batch, vectors), autograd.hvp_block(params, batch, vectors),
                closed.hvp_block(params, batch, vectors), closed.ggn_block(params, batch, vectors)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_ggn_needs_a_cross_entropy_task(mlp64):
    class SquaredError(ClassificationTask):
        def loss(self, model, batch):
            return (model(batch[0]) ** 2).sum(dim=1)

    with pytest.raises(InputError, match="ggn"):
        _fit(mlp64.model, mlp64.loader("train"), arnoldi_dim=5, embedding_dim=2, curvature="ggn", task=SquaredError())
    with pytest.raises(InputError, match="curvature"):
        InfluenceEmbedder(mlp64.model, curvature="fisher")
    with pytest.raises(InputError, match="block_size"):
        InfluenceEmbedder(mlp64.model, block_size=0)


def test_linearized_block_hvps_match_plain_hvps(mlp64):
    selection = select_parameters(mlp64.model, None)
    plain = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    traced = LinearizedHessianLoss(FunctionalLoss(mlp64.model, ClassificationTask(), selection))
    params, batch = plain.params(), tuple(mlp64.train)
    vectors = torch.randn(5, selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = torch.stack([plain.hvp(params, batch, v) for v in vectors])
    torch.testing.assert_close(plain.hvp_block(params, batch, vectors), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(traced.hvp_block(params, batch, vectors), expected, rtol=1e-10, atol=1e-12)
    fast = FastInfluenceEmbedder(mlp64.model, arnoldi_dim=40, embedding_dim=8, block_size=4, progress=False)
    core = InfluenceEmbedder(mlp64.model, arnoldi_dim=40, embedding_dim=8, block_size=4, progress=False)
    batches = fixed_batches(mlp64.train, 128)
    np.testing.assert_allclose(fast.fit(batches).eigenvalues_.numpy(), core.fit(batches).eigenvalues_.numpy(), rtol=1e-9)


# ---------------------------------------------------------------- automatic projection
class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_automatic_projection_picks_an_exact_path(mlp64):
    """Closed form for a last linear layer, layer-wise for Linear/Conv/norm layers; with
    other layers in theta forward mode for small D, per-example gradients otherwise; each
    equals the per-example-gradient embeddings."""
    torch.manual_seed(0)
    images = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,))
    conv = SmallConvNet().double()
    with_prelu = nn.Sequential(mlp64.model[0], nn.PReLU().double(), mlp64.model[2])  # PReLU: no layer-wise rule
    cases = [
        (mlp64.model, "2", mlp64.loader("train"), mlp64.loader("test"), 4, "closed_form"),
        (mlp64.model, None, mlp64.loader("train"), mlp64.loader("test"), 2, "layerwise"),
        (with_prelu, None, mlp64.loader("train"), mlp64.loader("test"), 2, "forward"),
        (with_prelu, None, mlp64.loader("train"), mlp64.loader("test"), 6, "gradients"),
        (conv, None, _loader(images, labels, 16), _loader(images, labels, 16), 4, "layerwise"),
        (conv, "fc", _loader(images, labels, 16), _loader(images, labels, 16), 4, "closed_form"),
    ]
    for model, layers, fit_loader, test_loader, d, expected in cases:
        auto = _fit(model, fit_loader, layers=layers, arnoldi_dim=5 * d, embedding_dim=d, block_size=1)
        got = auto.transform(test_loader)
        assert auto.projection_mode_ == expected, (layers, d)
        auto.projection_mode = "gradients"
        np.testing.assert_allclose(got, auto.transform(test_loader), rtol=1e-6, atol=1e-9)
        assert auto.projection_mode_ == "gradients"
    with pytest.raises(InputError, match="closed_form"):
        embedder = _fit(mlp64.model, mlp64.loader("train"), arnoldi_dim=10, embedding_dim=2, projection="closed_form")
        embedder.transform(mlp64.loader("test"))


# ---------------------------------------------------------------- frozen trunk
def test_trunk_argument_equals_the_full_model_with_the_suffix_selected(mlp64):
    """trunk = the frozen first layers, model = the selected suffix: same factors and
    embeddings as the full model with layers='2'."""
    model = mlp64.model
    full = _fit(model, mlp64.loader("train"), layers="2", arnoldi_dim=20, embedding_dim=6, seed=4)
    trunk = model[:2]
    split = _fit(model[2], mlp64.loader("train"), arnoldi_dim=20, embedding_dim=6, seed=4,
                 trunk=lambda batch: (trunk(batch[0]), batch[1]))
    np.testing.assert_allclose(split.eigenvalues_.numpy(), full.eigenvalues_.numpy(), rtol=1e-10)
    np.testing.assert_allclose(split.transform(mlp64.loader("test")), full.transform(mlp64.loader("test")),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(InputError, match="trunk"):
        InfluenceEmbedder(model[2], trunk="layer3")


def test_table1_configuration_takes_the_gauss_newton_curvature(mlp64):
    """InfEmbedConfig(curvature="ggn") (the ablation row) reaches FactorHessian; the Hessian
    default keeps the cache key it had before the field existed."""
    from dataclasses import asdict

    from harness.dcbench.methods import InfEmbedConfig, influence_embeddings
    from harness.dcbench.runner import _config_record

    x, y = (t.float() if t.is_floating_point() else t for t in mlp64.train)
    head = copy.deepcopy(mlp64.model).float()
    fit, embed = (x.numpy(), y.numpy()), (x[:40].numpy(), y[:40].numpy())
    config = InfEmbedConfig(arnoldi_dim=20, embedding_dim=5, n_fit=200)
    (hessian,), _ = influence_embeddings(head, config, fit, embed)
    (ggn,), _ = influence_embeddings(head, replace(config, curvature="ggn"), fit, embed)
    assert hessian.shape == ggn.shape and not np.allclose(np.abs(hessian), np.abs(ggn), rtol=1e-3)
    assert "curvature" not in _config_record(config) and _config_record(replace(config, curvature="ggn"))["curvature"] == "ggn"
    assert set(asdict(config)) - set(_config_record(config)) == {"curvature"}
    with pytest.raises(InputError, match="curvature"):
        InfEmbedConfig(curvature="fisher")


def test_automatic_block_size_boundaries_and_device_memory(monkeypatch):
    """P / (2 D) - 1 = 2 is the smallest bound that allows blocks; on CUDA the device's own total
    memory (not the host's) bounds the block."""
    cpu = torch.device("cpu")
    assert automatic_block_size(1, n_iterations=30, n_components=5, device=cpu) == 2
    assert automatic_block_size(1, n_iterations=29, n_components=5, device=cpu) == 1

    asked = []

    def properties(device):
        asked.append(device)
        return type("Properties", (), {"total_memory": total_memory})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    cuda = torch.device("cuda", 1)
    total_memory = 4 * 3 * 1000  # a quarter holds 3 directions of 1000 bytes
    assert automatic_block_size(1000, n_iterations=5000, n_components=100, device=cuda) == 3
    assert asked == [cuda]
    total_memory = 4 * 3  # 3 directions of 1 byte; a 0-byte estimate counts as 1 byte
    assert automatic_block_size(1, n_iterations=5000, n_components=100, device=cuda) == 3
    assert automatic_block_size(0, n_iterations=5000, n_components=100, device=cuda) == 3
    assert automatic_block_size(1000, n_iterations=5000, n_components=100, device=cpu) == 8


def test_top_eigenpairs_rtol_cut_refusal_and_residuals():
    from harness.hessian import top_eigenpairs

    restriction = np.diag([4.0, 1.0, 0.5])
    assert top_eigenpairs(restriction, 3, rtol=0.25)[0].tolist() == [4.0]  # 1 = 0.25 x 4 is not kept
    assert top_eigenpairs(restriction, 3, rtol=0.2)[0].tolist() == [4.0, 1.0]
    with pytest.raises(InputError, match=r"^the Hessian has no positive curvature in the Krylov space \(largest "
                                         r"eigenvalue -1\); influence embeddings are undefined\. Is the model trained\?$"):
        top_eigenpairs(np.array([[-1.0]]), 1, rtol=1e-6)
    # eigenvectors e_j: residual j = |row below R at j| + |deflated remainder j|
    hessenberg = np.vstack([np.diag([3.0, 2.0, 1.0]), [[0.1, 0.0, -0.2]]])
    deflated = np.array([0.05, 0.0, -0.3])
    np.testing.assert_allclose(top_eigenpairs(hessenberg, 3, 1e-6)[2], [0.1, 0.0, 0.2], atol=1e-15)
    np.testing.assert_allclose(top_eigenpairs(hessenberg, 3, 1e-6, deflated)[2], [0.15, 0.0, 0.5], atol=1e-15)


def test_iterate_batches_validates_the_first_batch_moves_and_refuses_empty(mlp64):
    from harness.hessian import iterate_batches

    class Recording(ClassificationTask):
        def validate(self, model, batch):
            seen.append(int(batch[1][0]))

    task = Recording()
    loss = FunctionalLoss(mlp64.model, task, select_parameters(mlp64.model, None))
    x, y = mlp64.test
    batches = [(x[i : i + 2], torch.full((2,), i, dtype=torch.long)) for i in range(3)]
    for validate, expected in ((False, [0]), (True, [0, 1, 2])):
        seen = []
        got = list(iterate_batches(batches, task, loss, torch.device("cpu"), validate=validate, what="fit"))
        assert [i for i, _ in got] == [0, 1, 2] and seen == expected
    moved = list(iterate_batches(batches[:1], Task(), loss, torch.device("meta"), validate=False, what="fit"))
    assert moved[0][1][0].device.type == "meta"
    with pytest.raises(InputError, match="^empty loader: the fit loader yielded no batch$"):
        list(iterate_batches([], task, loss, torch.device("cpu"), validate=False, what="fit"))
    assert list(iterate_batches([], task, loss, torch.device("cpu"), validate=False, what="fit", allow_empty=True)) == []


def _arnoldi_on(matrix: np.ndarray, p: int, seed: int = 5, **kwargs):
    from harness.hessian import arnoldi

    a = torch.from_numpy(matrix)
    options = dict(generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device=torch.device("cpu"),
                   basis_device=torch.device("cpu"), breakdown_tol=1e-10, progress=False)
    return arnoldi(lambda block: block @ a, len(matrix), p, **{**options, **kwargs})


def test_arnoldi_by_default_is_textbook_arnoldi_on_an_explicit_matrix(capsys):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    matrix = (q * np.linspace(1, 9, 9)) @ q.T
    p = 5
    start = torch.randn(9, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    basis, hess = [start / np.linalg.norm(start)], np.zeros((p + 1, p))
    for k in range(p):  # textbook Arnoldi, one vector at a time
        w = matrix @ basis[k]
        for j in range(k + 1):
            hess[j, k] = basis[j] @ w
            w = w - hess[j, k] * basis[j]
        hess[k + 1, k] = np.linalg.norm(w)
        basis.append(w / hess[k + 1, k])
    result = _arnoldi_on(matrix, p)  # no block_size: one direction per pass
    assert not result.breakdown and result.basis.dtype == torch.float64 and result.hessenberg.dtype == np.float64
    np.testing.assert_allclose(result.basis.numpy(), np.stack(basis[:p]), atol=1e-12)
    np.testing.assert_allclose(result.hessenberg, hess, atol=1e-12)
    np.testing.assert_array_equal(result.deflated, np.zeros(p))
    assert capsys.readouterr().err == ""
    # P >= |theta| is cut to |theta|; with blocks the restriction carries the exact spectrum
    for block_size in (1, 3, 20):
        full = _arnoldi_on(matrix, 50, block_size=block_size, progress=True)
        assert full.basis.shape == (9, 9) and full.hessenberg.shape[1] == 9
        np.testing.assert_allclose(full.basis.numpy() @ full.basis.numpy().T, np.eye(9), atol=1e-12)
        restriction = full.hessenberg[:9, :9]
        np.testing.assert_allclose(restriction, full.basis.numpy() @ matrix @ full.basis.numpy().T, atol=1e-10)
        np.testing.assert_allclose(np.linalg.eigvalsh((restriction + restriction.T) / 2), np.linspace(1, 9, 9),
                                   atol=1e-10)
        assert "Arnoldi (HVPs)" in capsys.readouterr().err


def test_arnoldi_stops_when_the_krylov_space_is_invariant():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    matrix = (q[:, :3] * [3.0, 2.0, 1.0]) @ q[:, :3].T  # rank 3: the Krylov space of any start has dimension 4
    result = _arnoldi_on(matrix, 8)
    assert result.breakdown and result.basis.shape == (4, 8) and result.hessenberg.shape == (4, 4)
    assert 0 < result.deflated[3] < 1e-10 * 3 and not result.deflated[:3].any()
    values = np.linalg.eigvalsh((result.hessenberg + result.hessenberg.T) / 2)
    np.testing.assert_allclose(values, [0, 1, 2, 3], atol=1e-9)
    # a looser tolerance deflates earlier: remainders below breakdown_tol x the largest HVP norm
    early = _arnoldi_on(matrix, 8, breakdown_tol=0.9)
    assert early.breakdown and early.basis.shape[0] < 4


def test_arnoldi_start_block_deflation_and_scale_invariance():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    matrix = (q * np.geomspace(1, 100, 9)) @ q.T
    # the start block: Gram-Schmidt of the generator's first draws, one row after the other
    g = torch.Generator().manual_seed(5)
    draws = np.stack([torch.randn(9, generator=g, dtype=torch.float64).numpy() for _ in range(3)])
    start = np.linalg.qr(draws.T)[0].T * np.sign(np.diag(np.linalg.qr(draws.T)[1]))[:, None]
    blocked = _arnoldi_on(matrix, 9, block_size=3)
    np.testing.assert_allclose(blocked.basis[:3].numpy(), start, atol=1e-12)
    # single precision: the basis and HVPs stay float32
    single = _arnoldi_on(matrix.astype(np.float32), 9, block_size=3, dtype=torch.float32)
    assert single.basis.dtype == torch.float32 and single.basis.shape == (9, 9)
    restriction = single.hessenberg[:9, :9]
    np.testing.assert_allclose(np.linalg.eigvalsh((restriction + restriction.T) / 2), np.geomspace(1, 100, 9),
                               rtol=1e-4)
    # blocks drop only remainders at round-off level, whatever breakdown_tol says; plain Arnoldi obeys it
    assert _arnoldi_on(matrix, 9, block_size=3, breakdown_tol=0.9).basis.shape == (9, 9)
    plain = _arnoldi_on(matrix, 9, breakdown_tol=0.3)
    assert plain.breakdown and plain.basis.shape[0] < 9
    # the deflation test is relative to the largest HVP norm: a scaled matrix deflates alike
    for factor in (1e-6, 1e6):
        scaled = _arnoldi_on(matrix * factor, 9, breakdown_tol=0.3)
        assert scaled.basis.shape == plain.basis.shape
        np.testing.assert_allclose(scaled.basis.numpy(), plain.basis.numpy(), atol=1e-10)
        np.testing.assert_allclose(scaled.hessenberg, plain.hessenberg * factor, rtol=1e-9, atol=1e-12 * factor)
    # a zero curvature deflates at once even with breakdown_tol = 0 (the remainder is exactly 0)
    zero = _arnoldi_on(np.zeros((9, 9)), 9, breakdown_tol=0.0)
    assert zero.breakdown and zero.basis.shape == (1, 9) and zero.hessenberg.shape == (1, 1)
    assert zero.hessenberg[0, 0] == 0 and zero.deflated.tolist() == [0.0]


def test_arnoldi_counts_hvps_in_its_progress_bar_and_names_non_finite_passes(monkeypatch):
    from harness import hessian

    bars = []

    class Bar:  # records what arnoldi asks of tqdm
        def __init__(self, **kwargs):
            self.kwargs, self.updates, self.closed = kwargs, [], False
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            self.closed = True

    monkeypatch.setattr(hessian, "tqdm", Bar)
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    matrix = (q * np.linspace(1, 9, 9)) @ q.T
    for progress in (True, False):
        result = _arnoldi_on(matrix, 8, block_size=3, progress=progress)  # P not a multiple of the block
        assert result.basis.shape == (8, 9) and result.hessenberg.shape[1] == 8 and not result.breakdown
        bar = bars.pop()
        assert bar.kwargs == {"total": 8, "desc": "Arnoldi (HVPs)", "disable": not progress, "leave": False}
        assert bar.updates == [3, 3, 2] and bar.closed

    calls = []

    def poisoned(block):  # the second pass (directions 3..5) returns NaN
        calls.append(len(block))
        out = block @ torch.from_numpy(matrix)
        return out * float("nan") if len(calls) == 2 else out

    with pytest.raises(InputError, match=r"^non-finite values in the Hessian-vector products of Arnoldi directions 3\.\.5:"):
        hessian.arnoldi(poisoned, 9, 8, block_size=3, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                device=torch.device("cpu"), basis_device=torch.device("cpu"), breakdown_tol=1e-10, progress=False)
