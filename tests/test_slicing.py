"""Slices: K-Means, InfEmbed-Rule (Algorithm 6), opponents (against leave-one-out retraining), Lemma 1, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness import (
    InfluenceEmbedder,
    InputError,
    kmeans_slices,
    rule_slices,
    slice_influence,
    slice_opponents,
    slice_proponents,
    summarize_slices,
)
from harness.hessian import select_parameters

from conftest import Problem, _digits as digits, explicit_gradients, explicit_hessian
from test_embed_exact import _top_pinv


def _blob(rng, centre, n, spread=0.05):
    return np.asarray(centre, dtype=float) + spread * rng.standard_normal((n, len(centre)))


def _correct(rng, n, accuracy):
    out = np.zeros(n, dtype=bool)
    out[rng.permutation(n)[: int(round(accuracy * n))]] = True
    return out


@pytest.fixture
def hand_built():
    """Three far-apart regions (B=3). A: 40 pts, acc 0.2, itself two sub-blobs (returned whole).
    B: 10 pts, acc 0.0 (smaller than S=20: dropped). C: three sub-blobs: C1 30 pts acc 0.3 (returned),
    C2 30 pts acc 1.0 (split again, its parts are < S: dropped), C3 6 pts acc 0 (dropped)."""
    rng = np.random.default_rng(0)
    parts = {
        "A1": (_blob(rng, [0, 0, 0], 20), _correct(rng, 20, 0.2)),
        "A2": (_blob(rng, [0, 0, 1], 20), _correct(rng, 20, 0.2)),
        "B": (_blob(rng, [100, 0, 0], 10), _correct(rng, 10, 0.0)),
        "C1": (_blob(rng, [0, 100, 0], 30), _correct(rng, 30, 0.3)),
        "C2": (_blob(rng, [0, 110, 0], 30), _correct(rng, 30, 1.0)),
        "C3": (_blob(rng, [0, 100, 10], 6), _correct(rng, 6, 0.0)),
    }
    emb = np.concatenate([p[0] for p in parts.values()])
    correct = np.concatenate([p[1] for p in parts.values()])
    bounds, start = {}, 0
    for name, (x, _) in parts.items():
        bounds[name] = np.arange(start, start + len(x))
        start += len(x)
    return emb, correct, bounds


def test_rule_returns_exactly_algorithm_6_regions(hand_built):
    emb, correct, parts = hand_built
    assert correct.mean() > 0.4  # the root itself does not meet the rule
    slices, tree = rule_slices(emb, correct, max_accuracy=0.4, min_size=20, branching=3, max_depth=5, seed=0)
    got = sorted(tuple(sorted(s)) for s in slices)
    expected = sorted([tuple(np.concatenate([parts["A1"], parts["A2"]])), tuple(parts["C1"])])
    assert got == expected
    statuses = {n.status for n in tree.walk()}
    assert {"returned", "too_small", "split"} <= statuses
    for node in tree.walk():
        if node.status == "returned":
            assert node.accuracy <= 0.4 and node.size >= 20 and not node.children
        if node.status == "too_small":
            assert node.size < 20
        if node.status == "split":
            # children partition the parent: no point is lost by the tree itself
            assert sorted(np.concatenate([c.indices for c in node.children])) == sorted(node.indices)


def test_rule_depth_limit_drops_unfinished_regions(hand_built):
    emb, correct, parts = hand_built
    slices, tree = rule_slices(emb, correct, max_accuracy=0.4, min_size=20, branching=3, max_depth=1, seed=0)
    assert [sorted(s) for s in slices] == [sorted(np.concatenate([parts["A1"], parts["A2"]]))]
    assert any(n.status == "max_depth" for n in tree.walk())


def test_rule_returns_root_whole_when_it_meets_the_rule(hand_built):
    emb, _, _ = hand_built
    slices, tree = rule_slices(emb, np.zeros(len(emb), bool), 0.5, 10)
    assert len(slices) == 1 and len(slices[0]) == len(emb) and tree.status == "returned"


def test_rule_handles_identical_embeddings():
    slices, tree = rule_slices(np.ones((30, 2)), np.ones(30, bool), 0.4, 5)
    assert slices == [] and tree.status == "unsplittable"


def test_same_seed_same_slices(hand_built):
    emb, correct, _ = hand_built
    a, _ = kmeans_slices(emb, 4, seed=3)
    b, _ = kmeans_slices(emb, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    r1, _ = rule_slices(emb, correct, 0.4, 20, seed=7)
    r2, _ = rule_slices(emb, correct, 0.4, 20, seed=7)
    assert [s.tolist() for s in r1] == [s.tolist() for s in r2]


def test_kmeans_distances_are_to_own_centroid(hand_built):
    emb, _, _ = hand_built
    ids, dist = kmeans_slices(emb, 3, seed=0)
    for k in range(3):
        centre = emb[ids == k].mean(0)
        np.testing.assert_allclose(dist[ids == k], np.linalg.norm(emb[ids == k] - centre, axis=1), rtol=1e-6)


@pytest.fixture(scope="module")
def digit_embeddings(request):
    mlp = request.getfixturevalue("mlp64")
    embedder = InfluenceEmbedder(mlp.model, arnoldi_dim=60, embedding_dim=20, progress=False)
    embedder.fit(mlp.loader("train"))
    return embedder.transform(mlp.loader("train")), embedder.transform(mlp.loader("test")), mlp


def test_opponents_equal_brute_force_influence_sums(digit_embeddings):
    train, test, _ = digit_embeddings
    members = np.arange(0, 60, 3)
    scores = np.array([sum(float(train[j] @ test[i]) for i in members) for j in range(len(train))])
    idx, got = slice_opponents(train, test[members], k=15)
    np.testing.assert_array_equal(idx, np.argsort(scores, kind="stable")[:15])
    np.testing.assert_allclose(got, scores[idx], rtol=1e-5, atol=1e-6)
    pro, pro_scores = slice_proponents(train, test[members], k=15)
    np.testing.assert_array_equal(pro, np.argsort(-scores, kind="stable")[:15])
    assert pro_scores[0] >= pro_scores[-1] and got[0] <= got[-1]


def _float64_embeddings(embedder, loader):
    """Embeddings as gradients @ projection_ in float64 (transform rounds them to float32)."""
    return (torch.cat(list(embedder.gradients(loader))) @ embedder.projection_).numpy()


def test_lemma_1_holds_for_explicit_influence_explanations(mlp64):
    """Lemma 1: ||E(z_i) - E(z_j)||^2 <= C ||mu_i - mu_j||^2, C = sum_n ||mu(z'_n)||^2, for all test pairs.

    E(z) = (I(z'_n, z))_n is built from explicit per-example gradients and the explicit top-D
    pseudo-inverse of the explicit Hessian, never from the embeddings, so the inequality ties
    the embedder's geometry to the influences it claims to encode (a wrong scaling breaks it)."""
    model, d = mlp64.model, 20
    names = list(select_parameters(model, None).names)
    hessian = explicit_hessian(model, *mlp64.train, names).numpy()
    _, pinv = _top_pinv(hessian, d)
    g_train = explicit_gradients(model, *mlp64.train, names).numpy()
    g_test = explicit_gradients(model, *mlp64.test, names).numpy()
    explanations = g_test @ pinv @ g_train.T

    embedder = InfluenceEmbedder(model, arnoldi_dim=len(hessian), embedding_dim=d, progress=False)
    embedder.fit(mlp64.loader("train"))
    mu_train = _float64_embeddings(embedder, mlp64.loader("train"))
    mu_test = _float64_embeddings(embedder, mlp64.loader("test"))
    c = (mu_train**2).sum()
    lhs = ((explanations[:, None, :] - explanations[None, :, :]) ** 2).sum(-1)
    rhs = c * ((mu_test[:, None, :] - mu_test[None, :, :]) ** 2).sum(-1)
    off_diagonal = ~np.eye(len(mu_test), dtype=bool)
    assert lhs[off_diagonal].min() > 0
    assert (lhs <= rhs * (1 + 1e-8)).all()


# ------------------------------------------------------------------ opponents against retraining
L2 = 1e-2  # strong enough that removing one example moves the optimum almost linearly


def _fit_regularised(model, x, y, keep, n):
    """Minimises sum_{i in keep} CE_i / n + L2 ||theta||^2: removing example j is up-weighting it by
    -1/n, the perturbation influence functions linearise (the Hessian is that of the full objective)."""
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[keep]), y[keep], reduction="sum") / n
        loss = loss + L2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def test_opponents_lower_and_proponents_raise_the_slice_loss_when_removed():
    """Leave-one-out retraining of an L2-regularised softmax regression: removing a top opponent of a
    slice lowers its loss, removing a top proponent raises it, and the predicted change
    (slice influence / N) tracks the actual one."""
    train, test = digits(12, 4, torch.float64)
    (x, y), (x_test, y_test) = train, test
    n = len(y)
    torch.manual_seed(0)
    model = _fit_regularised(nn.Linear(12, 4).double(), x, y, torch.ones(n, dtype=torch.bool), n)
    problem = Problem(model, train, test)
    n_params = sum(p.numel() for p in model.parameters())
    # the regulariser's Hessian 2 L2 I enters as damping; softmax regression's null space (shifting
    # every class equally) is orthogonal to every gradient, so dropping it is exact
    embedder = InfluenceEmbedder(model, arnoldi_dim=n_params, embedding_dim=n_params, damping=2 * L2, progress=False)
    with pytest.warns(UserWarning, match="kept"):
        embedder.fit(problem.loader("train"))
    mu_train = embedder.transform(problem.loader("train")).astype(np.float64)
    mu_test = embedder.transform(problem.loader("test")).astype(np.float64)

    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).numpy()
    ids, _ = kmeans_slices(mu_test, 3, seed=0)
    members = np.flatnonzero(ids == np.argmin([correct[ids == k].mean() for k in range(3)]))
    assert correct[members].mean() < 0.9  # a slice the model gets wrong

    def slice_loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(x_test[members]), y_test[members], reduction="sum"))

    def loss_change_without(j):
        keep = torch.ones(n, dtype=torch.bool)
        keep[j] = False
        retrained = nn.Linear(12, 4).double()
        retrained.load_state_dict(model.state_dict())  # warm start at the full-data optimum
        return slice_loss(_fit_regularised(retrained, x, y, keep, n)) - slice_loss(model)

    k = 6
    opponents, _ = slice_opponents(mu_train, mu_test[members], k=k)
    proponents, _ = slice_proponents(mu_train, mu_test[members], k=k)
    others = np.random.default_rng(0).choice(np.setdiff1d(np.arange(n), np.r_[opponents, proponents]), k, replace=False)
    removed = np.r_[opponents, proponents, others]
    actual = np.array([loss_change_without(j) for j in removed])
    assert (actual[:k] < 0).all(), "removing an opponent must lower the slice's loss"
    assert (actual[k : 2 * k] > 0).all(), "removing a proponent must raise the slice's loss"
    predicted = slice_influence(mu_train, mu_test[members])[removed] / n
    assert np.corrcoef(predicted, actual)[0, 1] > 0.99
    slope = np.polyfit(predicted, actual, 1)[0]  # first order: 1 up to the curvature of large removals
    assert 0.85 < slope < 1.35


def test_summary_table(digit_embeddings):
    _, test, mlp = digit_embeddings
    labels = mlp.test[1].numpy()
    preds = mlp.model(mlp.test[0]).argmax(1).numpy()
    ids, _ = kmeans_slices(test, 5, seed=0)
    frame = summarize_slices(ids, test, labels, preds, n_nearest=3, class_names=["zero", "one", "two", "three"])
    assert frame["size"].sum() == len(labels)
    assert list(frame["accuracy"]) == sorted(frame["accuracy"])
    for row in frame.itertuples():
        assert set(row.nearest) <= set(row.members) and len(row.nearest) == min(3, row.size)
        assert abs(sum(row.label_distribution.values()) - 1) < 1e-3
        assert row.n_errors == int(round((1 - row.accuracy) * row.size))
    rule, _ = rule_slices(test, labels == preds, 0.99, 5)
    assert len(summarize_slices(rule, test, labels, preds)) == len(rule)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: kmeans_slices(e, 100), "n_slices"),
        (lambda e: kmeans_slices(e[:, :, None], 2), "2-D"),
        (lambda e: kmeans_slices(np.where(e > 0.5, np.nan, e), 2), "non-finite"),
        (lambda e: rule_slices(e, np.ones(len(e) - 1, bool), 0.4, 5), "mismatched lengths"),
        (lambda e: rule_slices(e, np.ones(len(e)), 1.5, 5), "max_accuracy"),
        (lambda e: rule_slices(e, np.full(len(e), 3), 0.4, 5), "correct must be boolean"),
        (lambda e: slice_opponents(e, e[:, :2], 3), "dimensions"),
        (lambda e: slice_opponents(e, e, 0), "k must be"),
        (lambda e: summarize_slices(np.zeros(len(e), int), e, np.zeros(3), np.zeros(len(e))), "mismatched lengths"),
    ],
)
def test_bad_inputs_name_the_problem(call, message):
    emb = np.random.default_rng(0).random((20, 4))
    with pytest.raises(InputError, match=message):
        call(emb)
