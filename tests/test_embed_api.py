"""InfluenceEmbedder's API: validation, persistence, modes, seeds, custom tasks, damping, Ritz residuals,
Captum agreement."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import harness
from harness import ClassificationTask, InfluenceEmbedder, InputError, Task
from harness.hessian import select_parameters

from conftest import explicit_gradients, explicit_hessian
from test_embed_exact import _top_pinv


def _loader(x, y, batch_size=32):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_same_seed_same_factors_and_different_seed_same_subspace(mlp64):
    kwargs = dict(arnoldi_dim=40, embedding_dim=8, progress=False)
    a = InfluenceEmbedder(mlp64.model, seed=1, **kwargs).fit(mlp64.loader("train"))
    b = InfluenceEmbedder(mlp64.model, seed=1, **kwargs).fit(mlp64.loader("train"))
    torch.testing.assert_close(a.factors_, b.factors_, rtol=0, atol=0)
    c = InfluenceEmbedder(mlp64.model, seed=2, **kwargs).fit(mlp64.loader("train"))
    assert not torch.equal(a.factors_, c.factors_)  # another start vector, another Krylov basis ...
    # ... converges to the same top eigenpairs: same eigenvalues, same eigenvector subspace
    np.testing.assert_allclose(a.eigenvalues_.numpy(), c.eigenvalues_.numpy(), rtol=1e-9)
    assert subspace_angles(a.factors_.numpy(), c.factors_.numpy()).max() < 1e-8


def test_save_load_roundtrip(tmp_path, mlp64):
    embedder = InfluenceEmbedder(mlp64.model, layers=["2"], arnoldi_dim=20, embedding_dim=5, progress=False)
    embedder.fit(mlp64.loader("train"))
    path = embedder.save(tmp_path / "sub" / "factors.pt")
    assert [p.name for p in path.parent.iterdir()] == ["factors.pt"]  # no temporary file left behind
    loaded = InfluenceEmbedder.load(path, mlp64.model, progress=False)
    assert loaded.layers == ["2"] and loaded.config == embedder.config
    np.testing.assert_array_equal(loaded.transform(mlp64.loader("test")), embedder.transform(mlp64.loader("test")))


def test_load_rejects_a_different_model(tmp_path, mlp64):
    embedder = InfluenceEmbedder(mlp64.model, arnoldi_dim=10, embedding_dim=3, progress=False)
    path = embedder.fit(mlp64.loader("train")).save(tmp_path / "f.pt")
    other = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    with pytest.raises(InputError, match="do not match"):
        InfluenceEmbedder.load(path, other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable factors file"):
        InfluenceEmbedder.load(tmp_path / "junk.pt", mlp64.model)
    with pytest.raises(InputError, match="no factors file"):
        InfluenceEmbedder.load(tmp_path / "missing.pt", mlp64.model)


class _BatchNormDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_batchnorm_and_dropout_run_in_eval_mode_and_mode_is_restored(mlp32):
    torch.manual_seed(0)
    model = _BatchNormDropoutNet()
    model.train()
    x, y = mlp32.train
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(5):
            model.body(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embedder = InfluenceEmbedder(model, layers=["body.0", "head"], arnoldi_dim=30, embedding_dim=6, progress=False)
    embedder.fit(_loader(x, y))
    first = embedder.transform(_loader(*mlp32.test, batch_size=7))
    second = embedder.transform(_loader(*mlp32.test, batch_size=50))  # batch composition must not matter
    np.testing.assert_allclose(first, second, rtol=1e-4, atol=1e-5)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # running statistics untouched
        torch.testing.assert_close(v, before[k])


class _WeightedTask(Task):
    """A user task on dict batches: per-example weighted cross-entropy, weights from the loader."""

    def model_batch(self, batch):
        return {"x": batch[0], "y": batch[1], "w": batch[2]}

    def logits(self, model, batch):
        return model(batch["x"])

    def targets(self, batch):
        return batch["y"]

    def loss(self, model, batch):
        return batch["w"] * super().loss(model, batch)


def test_weighted_dict_task_matches_explicit_weighted_influence(mlp64):
    """Non-uniform weights: the embeddings reproduce (w g_test)^T H_w,D^+ (w g_train), with H_w the
    explicit Hessian of the weighted mean loss, and differ from the unweighted ones."""
    model, d = mlp64.model, 20
    names = list(select_parameters(model, None).names)
    (x, y), (x_test, y_test) = mlp64.train, mlp64.test
    generator = torch.Generator().manual_seed(0)
    w = torch.rand(len(y), generator=generator, dtype=x.dtype) * 1.5 + 0.25
    w_test = torch.rand(len(y_test), generator=generator, dtype=x.dtype) * 1.5 + 0.25
    hessian = explicit_hessian(model, x, y, names, weights=w).numpy()
    _, pinv = _top_pinv(hessian, d)
    g_train = w[:, None].numpy() * explicit_gradients(model, x, y, names).numpy()
    g_test = w_test[:, None].numpy() * explicit_gradients(model, x_test, y_test, names).numpy()
    expected = g_test @ pinv @ g_train.T

    def weighted(*tensors):
        return DataLoader(TensorDataset(*tensors), batch_size=64)

    embedder = InfluenceEmbedder(model, arnoldi_dim=len(hessian), embedding_dim=d, task=_WeightedTask(), progress=False)
    embedder.fit(weighted(x, y, w))
    got = embedder.transform(weighted(x_test, y_test, w_test)) @ embedder.transform(weighted(x, y, w)).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    default = InfluenceEmbedder(model, arnoldi_dim=len(hessian), embedding_dim=d, progress=False)
    default.fit(mlp64.loader("train"))
    unweighted = default.transform(mlp64.loader("test")) @ default.transform(mlp64.loader("train")).T
    assert np.abs(unweighted - expected).max() > 0.05 * np.abs(expected).max()


# ------------------------------------------------------------------ damping and Ritz residuals
def test_damping_inverts_the_shifted_hessian(mlp64):
    """damping=delta: eigenvalues lambda + delta and influences g_test^T V (Lambda + delta)^-1 V^T g_train
    with V, Lambda the explicit Hessian's top-D eigenpairs."""
    model, d, delta = mlp64.model, 20, 0.05
    names = list(select_parameters(model, None).names)
    hessian = explicit_hessian(model, *mlp64.train, names).numpy()
    values, vectors = np.linalg.eigh(hessian)
    top = np.argsort(values)[::-1][:d]
    values, vectors = values[top], vectors[:, top]
    g_train = explicit_gradients(model, *mlp64.train, names).numpy()
    g_test = explicit_gradients(model, *mlp64.test, names).numpy()
    expected = (g_test @ vectors / (values + delta)) @ (g_train @ vectors).T

    embedder = InfluenceEmbedder(model, arnoldi_dim=len(hessian), embedding_dim=d, damping=delta, progress=False)
    embedder.fit(mlp64.loader("train"))
    np.testing.assert_allclose(embedder.eigenvalues_.numpy(), values + delta, rtol=1e-8)
    got = embedder.transform(mlp64.loader("test")) @ embedder.transform(mlp64.loader("train")).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("arnoldi_dim", [12, 82])
def test_ritz_residuals_and_orthonormal_factors_against_the_explicit_hessian(mlp64, arnoldi_dim):
    """ritz_residuals_[i] == ||H m_i - lambda_i m_i|| with the explicit H, after a short (12: residuals
    far from zero) and a full (82 = |theta|) Arnoldi run; the factors M are orthonormal."""
    model = mlp64.model
    names = list(select_parameters(model, None).names)
    hessian = explicit_hessian(model, *mlp64.train, names).numpy()
    assert len(hessian) == 82
    embedder = InfluenceEmbedder(model, arnoldi_dim=arnoldi_dim, embedding_dim=8, progress=False)
    embedder.fit(mlp64.loader("train"))
    factors, values = embedder.factors_.numpy(), embedder.eigenvalues_.numpy()
    np.testing.assert_allclose(factors.T @ factors, np.eye(factors.shape[1]), rtol=0, atol=1e-12)
    explicit = np.linalg.norm(hessian @ factors - factors * values, axis=0)
    np.testing.assert_allclose(embedder.ritz_residuals_, explicit, rtol=1e-6, atol=1e-14)
    if arnoldi_dim < len(hessian):
        assert explicit.max() > 1e-3  # a short run leaves unconverged pairs: the check is not 0 == 0


# ------------------------------------------------------------------ bad input
def _net():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _data(n=20, nan=False, bad_target=False, mismatch=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    if nan:
        x[3, 1] = float("nan")
    y = torch.randint(0, 3, (n,), generator=g)
    if bad_target:
        y[-1] = 7
    if mismatch:
        return [(x, y[:-2])]
    return _loader(x, y, batch_size=8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: InfluenceEmbedder(_net(), layers=["fc"]), "unknown layer name 'fc'"),
        (lambda: InfluenceEmbedder(_net(), layers=["1"]), "no trainable parameter selected"),
        (lambda: InfluenceEmbedder(_net(), layers=[]), "no trainable parameter selected"),
        (lambda: InfluenceEmbedder(_net().requires_grad_(False)), "no trainable parameter selected"),
        (lambda: InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=20), r"embedding_dim \(20\) > arnoldi_dim"),
        (lambda: InfluenceEmbedder(_net(), arnoldi_dim=0), "arnoldi_dim must be >= 1"),
        (lambda: InfluenceEmbedder(_net(), hessian_reduction="max"), "hessian_reduction"),
        (lambda: InfluenceEmbedder("not a model"), "torch.nn.Module"),
    ],
)
def test_bad_construction(make, message):
    with pytest.raises(InputError, match=message):
        make()


@pytest.mark.parametrize(
    "loader, message",
    [
        ([], "empty loader"),
        (_data(nan=True), "non-finite"),
        (_data(bad_target=True), "targets out of range"),
        (_data(mismatch=True), "mismatched lengths"),
        ([(torch.randn(4, 4), torch.rand(4))], "integer class indices"),
        ([{"x": torch.randn(4, 4)}], "expects batches"),
    ],
)
def test_bad_fit_data(loader, message):
    with pytest.raises(InputError, match=message):
        InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=2, progress=False).fit(loader)


def test_bad_transform_data_and_unfitted():
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=2, progress=False)
    with pytest.raises(InputError, match="not fitted"):
        embedder.transform(_data())
    embedder.fit(_data())
    for loader, message in [([], "empty loader"), (_data(nan=True), "non-finite"), (_data(bad_target=True), "out of range")]:
        with pytest.raises(InputError, match=message):
            embedder.transform(loader)


class _LinearLossTask(ClassificationTask):
    """A loss linear in the parameters: its Hessian is exactly zero."""

    def loss(self, model, batch):
        return model(batch[0]).sum(dim=1)


def test_hessian_without_positive_curvature_is_refused():
    with pytest.raises(InputError, match="no positive curvature"):
        InfluenceEmbedder(_net()[:1], arnoldi_dim=5, embedding_dim=2, task=_LinearLossTask(), progress=False).fit(
            _data()
        )


# ------------------------------------------------------------------ Captum
def test_agrees_with_captum_arnoldi(tmp_path, mlp32):
    captum_arnoldi = pytest.importorskip("captum.influence._core.arnoldi_influence_function")
    model = mlp32.model
    train_x, train_y = mlp32.train
    test_x, test_y = mlp32.test
    n_params = sum(p.numel() for p in model.parameters())
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)

    def load(net, path):
        net.load_state_dict(torch.load(path, weights_only=True))
        return 1.0

    captum = captum_arnoldi.ArnoldiInfluenceFunction(
        model,
        TensorDataset(train_x, train_y),
        str(checkpoint),
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=len(train_y),
        projection_dim=20,
        arnoldi_dim=n_params,
        arnoldi_tol=1e-6,
        hessian_reg=0.0,
        hessian_inverse_tol=0.0,
        seed=0,
    )
    theirs = captum.influence((test_x, test_y)).numpy()

    embedder = InfluenceEmbedder(model, arnoldi_dim=n_params, embedding_dim=20, progress=False)
    embedder.fit(_loader(train_x, train_y, 256))
    ours = embedder.transform(_loader(test_x, test_y)) @ embedder.transform(_loader(train_x, train_y)).T
    # Captum factors the Hessian of the summed loss, we of the mean: influences differ by N'.
    ours_in_captum_units = ours / len(train_y)
    # float32 end to end: measured 6e-6 x max; 5e-5 leaves room for other CPU kernels
    np.testing.assert_allclose(ours_in_captum_units, theirs, rtol=0, atol=5e-5 * np.abs(theirs).max())
    # Captum's R holds the projections v_i / sqrt(lambda_i) of the summed-loss Hessian: the same
    # eigenvector subspace as our factors, and R^T R == P P^T / N' with our projection P
    theirs_r = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in captum.R]).double().numpy()
    assert subspace_angles(embedder.factors_.double().numpy(), theirs_r.T).max() < 1e-4
    ours_p = embedder.projection_.double().numpy()
    np.testing.assert_allclose(
        ours_p @ ours_p.T / len(train_y), theirs_r.T @ theirs_r, rtol=0, atol=5e-5 * np.abs(theirs_r.T @ theirs_r).max()
    )


def test_hugging_face_task_with_padding_matches_per_example_autograd():
    """Dict batches with attention masks: vmap'd per-example gradients through a BERT equal a loop
    over single unpadded examples."""
    transformers = pytest.importorskip("transformers")
    from harness import HuggingFaceClassificationTask

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=3, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 50, (6, 7))
    lengths = torch.tensor([7, 3, 5, 7, 2, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    layers = ["bert.pooler.dense", "classifier"]
    embedder = InfluenceEmbedder(model, layers=layers, arnoldi_dim=10, embedding_dim=4, progress=False,
                                 task=HuggingFaceClassificationTask())
    fast = torch.cat(list(embedder.gradients([batch])))
    params = [p for n, p in model.named_parameters() if n.startswith(tuple(layers))]
    for i in range(len(labels)):
        n = int(lengths[i])
        out = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n])
        loss = nn.functional.cross_entropy(out.logits, labels[i : i + 1])
        naive = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(fast[i], naive, rtol=1e-4, atol=1e-6)


def test_constructor_messages_name_the_argument_and_the_settings_are_kept():
    refused = {
        "embedding_dim": (0, r"embedding_dim must be >= 1; got 0"),
        "hessian_reduction": ("max", r"hessian_reduction must be one of 'mean', 'sum'; got 'max'"),
        "eigenvalue_rtol": (1.0, r"eigenvalue_rtol must be in \[0\.0, 1\.0\); got 1\.0"),
        "breakdown_tol": (1.0, r"breakdown_tol must be in \[0\.0, 1\.0\); got 1\.0"),
        "damping": (-1.0, r"damping must be >= 0\.0; got -1\.0"),
        "merge_fit_batches": (1, r"merge_fit_batches must be True or False; got 1"),
        "frozen_prefix": ("no", r"frozen_prefix must be True or False; got 'no'"),
        "float64_basis": (None, r"float64_basis must be True or False; got None"),
        "projection": ("x", r"projection must be one of 'auto', 'gradients', 'forward', 'closed_form', 'layerwise'; "
                            r"got 'x'"),
        "curvature": ("x", r"curvature must be one of 'hessian', 'ggn'; got 'x'"),
        "block_size": (0, r"block_size must be >= 1; got 0"),
        "chunk_size": (0, r"chunk_size must be >= 1; got 0"),
        "progress": ("yes", r"progress must be True or False; got 'yes'"),
        "basis_device": (3, r"basis_device must be a device name such as 'cpu' or 'cuda'; got int"),
    }
    for name, (value, message) in refused.items():
        settings = {"arnoldi_dim": 5, "embedding_dim": 2, name: value}
        with pytest.raises(InputError, match=f"^{message}$"):
            InfluenceEmbedder(_net(), **settings)
    # the boundaries that are allowed, and every setting as given
    # "cpu:0" is not the model's torch.device("cpu"), so a device argument that were ignored would show
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=1, chunk_size=1, device="cpu:0", basis_device="cpu",
                                 breakdown_tol=0.0, eigenvalue_rtol=0.0, damping=0.0, progress=False)
    assert embedder.chunk_size == 1 and embedder._loss.chunk_size == 1
    assert embedder.device == torch.device("cpu:0") and embedder.basis_device == torch.device("cpu")
    assert (embedder.config.breakdown_tol, embedder.config.eigenvalue_rtol, embedder.config.embedding_dim) == (0, 0, 1)
    assert (embedder.config.merge_fit_batches, embedder.config.frozen_prefix, embedder.config.float64_basis) == (
        True, True, False)
    assert InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=2, chunk_size=3)._loss.chunk_size == 3
    assert InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=2).basis_device == torch.device("cpu")


def test_fit_and_transform_messages_name_the_loader():
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=5, embedding_dim=2, progress=False)

    def one_shot():
        yield from _data()

    with pytest.raises(InputError, match=r"^the fit loader is a one-shot iterator \(generator\), but it is passed "
                                         r"over P \+ 1 times: give a DataLoader or a list of batches$"):
        embedder.fit(one_shot())
    with pytest.raises(InputError, match=r"^empty loader: the fit loader yielded no batch$"):
        embedder.fit([])
    with pytest.warns(UserWarning, match=r"have not converged: .*; increase arnoldi_dim \(P=5\) or lower embedding_dim$"):
        embedder.fit(_data())
    with pytest.raises(InputError, match=r"^empty loader: the input loader yielded no batch$"):
        embedder.transform([])


def test_fit_data_batching_leaves_the_eigenpairs_exact():
    """Merged or not, one HVP per batch or blocks, Hessian or Gauss-Newton: the summed curvature
    over every fit batch, against the explicit Hessian of the mean loss (P = |theta|)."""
    torch.manual_seed(0)
    model = _net().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    names = list(select_parameters(model, None).names)
    values = np.linalg.eigvalsh(explicit_hessian(model, x, y, names).numpy())[::-1][:3]
    loader = _loader(x, y, batch_size=8)  # 8 + 8 + 4
    results = {}
    for merge in (True, False):
        for block_size in (1, 4):
            for curvature in ("hessian", "ggn"):
                embedder = InfluenceEmbedder(model, arnoldi_dim=43, embedding_dim=3, block_size=block_size,
                                             merge_fit_batches=merge, curvature=curvature, progress=False).fit(loader)
                assert embedder.n_fit_batches_ == (1 if merge else None)  # held merged, or streamed
                results[merge, block_size, curvature] = embedder.eigenvalues_.numpy()
                assert embedder.eigenvalues_.dtype == torch.float64
    for (merge, block_size, curvature), got in results.items():
        if curvature == "hessian":
            np.testing.assert_allclose(got, values, rtol=1e-8)
        else:
            np.testing.assert_allclose(got, results[True, 1, "ggn"], rtol=1e-8)
    # a single example is a valid fit set
    InfluenceEmbedder(model, arnoldi_dim=5, embedding_dim=1, progress=False).fit([(x[:1], y[:1])])


class _ScaledConv(nn.Module):
    """A convolution whose output a bare parameter scales: neither the closed form nor the
    layer-wise projection applies, so "auto" falls back to forward mode or gradients."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x[:, None, :]) * self.scale).flatten(1))


def _naive_embeddings(embedder, model, x, y):
    names = list(embedder.selection.names)
    return explicit_gradients(model, x, y, names).numpy() @ embedder.projection_.numpy()


def test_auto_projection_falls_back_by_embedding_width_and_every_path_is_exact():
    torch.manual_seed(0)
    model = _ScaledConv().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    loader = _loader(x, y, batch_size=20)
    common = dict(arnoldi_dim=36, curvature="ggn", progress=False)  # P = |theta|; 26 positive eigenvalues
    cases = [(None, 24, "forward"), (None, 25, "gradients"), (["scale", "fc"], 2, "forward"), (["scale", "fc"], 3, "gradients")]
    for layers, d, mode in cases:  # a selected convolution allows forward mode up to D = 24, else up to 2
        embedder = InfluenceEmbedder(model, layers=layers, embedding_dim=d, **common).fit(loader)
        assert embedder.n_components_ == d
        got = embedder.transform(loader)
        assert embedder.projection_mode_ == mode
        np.testing.assert_allclose(got, _naive_embeddings(embedder, model, x, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r'^projection="layerwise" needs every selected parameter to be the weight or '
                                         r"bias of an nn\.Linear, nn\.Conv1d/2d \(groups=1, zero padding\), nn\.LayerNorm "
                                         r"or BatchNorm layer$"):
        InfluenceEmbedder(model, embedding_dim=2, projection="layerwise", **common).fit(loader).transform(loader)
    with pytest.raises(InputError, match=r'^projection="closed_form" needs theta = one nn\.Linear whose output is the '
                                         r"logits of a cross-entropy task \(2-D inputs\)$"):
        InfluenceEmbedder(model, embedding_dim=2, projection="closed_form", **common).fit(loader).transform(loader)


class _Reused(nn.Module):
    """A linear layer whose weight is used a second time outside the layer: the layer-wise
    projection passes the static check and fails the first batch's."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) + torch.tanh(x @ self.linear.weight.T)


def test_requested_and_automatic_projections_are_what_they_say():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    loader = _loader(x, y, batch_size=24)
    net = _net().double()
    common = dict(arnoldi_dim=20, embedding_dim=4, progress=False)
    for layers, projection, mode in [("2", "auto", "closed_form"), (None, "auto", "layerwise"),
                                     (None, "gradients", "gradients"), (None, "forward", "forward")]:
        embedder = InfluenceEmbedder(net, layers=layers, projection=projection, **common).fit(loader)
        got = embedder.transform(loader)
        assert embedder.projection_mode_ == mode
        np.testing.assert_allclose(got, _naive_embeddings(embedder, net, x, y), rtol=1e-5, atol=1e-7)
    reused = _Reused().double()
    with pytest.raises(InputError, match=r'^projection="layerwise" does not apply to this model: a selected parameter '
                                         r"is used outside its layer, examples interact, or a layer input is changed in "
                                         r'place \(use projection="auto"\)$'):
        InfluenceEmbedder(reused, projection="layerwise", **common).fit(loader).transform(loader)
    embedder = InfluenceEmbedder(reused, **common).fit(loader)
    got = embedder.transform(loader)
    assert embedder.projection_mode_ == "gradients"  # layer-wise refused on the first batch, fallen back (D = 4 > 2)
    np.testing.assert_allclose(got, _naive_embeddings(embedder, reused, x, y), rtol=1e-5, atol=1e-7)


def test_transform_and_gradients_streams_with_their_own_names(monkeypatch, tmp_path):
    from harness import embed

    bars = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable, self.kwargs = iterable, kwargs
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

    monkeypatch.setattr(embed, "tqdm", Bar)
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    batches = list(_data())
    embedder.transform(batches)
    assert bars[-1].kwargs == {"total": 3, "desc": "influence embeddings", "disable": True, "leave": False}
    embedder.progress = True
    embedder.transform(iter(batches))  # no length: no total
    assert bars[-1].kwargs == {"total": None, "desc": "influence embeddings", "disable": False, "leave": False}
    shuffled = DataLoader(TensorDataset(*batches[0]), batch_size=4, shuffle=True)
    for method, name in [(embedder.transform, "transform"), (lambda l: list(embedder.gradients(l)), "input")]:
        with pytest.raises(InputError, match=rf"^the {name} loader shuffles"):
            method(shuffled)
    with pytest.raises(InputError, match=r"^empty loader: the input loader yielded no batch$"):
        list(embedder.gradients([]))
    with pytest.raises(InputError, match=r"targets out of range"):
        list(embedder.gradients(_data(bad_target=True)))
    # gradients through a trunk: the head's per-example gradients of the trunk's outputs
    head = nn.Linear(5, 3)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    staged = InfluenceEmbedder(head, arnoldi_dim=10, embedding_dim=2, progress=False,
                               trunk=lambda b: (trunk(b[0]), b[1])).fit(_data())
    (x, y), = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    got = torch.cat(list(staged.gradients(_data())))
    torch.testing.assert_close(got, explicit_gradients(head, trunk(x).detach(), y, ["weight", "bias"]))
    # load passes its keyword arguments on
    path = embedder.save(tmp_path / "factors.pt")
    assert InfluenceEmbedder.load(path, embedder.model, progress=False).progress is False
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(InputError, match=r"^the model's selected parameters do not match the saved factors: saved "
                                         r"\[\('0\.weight', \[5, 4\]\), \('0\.bias', \[5\]\), \('2\.weight', \[3, 5\]\)\]\.\.\., "
                                         r"model \[\('0\.weight', \[6, 4\]\), \('0\.bias', \[6\]\), \('2\.weight', \[3, 6\]\)\]\.\.\.$"):
        InfluenceEmbedder.load(path, other)


def test_fit_batches_are_merged_only_within_the_memory_budget(monkeypatch):
    from harness import embed

    torch.manual_seed(0)
    model = _net()
    batches = list(_data())  # 8 + 8 + 4 examples of 4 float32 inputs and an int64 target: 24 bytes each
    kept = {}

    def fitted(budget, loader=batches):
        monkeypatch.setattr(embed, "memory_budget", lambda device: budget)
        embedder = InfluenceEmbedder(model, arnoldi_dim=10, embedding_dim=2, block_size=1, frozen_prefix=False,
                                     progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            embedder.fit(loader)
        kept[budget] = embedder.eigenvalues_
        return embedder.n_fit_batches_

    assert fitted(24 * 20 - 1) is None  # the inputs do not fit: streamed
    assert fitted(2**40, [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]) is None  # one batch
    counts = [fitted(24 * 20 * 2**k) for k in range(3, 8)]
    assert counts[-1] == 1 and 2 in counts and 3 in counts  # the budget caps a merged batch's examples
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    for eigenvalues in kept.values():  # the same Hessian however the batches are held
        torch.testing.assert_close(eigenvalues, kept[2**40], rtol=1e-4, atol=0)


# ------------------------------------------------- fit's memory rules, by hand
def _prepared(**options):
    """An embedder of _net() with its loss made (what fit does first), its parameters and 10 batches of 2."""
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), progress=False, **options)
    embedder._loss = embedder._make_loss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    return embedder, embedder._loss.params(), x, y


def test_merged_fit_batches_follow_the_memory_budget(monkeypatch):
    from harness import embed

    embedder, params, x, y = _prepared()
    loader = _loader(x, y, batch_size=2)
    first = next(iter(loader))
    input_bytes = 4 * 4 + 8  # one example: 4 float32 features and an int64 target

    def merged(budget, n_examples=20):
        monkeypatch.setattr(embed, "memory_budget", lambda device: budget)
        held = embedder._merged_batches(params, loader, first, n_examples)
        return None if held is None else [len(batch[1]) for batch in held]

    # the inputs of all 20 examples must fit: exactly the budget is allowed, one byte less is not
    assert merged(20 * input_bytes) == [2] * 10  # room for no more than one batch per merge
    assert merged(20 * input_bytes - 1) is None
    assert merged(10**12, n_examples=2) is None  # a single batch: nothing to merge
    # a quarter of the budget holds each merged batch at 3x its saved bytes plus its inputs
    per_example = 3 * embedder._loss.saved_bytes(params, first) / 2 + input_bytes
    assert merged(int(4 * 8.5 * per_example)) == [8, 8, 4]  # room for 8 examples: 4 batches of 2 each
    assert merged(int(4 * 6.5 * per_example)) == [6, 6, 6, 2]
    assert merged(10**12) == [20]
    # the merged batches are the loader's examples in order
    monkeypatch.setattr(embed, "memory_budget", lambda device: int(4 * 8.5 * per_example))
    held = embedder._merged_batches(params, loader, first, 20)
    torch.testing.assert_close(torch.cat([b[0] for b in held]), x)
    torch.testing.assert_close(torch.cat([b[1] for b in held]), y)


def test_frozen_prefix_is_kept_only_when_its_outputs_fit_the_budget(monkeypatch):
    from harness import embed

    embedder, params, x, y = _prepared(layers=["2"])
    loader = _loader(x[:4], y[:4], batch_size=1)
    first = next(iter(loader))
    # per batch of one: the outputs of Linear(4, 5) and ReLU (5 float32 each) and the inputs (4 float32 + int64)
    held_bytes = 4 * (5 + 5) + (4 * 4 + 8)

    def prefix(budget):
        monkeypatch.setattr(embed, "memory_budget", lambda device: budget)
        return embedder._frozen_prefix(params, loader, None, first, 4)

    found = prefix(4 * held_bytes)
    assert found.names == ["0", "1"] and found.bytes_per_batch() == held_bytes and len(found.batches) == 4
    assert prefix(4 * held_bytes - 1) is None
    # over merged fit batches the estimate is per example of the first held batch (all 4), not of the first batch
    from harness.fastpaths import concatenate_batches

    merged = [concatenate_batches(list(loader))]
    monkeypatch.setattr(embed, "memory_budget", lambda device: 4 * held_bytes)
    found = embedder._frozen_prefix(params, loader, merged, first, 4)
    assert found.bytes_per_batch() == 4 * held_bytes and len(found.batches) == 1
    monkeypatch.setattr(embed, "memory_budget", lambda device: 4 * held_bytes - 1)
    assert embedder._frozen_prefix(params, loader, merged, first, 4) is None
    embedder.config.frozen_prefix = False
    assert prefix(10**12) is None


def test_fit_replays_the_prefix_over_the_merged_batches():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    fitted = InfluenceEmbedder(_net(), layers=["2"], arnoldi_dim=6, embedding_dim=2, progress=False).fit(
        _loader(x, y, batch_size=8))
    assert fitted.frozen_prefix_ == ["0", "1"] and fitted.n_fit_batches_ == 1  # 8 + 8 + 4 merged, then replayed


def test_automatic_block_size_without_a_first_batch_is_the_convergence_bound():
    embedder, params, _, _ = _prepared(arnoldi_dim=40, embedding_dim=4, block_size="auto")
    assert embedder._block_size(params, None) == 40 // (2 * 4) - 1  # an empty shard: memory unknown


@pytest.mark.parametrize("float64_basis, basis_dtype", [(True, torch.float64), (False, torch.float32)])
def test_float64_basis_is_the_basis_dtype(monkeypatch, float64_basis, basis_dtype):
    from harness import embed

    bases = []

    def recording(*args, **kwargs):
        result = arnoldi(*args, **kwargs)
        bases.append(result.basis.dtype)
        return result

    arnoldi = embed.arnoldi
    monkeypatch.setattr(embed, "arnoldi", recording)
    torch.manual_seed(0)
    fitted = InfluenceEmbedder(_net(), arnoldi_dim=6, embedding_dim=2, float64_basis=float64_basis,
                               progress=False).fit(_data())
    assert bases == [basis_dtype] and fitted.factors_.dtype == torch.float32


def test_an_empty_shard_is_allowed_under_distributed_but_not_an_empty_world(monkeypatch):
    from harness import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensor: tensor)  # a world of empty shards
    with pytest.raises(InputError, match=r"^empty loader: the fit loaders of all ranks yielded no batch$"):
        InfluenceEmbedder(_net(), arnoldi_dim=6, embedding_dim=2, progress=False).fit([])


def test_non_finite_embeddings_name_their_batch():
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    embedder.factors_[:, 0] = float("nan")
    embedder._projection = None
    with pytest.raises(InputError, match=r"^non-finite values in the influence embeddings of batch 0: "):
        embedder.transform(_data())


@pytest.mark.parametrize("projection", ["closed_form", "forward"])
def test_a_projection_never_materialises_per_example_gradients(projection):
    """closed_form and forward mode exist to avoid the (B, |theta|) gradients: with the
    gradient paths disabled they still give gradients @ projection."""
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), layers=["2"], arnoldi_dim=15, embedding_dim=2, projection=projection,
                                 progress=False).fit(_data())
    expected = (torch.cat(list(embedder.gradients(_data()))) @ embedder.projection_).numpy()

    def refused(*args, **kwargs):
        raise AssertionError("per-example gradients materialised")

    embedder._loss.per_example_grads = refused
    if projection == "closed_form":
        embedder._loss.directional_derivatives = refused
    got = embedder.transform(_data())
    assert embedder.projection_mode_ == projection
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_fit_transform_is_fit_then_transform():
    torch.manual_seed(0)
    model = _net()
    options = dict(arnoldi_dim=15, embedding_dim=2, progress=False)
    both = InfluenceEmbedder(model, **options)
    embeddings = both.fit_transform(_data())
    separate = InfluenceEmbedder(model, **options).fit(_data())
    assert both.is_fitted and both.n_fit_examples_ == 20
    np.testing.assert_array_equal(embeddings, separate.transform(_data()))


def test_load_restores_every_fitted_attribute_in_the_model_dtype(tmp_path):
    torch.manual_seed(0)
    model = _net().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    fitted = InfluenceEmbedder(model, arnoldi_dim=15, embedding_dim=2, progress=False).fit(_loader(x, y, 8))
    path = fitted.save(tmp_path / "factors.pt")
    loaded = InfluenceEmbedder.load(path, model, progress=False)
    torch.testing.assert_close(loaded.factors_, fitted.factors_, rtol=0, atol=0)
    torch.testing.assert_close(loaded.eigenvalues_, fitted.eigenvalues_, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(loaded.ritz_residuals_), np.asarray(fitted.ritz_residuals_))
    np.testing.assert_array_equal(np.asarray(loaded.arnoldi_spectrum_), np.asarray(fitted.arnoldi_spectrum_))
    assert (loaded.arnoldi_iterations_, loaded.arnoldi_breakdown_, loaded.n_fit_examples_) == (
        fitted.arnoldi_iterations_, fitted.arnoldi_breakdown_, 20)
    # float64 factors loaded for the float32 copy of the model come back in float32
    single_model = _net()
    single_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    single = InfluenceEmbedder.load(path, single_model, progress=False)
    assert single.factors_.dtype == torch.float32
    for clash, listed in [({"layers": ["2"]}, "['layers']"), ({"embedding_dim": 3, "seed": 1}, "['embedding_dim', 'seed']")]:
        with pytest.raises(InputError, match=rf"^{re.escape(listed)} come from the factors file and cannot be passed to load$"):
            InfluenceEmbedder.load(path, model, **clash)


# ---------------------------------------------------------------- constructor defaults, messages and fit's warnings
def test_constructor_defaults_are_the_factor_config_defaults():
    """One default per option: InfluenceEmbedder's keyword defaults are FactorConfig's (read
    off a constructed embedder: the signature alone would not see a default the body changes)."""
    import inspect
    from dataclasses import fields

    from harness import FactorConfig

    parameters = inspect.signature(InfluenceEmbedder.__init__).parameters
    embedder = InfluenceEmbedder(nn.Linear(3, 2))
    for field in fields(FactorConfig):
        assert parameters[field.name].default == field.default, field.name
        assert getattr(embedder.config, field.name) == field.default, field.name
    assert parameters["progress"].default is True and parameters["projection"].default == "auto"
    assert embedder.progress is True and embedder.projection_mode == "auto" and embedder.chunk_size is None
    assert embedder.layers is None and embedder.trunk is None and type(embedder.task) is ClassificationTask


@pytest.mark.parametrize("kwargs, message", [
    ({"model": 3}, "model must be a torch.nn.Module; got int"),
    ({"task": "cross-entropy"}, "task must be a harness.Task; got str"),
    ({"trunk": 5}, "trunk must be callable (a module or a function of a batch); got int"),
])
def test_wrong_types_are_named_in_the_message(kwargs, message):
    arguments = {"model": nn.Linear(3, 2), **kwargs}
    with pytest.raises(InputError) as caught:
        InfluenceEmbedder(arguments.pop("model"), None, 4, 2, **arguments)
    assert str(caught.value) == message


def test_an_unfitted_embedder_says_how_to_fit_it():
    embedder = InfluenceEmbedder(nn.Linear(3, 2), None, 4, 2, progress=False)
    with pytest.raises(InputError) as caught:
        embedder.transform(DataLoader(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), batch_size=4))
    assert str(caught.value) == "this InfluenceEmbedder is not fitted: call fit(loader) or InfluenceEmbedder.load first"


def _softmax_regression_loader(n_features: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, n_features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=60)


def assert_outside_the_package(warning: warnings.WarningMessage) -> None:
    """The warning is attributed to a frame outside harness/ (tests/test_errors.py checks that
    it is exactly the caller's line; under mutmut a trampoline frame sits in between)."""
    assert not Path(warning.filename).resolve().is_relative_to(Path(harness.__file__).resolve().parent)


def test_fewer_eigenpairs_warning_names_p_and_points_at_the_caller():
    """Softmax regression has a null space (|theta| = 15, rank <= 10): asking for 11 of P = 12
    warns, from the caller's line, with the number of iterations that ran; the fitted
    attributes say what ran."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    embedder = InfluenceEmbedder(model, None, 12, 11, progress=False, block_size=1)
    with pytest.warns(UserWarning, match=r"kept \d+ of embedding_dim=11") as record:
        embedder.fit(_softmax_regression_loader(4))
    (warning,) = [w for w in record if "kept" in str(w.message)]
    assert_outside_the_package(warning)
    # the Krylov space of a rank-10 Hessian is exhausted before P = 12: Arnoldi stops early and says so
    assert embedder.n_components_ <= 10 and embedder.arnoldi_iterations_ < 12 and embedder.arnoldi_breakdown_ is True
    assert f"P={embedder.arnoldi_iterations_} Arnoldi iterations found no more" in str(warning.message)
    assert embedder.eigenvalues_.dtype == torch.float64


def test_ritz_residual_warning_names_the_worst_pair_and_points_at_the_caller():
    """With P = D the last Ritz pairs have not converged: the warning counts the pairs above a
    tenth of their eigenvalue and names the worst one (1-based), from the caller's line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    embedder = InfluenceEmbedder(model, None, 4, 4, progress=False, block_size=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        embedder.fit(_softmax_regression_loader(6))
    relative = np.asarray(embedder.ritz_residuals_) / embedder.eigenvalues_.numpy()
    assert relative.max() > 0.1  # the regime this test is about
    (warning,) = [w for w in record if "have not converged" in str(w.message)]
    assert_outside_the_package(warning)
    text = str(warning.message)
    assert text.startswith(f"{int((relative > 0.1).sum())} of {len(relative)} kept eigenpairs have not converged")
    assert f"(pair {int(relative.argmax()) + 1}, eigenvalue" in text and "(P=4)" in text


# ------------------------------------------- wiring the mutation run found unchecked
@pytest.mark.parametrize("argument", ["device", "basis_device"])
def test_devices_are_checked_when_the_embedder_is_made(argument):
    with pytest.raises(InputError, match=rf"^{argument} 'meta': only cpu, cuda and mps devices are supported$"):
        InfluenceEmbedder(_net(), progress=False, **{argument: "meta"})


def _forward_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_chunk_size_bounds_the_directions_forward_mode_takes_at_once():
    """vmap over D = 3 directions in chunks of 1 runs the head three times per batch, not once."""
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), layers=["2"], arnoldi_dim=15, embedding_dim=3, projection="forward",
                                 progress=False).fit(_data())
    counts = {}
    for chunk_size in (None, 1):
        embedder.chunk_size = chunk_size
        calls = _forward_calls(embedder.model[2])
        embeddings = embedder.transform(_data())  # batches of 8, 8 and 4
        counts[chunk_size] = calls[0]
        embedder.model[2]._forward_hooks.clear()
        if chunk_size is None:
            whole = embeddings
    assert counts[1] - counts[None] == 3 * (3 - 1)
    np.testing.assert_allclose(embeddings, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


class _CountingLinear(nn.Linear):
    runs = 0

    def forward(self, x):
        type(self).runs += 1
        return super().forward(x)


def test_the_frozen_prefix_runs_a_fixed_number_of_times_however_many_arnoldi_passes():
    """The replayed prefix (layers 0 and 1) computes its outputs to record them, not in each of the
    P passes (a replayed module's forward returns the recorded output; its hooks still fire)."""
    runs = {}
    for frozen_prefix in (True, False):
        for arnoldi_dim in (6, 12):
            torch.manual_seed(0)
            model = nn.Sequential(_CountingLinear(4, 5), nn.ReLU(), nn.Linear(5, 3))
            embedder = InfluenceEmbedder(model, layers=["2"], arnoldi_dim=arnoldi_dim, embedding_dim=2, block_size=1,
                                         frozen_prefix=frozen_prefix, progress=False)
            _CountingLinear.runs = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                embedder.fit(_data())
            assert embedder.frozen_prefix_ == (["0", "1"] if frozen_prefix else [])
            runs[frozen_prefix, arnoldi_dim] = _CountingLinear.runs
    assert runs[True, 6] == runs[True, 12]
    assert runs[False, 12] - runs[False, 6] == 12 - 6  # without the prefix: one more run per pass (batches merged)


def test_progress_shows_the_arnoldi_bar_and_progress_false_shows_nothing(capsys):
    for progress in (True, False):
        torch.manual_seed(0)
        InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=progress).fit(_data())
        err = capsys.readouterr().err
        assert ("Arnoldi (HVPs)" in err) is progress and (err == "") is not progress


def test_fit_runs_block_krylov_with_the_block_size_it_reports(monkeypatch):
    from harness import embed

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["block_size"])
        return real(*args, **kwargs)

    real = embed.arnoldi
    monkeypatch.setattr(embed, "arnoldi", spy)
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=12, embedding_dim=2, block_size=3, progress=False).fit(_data())
    assert seen == [3] == [embedder.block_size_]


def test_a_breakdown_remainder_counts_in_the_ritz_residual(mlp64):
    """A loose breakdown_tol stops Arnoldi with a remainder dropped (6 of 40 iterations here): the
    residuals then come from that remainder alone and still equal ||H m - lambda m||."""
    names = list(select_parameters(mlp64.model, None).names)
    hessian = explicit_hessian(mlp64.model, *mlp64.train, names).numpy()
    embedder = InfluenceEmbedder(mlp64.model, arnoldi_dim=40, embedding_dim=4, block_size=1, breakdown_tol=0.3,
                                 progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        embedder.fit(mlp64.loader("train"))
    assert embedder.arnoldi_breakdown_ and embedder.arnoldi_iterations_ < 40
    factors, values = embedder.factors_.numpy(), embedder.eigenvalues_.numpy()
    explicit = np.linalg.norm(hessian @ factors - factors * values, axis=0)
    assert explicit.min() > 1e-3  # far from converged: the remainder is what the residual measures
    np.testing.assert_allclose(embedder.ritz_residuals_, explicit, rtol=1e-6)


def test_the_convergence_warning_counts_residuals_strictly_above_a_tenth(monkeypatch):
    """Pair 1 sits exactly at a tenth of its eigenvalue (not counted), pair 2 at three tenths."""
    from harness import embed

    def designed(hessenberg, n_components, rtol, deflated):
        _, vectors, _, spectrum = real(hessenberg, n_components, rtol, deflated)
        return np.array([2.0, 1.0]), vectors[:, :2], np.array([0.2, 0.3]), spectrum

    real = embed.top_eigenpairs
    monkeypatch.setattr(embed, "top_eigenpairs", designed)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    (text,) = [str(w.message) for w in record if "converged" in str(w.message)]
    assert text.startswith("1 of 2 kept eigenpairs have not converged: Ritz residual up to 0.3 x its eigenvalue (pair 2")
    monkeypatch.setattr(embed, "top_eigenpairs",
                        lambda *a: (np.array([2.0, 1.0]), real(*a)[1][:, :2], np.array([0.2, 0.1]), real(*a)[3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both pairs exactly at a tenth: no warning
        InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())


def test_merged_batches_hold_whole_bytes_of_a_quarter_budget(monkeypatch):
    """A first batch of 5 then batches of 1: a merged batch's size moves one example at a time, so
    the budget's boundary is exact: room for 6 examples at 4 x ceil(6 x per_example) bytes, 5 one
    byte below. A first batch of one example counts as one (not as a floor of two)."""
    from harness import embed

    embedder, params, x, y = _prepared()
    batches = [(x[:5], y[:5])] + [(x[i:i + 1], y[i:i + 1]) for i in range(5, 20)]
    input_bytes = 4 * 4 + 8

    def merged(budget, loader, first):
        monkeypatch.setattr(embed, "memory_budget", lambda device: budget)
        return [len(b[1]) for b in embedder._merged_batches(params, loader, first, 20)]

    per_example = 3 * embedder._loss.saved_bytes(params, batches[0]) / 5 + input_bytes
    room = 4 * int(np.ceil(6 * per_example))
    assert merged(room, batches, batches[0]) == [6, 6, 6, 2]
    assert merged(room - 1, batches, batches[0]) == [5, 5, 5, 5]
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(20)]
    per_single = 3 * embedder._loss.saved_bytes(params, singles[0]) + input_bytes
    assert merged(4 * int(np.ceil(4 * per_single)), singles, singles[0]) == [4] * 5


def test_the_automatic_block_size_holds_three_times_the_saved_bytes_per_direction(monkeypatch):
    from harness import hessian

    embedder, params, x, y = _prepared(arnoldi_dim=80, embedding_dim=2, block_size="auto")
    first = (x[:10], y[:10])
    per_direction = 3 * embedder._loss.saved_bytes(params, first)
    for directions in (2, 5):
        monkeypatch.setattr(hessian, "memory_budget", lambda device: directions * per_direction)
        assert embedder._block_size(params, first) == directions
        monkeypatch.setattr(hessian, "memory_budget", lambda device: directions * per_direction - 1)
        assert embedder._block_size(params, first) == directions - 1


def test_fit_sizes_the_automatic_block_from_the_first_batch(monkeypatch):
    from harness import hessian

    # 1000 bytes: less than one direction of the first batch (3 x its ~800 saved bytes), but counted
    # without that batch, 1000 directions of one byte (then MAX_BLOCK_SIZE would hold)
    monkeypatch.setattr(hessian, "memory_budget", lambda device: 1000)
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=40, embedding_dim=2, progress=False).fit(_data())
    assert embedder.block_size_ == 1


class _DropoutTrunk(nn.Module):
    """A trunk module over whole batches, with dropout (random in train mode)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5))

    def forward(self, batch):
        return self.body(batch[0]), batch[1]


def test_a_trunk_module_runs_in_eval_mode_and_its_mode_is_restored():
    torch.manual_seed(0)
    trunk, head = _DropoutTrunk(), nn.Linear(5, 3)
    assert trunk.training
    embedder = InfluenceEmbedder(head, arnoldi_dim=10, embedding_dim=2, progress=False, trunk=trunk).fit(_data())
    first, second = embedder.transform(_data()), embedder.transform(_data())
    np.testing.assert_array_equal(first, second)  # dropout off
    assert trunk.training
    x, y = _data().dataset.tensors
    with torch.no_grad():
        features = trunk.eval().body(x)
    expected = explicit_gradients(head, features, y, ["weight", "bias"]) @ embedder.projection_
    np.testing.assert_allclose(first, expected.numpy(), rtol=0, atol=1e-5 * np.abs(first).max())


def test_save_and_load_name_the_factors_file_in_their_errors(tmp_path):
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    with pytest.raises(InputError, match=rf"^factors file {re.escape(str(tmp_path))} is a directory, not a regular file"):
        embedder.save(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(InputError, match=rf"^{re.escape(str(other))} is not an InfluenceEmbedder factors file"):
        InfluenceEmbedder.load(other, _net())


class _Symmetric(nn.Module):
    def forward(self, weight):
        return (weight + weight.flip(-1)) / 2


def test_a_parametrized_bias_free_convolution_counts_as_convolutional():
    """Its selected parameter is the parametrization's (``0.parametrizations.weight.original``), not
    the conv's own: forward mode is chosen as for any convolution (D = 3 is over the linear limit of 2)
    and gives the per-example gradients' embeddings."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, bias=False)
    parametrize.register_parametrization(conv, "weight", _Symmetric())
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    g = torch.Generator().manual_seed(0)
    loader = _loader(torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g), batch_size=6)
    embedder = InfluenceEmbedder(model, layers=["0"], arnoldi_dim=12, embedding_dim=3, progress=False).fit(loader)
    assert embedder.selection.names == ("0.parametrizations.weight.original",)
    automatic = embedder.transform(loader)
    assert embedder.projection_mode_ == "forward"
    expected = (torch.cat(list(embedder.gradients(loader))) @ embedder.projection_).numpy()
    np.testing.assert_allclose(automatic, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_an_empty_shard_embeds_to_zero_rows_under_distributed(monkeypatch):
    """A rank whose transform loader is empty contributes a (0, D) block to the gathered rows; outside
    torch.distributed an empty loader is an error."""
    from harness import distributed

    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    with pytest.raises(InputError, match=r"^empty loader"):
        embedder.transform([])
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "gather_rows", lambda rows: rows)  # this rank's rows only
    empty = embedder.transform([])
    assert empty.shape == (0, 2) and empty.dtype == np.float32


def test_non_finite_gradients_name_their_batch():
    torch.manual_seed(0)
    embedder = InfluenceEmbedder(_net(), arnoldi_dim=10, embedding_dim=2, progress=False).fit(_data())
    real = embedder._loss.per_example_grads
    calls = []

    def overflowing(params, batch):  # the second batch's gradients overflow
        calls.append(1)
        grads = real(params, batch)
        return grads * float("inf") if len(calls) == 2 else grads

    embedder._loss.per_example_grads = overflowing
    with pytest.raises(InputError, match=r"^non-finite values in the per-example gradients of batch 1: "):
        list(embedder.gradients(_data()))
