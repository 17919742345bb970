"""Slices: K-Means, InfEmbed-Rule (Algorithm 6), opponents, Lemma 1, summaries."""

from __future__ import annotations

import numpy as np
import pytest

from harness import (
    InfluenceEmbedder,
    InputError,
    kmeans_slices,
    rule_slices,
    slice_opponents,
    slice_proponents,
    summarize_slices,
)


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


def test_lemma_1_holds(digit_embeddings):
    """||E(z_i) - E(z_j)||^2 <= C ||mu_i - mu_j||^2 with C = sum_n ||mu(z'_n)||^2, for all test pairs."""
    train, test, _ = digit_embeddings
    train, test = train.astype(np.float64), test.astype(np.float64)
    explanations = test @ train.T  # E(z) = (I(z'_n, z))_n
    c = (train**2).sum()
    lhs = ((explanations[:, None, :] - explanations[None, :, :]) ** 2).sum(-1)
    rhs = c * ((test[:, None, :] - test[None, :, :]) ** 2).sum(-1)
    assert (lhs <= rhs * (1 + 1e-9) + 1e-12).all()
    assert lhs.max() > 0


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
