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
from harness import slicing
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
    # identical rows whose coordinates differ: distinct rows count, not distinct numbers
    _, tree = rule_slices(np.tile([0.0, 1.0], (30, 1)), np.ones(30, bool), 0.4, 5)
    assert tree.status == "unsplittable"


def test_same_seed_same_slices(hand_built):
    emb, correct, _ = hand_built
    a, _ = kmeans_slices(emb, 4, seed=3)
    b, _ = kmeans_slices(emb, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    r1, _ = rule_slices(emb, correct, 0.4, 20, seed=7)
    r2, _ = rule_slices(emb, correct, 0.4, 20, seed=7)
    assert [s.tolist() for s in r1] == [s.tolist() for s in r2]


def test_kmeans_runs_ten_restarts_and_returns_integer_ids(hand_built):
    emb, _, _ = hand_built
    assert slicing._kmeans(emb, 2, 0).n_init == slicing.KMEANS_N_INIT == 10
    assert kmeans_slices(emb, 3)[0].dtype == np.int64


def test_zero_width_embeddings_have_zero_influence():
    """An embedding with no dimension is not an empty set of examples: its influences are 0."""
    np.testing.assert_array_equal(slice_influence(np.zeros((3, 0)), np.zeros((2, 0))), np.zeros(3))


def test_kmeans_default_seed_is_0(hand_built):
    emb, _, _ = hand_built
    default, _ = kmeans_slices(emb, 3)
    np.testing.assert_array_equal(default, kmeans_slices(emb, 3, seed=0)[0])
    assert (default != kmeans_slices(emb, 3, seed=1)[0]).any()  # the seed reaches K-Means (label order)


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
    train, test = digits(12, 10, torch.float64)
    (x, y), (x_test, y_test) = train, test
    n = len(y)
    torch.manual_seed(0)
    model = _fit_regularised(nn.Linear(12, 10).double(), x, y, torch.ones(n, dtype=torch.bool), n)
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
        retrained = nn.Linear(12, 10).double()
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
    assert np.corrcoef(predicted, actual)[0, 1] > 0.995
    # first order: slope 1 up to the curvature of large removals (measured 1.05); a Hessian without
    # the regulariser's damping over-predicts (0.66), a summed Hessian under-predicts N-fold
    slope = np.polyfit(predicted, actual, 1)[0]
    assert 0.9 < slope < 1.2


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


def test_summary_by_hand():
    """Exact rows on a hand-made case: shares rounded to 4 places, nearest examples, empty slices
    skipped (not ending the table), ties in accuracy broken by size (larger first)."""
    embeddings = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0], [21.0], [22.0]]) * [[1.0, 0.0]]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    predictions = np.array([0, 1, 1, 0, 0, 2, 1, 0])
    slices = [np.array([0, 1, 2]), np.array([], dtype=np.int64), np.array([3, 4]), np.array([5, 6, 7])]
    frame = summarize_slices(slices, embeddings, labels, predictions, n_nearest=2, class_names=["a", "b", "c"])
    assert frame["slice"].tolist() == [2, 0, 3]  # accuracy 0 first; 0 and 3 tie (2/3, size 3): list order
    first, second, third = (frame.iloc[i] for i in range(3))
    assert first["size"] == 2 and first["accuracy"] == 0.0 and first["n_errors"] == 2
    assert first["label_distribution"] == {"b": 1.0} and first["prediction_distribution"] == {"a": 1.0}
    assert second["nearest"] == [1, 0] and second["accuracy"] == pytest.approx(2 / 3)
    assert third["label_distribution"] == {"c": 0.6667, "a": 0.3333}
    assert third["top_label"] == "c" and third["top_label_share"] == 0.6667
    assert third["prediction_distribution"] == {"a": 0.3333, "b": 0.3333, "c": 0.3333}
    assert third["top_prediction"] == "a" and third["top_prediction_share"] == 0.3333  # ties: the smaller class
    assert frame.columns.tolist() == [
        "slice", "size", "accuracy", "n_errors", "top_label", "top_label_share", "top_prediction",
        "top_prediction_share", "label_distribution", "prediction_distribution", "nearest", "members",
    ]
    assert frame.index.tolist() == [0, 1, 2]
    assert third["nearest"] == [6, 5] and third["members"] == [5, 6, 7] and third["n_errors"] == 1
    ids = np.array([0, 0, 0, -1, -1, 1, 1, 1])  # slice ids; -1 = in no slice
    by_id = summarize_slices(ids, embeddings, labels, predictions)
    assert by_id["members"].tolist() == [[0, 1, 2], [5, 6, 7]] and by_id["slice"].tolist() == [0, 1]
    assert summarize_slices([np.array([], dtype=np.int64)], embeddings, labels, predictions).empty
    # index arrays read back as floats (e.g. from a CSV) are indices all the same
    as_floats = summarize_slices([np.array([3.0, 4.0])], embeddings, labels, predictions)
    assert as_floats["members"].tolist() == [[3, 4]]


def test_summary_defaults_and_many_tied_classes():
    """Four nearest examples by default; classes of equal count keep label order even with many
    classes (a stable sort: numpy's quicksort reorders ties in arrays longer than 16)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=30)
    labels = np.repeat(np.arange(30), counts)
    n = len(labels)
    embeddings = rng.integers(0, 3, size=(n, 1)).astype(float)  # three values: distances tie everywhere
    frame = summarize_slices([np.arange(n)], embeddings, labels, labels)
    row = frame.iloc[0]
    expected = sorted(range(30), key=lambda c: -counts[c])  # Python's sort is stable
    assert list(row["label_distribution"]) == expected and row["top_label"] == expected[0]
    assert row["label_distribution"][expected[-1]] == round(1 / n, 4)
    centre = embeddings.mean()
    assert row["nearest"] == sorted(range(n), key=lambda i: abs(embeddings[i, 0] - centre))[:4]


def test_sizes_are_tied_by_size_when_accuracy_ties():
    embeddings = np.arange(5, dtype=float)[:, None]
    labels = np.zeros(5, dtype=int)
    frame = summarize_slices([np.array([0]), np.array([1, 2, 3])], embeddings, labels, np.ones(5, dtype=int))
    assert frame["size"].tolist() == [3, 1]


def test_rule_boundaries_are_inclusive(hand_built):
    """accuracy <= A and size >= S are inclusive: A1+A2 has accuracy exactly 0.2 and C1 exactly 30 examples."""
    emb, correct, parts = hand_built
    a = tuple(np.concatenate([parts["A1"], parts["A2"]]))
    slices, _ = rule_slices(emb, correct, max_accuracy=0.2, min_size=20, branching=3, max_depth=5, seed=0)
    assert a in [tuple(sorted(s)) for s in slices]
    slices, _ = rule_slices(emb, correct, max_accuracy=0.4, min_size=30, branching=3, max_depth=5, seed=0)
    assert tuple(parts["C1"]) in [tuple(sorted(s)) for s in slices]
    # a region of exactly S examples is searched, one of S - 1 is too small
    slices, tree = rule_slices(emb[parts["C1"]], correct[parts["C1"]], 0.4, 30)
    assert tree.status == "returned" and len(slices) == 1
    _, tree = rule_slices(emb[parts["C1"]], correct[parts["C1"]], 0.4, 31)
    assert tree.status == "too_small"
    _, tree = rule_slices(emb[parts["C2"]], correct[parts["C2"]], 0.4, 30)  # accuracy 1: searched further
    assert tree.status == "split"


def test_rule_tree_structure(hand_built):
    """Children are the non-empty K-Means clusters of their parent, one level deeper; depth 0 and
    branching 2 and min_size 1 are valid settings."""
    emb, correct, _ = hand_built
    _, tree = rule_slices(emb, correct, 0.4, 20, branching=3, max_depth=5, seed=0)
    for node in tree.walk():
        assert node.accuracy == pytest.approx(correct[node.indices].mean())
        if node.children:
            assert 2 <= len(node.children) <= 3
        for child in node.children:
            assert child.size > 0 and child.depth == node.depth + 1
    assert tree.depth == 0
    _, root_only = rule_slices(emb, correct, 0.4, 20, max_depth=0)
    assert root_only.status == "max_depth" and not root_only.children
    _, binary = rule_slices(emb, correct, 0.4, 1, branching=2, max_depth=1)
    assert len(binary.children) == 2
    slices, _ = rule_slices(emb, np.zeros(len(emb), bool), 0.0, 1)
    assert len(slices) == 1  # accuracy 0 <= A = 0: the root itself
    slices, _ = rule_slices(emb, np.ones(len(emb), bool), 1.0, 1)
    assert len(slices) == 1  # A = 1 is allowed and every region meets it


def test_rule_defaults_are_branching_3_depth_10_seed_0(hand_built):
    emb, correct, _ = hand_built
    _, tree = rule_slices(emb, correct, 0.4, 20)
    _, explicit = rule_slices(emb, correct, 0.4, 20, branching=3, max_depth=10, seed=0)
    order = [c.size for c in tree.children]
    assert order == [c.size for c in explicit.children] and sorted(order) == [10, 40, 66]
    # the seed reaches K-Means: another seed labels the same clusters in another order
    _, reseeded = rule_slices(emb, correct, 0.4, 20, seed=1)
    assert [c.size for c in reseeded.children] != order
    # a chain of points 4^i: every split peels off the farthest, one level per split, until depth 10
    chain = (4.0 ** np.arange(14))[:, None]
    _, deep = rule_slices(chain, np.ones(14, bool), 0.5, 1, branching=2)
    assert max(n.depth for n in deep.walk()) == 10 and any(n.status == "max_depth" for n in deep.walk())


def test_rule_accepts_0_1_integers_for_correct(hand_built):
    emb, correct, _ = hand_built
    as_bool, _ = rule_slices(emb, correct, 0.4, 20)
    as_int, _ = rule_slices(emb, correct.astype(int), 0.4, 20)
    assert [s.tolist() for s in as_int] == [s.tolist() for s in as_bool]


def test_two_distinct_points_split_into_two():
    """A region with only two distinct embeddings is split into two clusters even when B = 3."""
    emb = np.array([[0.0, 0.0]] * 6 + [[1.0, 1.0]] * 6)
    correct = np.array([True, False] * 6)
    _, tree = rule_slices(emb, correct, 0.4, 2, branching=3, max_depth=1)
    assert tree.status == "split" and sorted(c.size for c in tree.children) == [6, 6]


def test_kmeans_slices_accepts_one_slice_and_one_per_example(hand_built):
    emb, _, _ = hand_built
    ids, dist = kmeans_slices(emb, 1)
    assert (ids == 0).all()
    np.testing.assert_allclose(dist, np.linalg.norm(emb - emb.mean(0), axis=1), rtol=1e-9)
    ids, dist = kmeans_slices(emb[:5], 5)
    assert sorted(ids) == [0, 1, 2, 3, 4] and np.allclose(dist, 0)
    assert kmeans_slices(emb[:1], 1)[0].tolist() == [0]


def test_top_one_opponent_and_k_beyond_the_training_set():
    train = np.array([[1.0], [-2.0], [3.0], [-2.0]])
    members = np.array([[1.0]])
    idx, scores = slice_opponents(train, members, k=1)
    assert idx.tolist() == [1] and scores.tolist() == [-2.0]  # tie with example 3: the earlier index
    idx, _ = slice_opponents(train, members, k=10)
    assert idx.tolist() == [1, 3, 0, 2]
    idx, scores = slice_proponents(train, members, k=2)
    assert idx.tolist() == [2, 0] and scores.tolist() == [3.0, 1.0]
    np.testing.assert_array_equal(slice_influence(train, np.array([[1.0], [2.0]])), [3.0, -6.0, 9.0, -6.0])
    many = np.arange(-6.0, 6.0)[:, None]  # 12 training examples: the default k is 10
    assert len(slice_opponents(many, members)[0]) == 10 and len(slice_proponents(many, members)[0]) == 10


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: kmeans_slices(e, 100), r"n_slices \(100\) > number of examples \(20\)$"),
        (lambda e: kmeans_slices(e[:, :, None], 2), "embeddings must be a 2-D array"),
        (lambda e: kmeans_slices(np.where(e > 0.5, np.nan, e), 2), "embeddings contains non-finite values"),
        (lambda e: rule_slices(e, np.ones(len(e) - 1, bool), 0.4, 5), "mismatched lengths"),
        (lambda e: rule_slices(e, np.ones(len(e)), 1.5, 5), "max_accuracy"),
        (lambda e: rule_slices(e, np.full(len(e), 3), 0.4, 5), "correct must be boolean"),
        (lambda e: rule_slices(e, np.ones(len(e)), 1.01, 5), "max_accuracy must be in"),
        (lambda e: slice_opponents(e, e[:, :2], 3),
         "train_embeddings have 4 dimensions but slice_embeddings 2: embed both with the same fitted InfluenceEmbedder$"),
        (lambda e: slice_opponents(e * np.nan, e, 3), "train_embeddings contains non-finite values"),
        (lambda e: slice_proponents(e, e[0], 3), "slice_embeddings must be a 2-D array"),
        (lambda e: slice_opponents(e, e, 0), "k must be"),
        (lambda e: summarize_slices(np.zeros(len(e), int), e, np.zeros(3), np.zeros(len(e))),
         r"mismatched lengths: labels has shape \(3,\)"),
        (lambda e: summarize_slices(np.zeros(len(e) - 1, int), e, np.zeros(len(e)), np.zeros(len(e))),
         r"mismatched lengths: slice ids has shape \(19,\)"),
        (lambda e: summarize_slices(np.zeros(len(e), int), e, np.zeros(len(e)), np.zeros(3)),
         r"mismatched lengths: predictions has shape \(3,\)"),
        (lambda e: kmeans_slices(e[:0], 1), "embeddings is empty"),
        (lambda e: kmeans_slices(e, 0), "n_slices must be >= 1; got 0"),
        (lambda e: rule_slices(e, np.ones((len(e), 1), bool), 0.4, 5), r"mismatched lengths: correct has shape \(20, 1\)"),
        (lambda e: rule_slices(e, np.ones(len(e), bool), -0.1, 5), "max_accuracy must be in"),
        (lambda e: rule_slices(e, np.ones(len(e), bool), 0.4, 0), "min_size must be >= 1; got 0"),
        (lambda e: rule_slices(e, np.ones(len(e), bool), 0.4, 5, branching=1), "branching must be >= 2; got 1"),
        (lambda e: rule_slices(e, np.ones(len(e), bool), 0.4, 5, max_depth=-1), "max_depth must be >= 0; got -1"),
        (lambda e: summarize_slices([np.array([len(e)])], e, np.zeros(len(e)), np.zeros(len(e))), r"slice 0 indices out of range: indices must lie in \[0, \d+\); got \[\d+, \d+\]"),
        (lambda e: summarize_slices([np.array([-1])], e, np.zeros(len(e)), np.zeros(len(e))), r"slice 0 indices out of range: .*got \[-1, -1\]"),
    ],
)
def test_bad_inputs_name_the_problem(call, message):
    emb = np.random.default_rng(0).random((20, 4))
    with pytest.raises(InputError, match="^" + message):  # anchored: the message starts with the problem
        call(emb)


# --- summarize_slices' and as_slice_list's argument checks, anchored (written against mutants) -------
_E6 = np.arange(12, dtype=float).reshape(6, 2) ** 1.5
_L6 = np.array([0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize(
    "slices, message",
    [
        (np.array([0.0, 0.5, 1.0, 0.0, 1.0, 0.0]), r"^slice ids must be integers \(one per example\); got dtype float64$"),
        (5, "^slices must be slice ids or a list of index arrays; got int$"),
        ({0, 1}, "^slices must be slice ids or a list of index arrays; got set$"),
        ("012", "^slices must be slice ids or a list of index arrays; got str$"),
    ],
)
def test_slices_that_are_neither_ids_nor_index_lists(slices, message):
    with pytest.raises(InputError, match=message):
        slicing.as_slice_list(slices, 6)
    with pytest.raises(InputError, match=message):
        summarize_slices(slices, _E6, _L6, _L6)


def test_n_nearest_is_checked_and_one_is_allowed():
    with pytest.raises(InputError, match="^n_nearest must be >= 1; got 0$"):
        summarize_slices(np.zeros(6, dtype=int), _E6, _L6, _L6, n_nearest=0)
    frame = summarize_slices(np.zeros(6, dtype=int), _E6, _L6, _L6, n_nearest=1)
    assert len(frame.loc[0, "nearest"]) == 1


@pytest.mark.parametrize(
    "labels, predictions, class_names, message",
    [
        (_L6.astype(float), _L6, ["a", "b"],
         "^with class_names, labels must be non-negative integer class indices; got dtype float64$"),
        (_L6, _L6.astype(float), ["a", "b"],
         "^with class_names, predictions must be non-negative integer class indices; got dtype float64$"),
        (_L6 - 1, _L6, ["a", "b"], "^with class_names, labels must be non-negative integer class indices; got -1$"),
        (_L6, _L6, {"a", "b"}, "^class_names must be a sequence of names; got set$"),
        (_L6, np.array([0, 1, 2, 1, 0, 1]), ["a", "b"], "^class_names has 2 names but labels/predictions reach class 2$"),
    ],
)
def test_class_names_must_cover_integer_classes(labels, predictions, class_names, message):
    with pytest.raises(InputError, match=message):
        summarize_slices(np.zeros(6, dtype=int), _E6, labels, predictions, class_names=class_names)
    # the same labels and predictions are fine without class_names
    assert len(summarize_slices(np.zeros(6, dtype=int), _E6, labels, predictions)) == 1


def test_non_numeric_embeddings_are_named():
    with pytest.raises(InputError, match="^embeddings must hold real numbers; got dtype <U1$"):
        kmeans_slices(np.array([["a", "b"], ["c", "d"]]), 2)


def test_opponents_per_slice_by_brute_force(capsys):
    rng = np.random.default_rng(3)
    pool, embeddings = rng.normal(size=(9, 4)), rng.normal(size=(12, 4))
    members = [[0, 5, 7], np.array([11]), [2, 3, 4, 6, 8, 9]]
    found = slicing.opponents_per_slice(pool, embeddings, members, k=3)
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    assert isinstance(found, list) and len(found) == 3
    for (indices, scores), member in zip(found, members):
        influence = [sum(float(pool[j] @ embeddings[i]) for i in member) for j in range(9)]
        expected = sorted(range(9), key=lambda j: influence[j])[:3]  # most harmful: most negative first
        assert indices == expected and all(type(i) is int for i in indices)
        assert scores == [round(influence[j], 6) for j in expected] and all(type(s) is float for s in scores)
    # k larger than the pool: all of it; the progress bar changes nothing
    (everything, _), = slicing.opponents_per_slice(pool, embeddings, [[1]], k=50, progress=True)
    err = capsys.readouterr().err  # a bar named "slice opponents" that does not stay behind (no newline)
    assert sorted(everything) == list(range(9)) and "\rslice opponents:" in err and "\n" not in err
    assert slicing.opponents_per_slice(pool, embeddings, [], k=2) == []
