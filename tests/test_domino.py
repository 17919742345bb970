"""Domino (our implementation) against the reference domino 0.1.5, and the simple baselines."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from harness.baselines import ConfusionSlicer, DominoSlicer, KMeansSlicer
from harness.dcbench.metrics import slice_metrics
from harness.compat import legacy_stack_available
from harness.errors import InputError


@pytest.fixture(scope="module")
def digits_problem():
    """A binary task on real digits (label: digit >= 5) whose predictions fail on the 8s.

    The "model" is a noisy score of the true label, pushed towards the wrong class on 8s,
    so the error slice is a real sub-group of the images. Embeddings: the 64 pixels plus
    100 seeded noise dimensions (so that PCA to 128 dimensions is a real reduction).
    """
    pixels, digit = load_digits(return_X_y=True)
    rng = np.random.RandomState(0)
    targets = (digit >= 5).astype(np.int64)
    embeddings = np.hstack([pixels, rng.randn(len(pixels), 100)])
    logit = 3 * (2 * targets - 1) + 2 * rng.randn(len(targets)) - 7 * (digit == 8)
    p = 1 / (1 + np.exp(-logit))
    return {"embeddings": embeddings, "targets": targets, "probs": np.stack([1 - p, p], axis=1), "digit": digit}


def _four_class_problem():
    """Digits 0-3 (C^2 = 16 confusion cells <= 25 components); 3s pushed towards class 1."""
    pixels, digit = load_digits(return_X_y=True)
    keep = digit < 4
    pixels, digit = pixels[keep], digit[keep]
    rng = np.random.RandomState(0)
    logits = 3 * np.eye(4)[digit] + 1.5 * rng.randn(len(digit), 4)
    logits[digit == 3, 1] += 5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.hstack([pixels, rng.randn(len(digit), 100)]), digit, probs


@pytest.mark.skipif(not legacy_stack_available("domino"), reason="domino 0.1.5 not installed (see harness/compat.py)")
@pytest.mark.parametrize("classes, seed", [(2, 3), (4, 0)])
def test_matches_reference_domino(digits_problem, classes, seed):
    """Same inputs, seed and settings: the same returned components and the same posteriors.

    The reference's PCA is set to scikit-learn's exact SVD: its default PCA may pick the
    randomized solver, unseeded, and then differs from run to run. Everything else is
    domino 0.1.5 as published.
    """
    from harness.compat import import_domino

    domino = import_domino()
    if classes == 2:
        x, y, probs = digits_problem["embeddings"], digits_problem["targets"], digits_problem["probs"]
    else:
        x, y, probs = _four_class_problem()
    reference = domino.DominoSlicer(
        n_slices=5, n_mixture_components=25, n_pca_components=128,
        y_log_likelihood_weight=10, y_hat_log_likelihood_weight=10, random_state=seed,
    )
    reference.pca = PCA(n_components=128, svd_solver="full")
    reference.fit(embeddings=x, targets=y, pred_probs=probs)
    theirs = reference.predict_proba(embeddings=x, targets=y, pred_probs=probs)

    ours = DominoSlicer(seed=seed).fit(x, y, probs)
    mine = ours.predict_proba(x, y, probs)

    assert ours.n_iter_ == reference.mm.n_iter_
    assert np.array_equal(ours.slice_components_, reference.slice_cluster_indices)
    np.testing.assert_allclose(ours.means_, reference.mm.means_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-9)
    assert np.array_equal(mine.argmax(axis=1), theirs.argmax(axis=1))


def test_finds_the_planted_error_slice(digits_problem):
    x, y, probs, digit = (digits_problem[k] for k in ("embeddings", "targets", "probs", "digit"))
    slicer = DominoSlicer(seed=0).fit(x, y, probs)
    scores = slicer.predict_proba(x, y, probs)
    assert scores.shape == (len(y), 5)
    result = slice_metrics((digit == 8).astype(int), scores)
    # 8s are 10% of the data; the best returned slice ranks them far above chance.
    assert result["best_precision_at_10"] == 1.0
    assert result["auroc"] > 0.9
    # The top slice is the most erroneous component: most of its members are errors.
    members = slicer.predict(x, y, probs) == 0
    assert (probs.argmax(1)[members] != y[members]).mean() > 0.5


def test_same_seed_same_slices_and_seed_matters(digits_problem):
    x, y, probs = (digits_problem[k][:400] for k in ("embeddings", "targets", "probs"))
    first = DominoSlicer(seed=1, max_iter=5).fit(x, y, probs).predict_proba(x, y, probs)
    again = DominoSlicer(seed=1, max_iter=5).fit(x, y, probs).predict_proba(x, y, probs)
    other = DominoSlicer(seed=2, max_iter=5).fit(x, y, probs).predict_proba(x, y, probs)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_more_classes_than_confusion_cells_and_pca_cap():
    """10 classes: 100 confusion cells > 25 components (where domino 0.1.5 cannot start);
    64 pixel dimensions < pca_dim 128 (capped)."""
    pixels, digit = load_digits(return_X_y=True)
    rng = np.random.RandomState(0)
    logits = 4 * np.eye(10)[digit] + rng.randn(len(digit), 10)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    slicer = DominoSlicer(seed=0, max_iter=20).fit(pixels, digit, probs)
    assert slicer.pca_.n_components_ == 64
    scores = slicer.predict_proba(pixels, digit, probs)
    assert scores.shape == (len(digit), 5) and np.isfinite(scores).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_slices": 30}, "n_slices"),
        ({"n_slices": 0}, "n_slices"),
        ({"pca_dim": -1}, "pca_dim"),
        ({"y_log_likelihood_weight": float("nan")}, "y_log_likelihood_weight"),
        ({"reg_covar": 0.0}, "reg_covar"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        DominoSlicer(**kwargs)


def test_bad_inputs(digits_problem):
    x, y, probs = digits_problem["embeddings"], digits_problem["targets"], digits_problem["probs"]
    with pytest.raises(InputError, match="mismatched lengths"):
        DominoSlicer().fit(x[:-1], y, probs)
    with pytest.raises(InputError, match="mismatched lengths"):
        DominoSlicer().fit(x, y[:-1], probs)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        DominoSlicer().fit(bad, y, probs)
    with pytest.raises(InputError, match="sum to 1"):
        DominoSlicer().fit(x, y, probs * 0.5)
    with pytest.raises(InputError, match="out of range"):
        DominoSlicer().fit(x, y + 1, probs)
    with pytest.raises(InputError, match="number of examples"):
        DominoSlicer().fit(x[:10], y[:10], probs[:10])
    with pytest.raises(InputError, match="not fitted"):
        DominoSlicer().predict_proba(x, y, probs)
    fitted = DominoSlicer(max_iter=2).fit(x, y, probs)
    with pytest.raises(InputError, match="dimensions"):
        fitted.predict_proba(x[:, :10], y, probs)


def test_confusion_slicer_ranks_cells_by_errors():
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 1, 0, 0, 2, 0, 0])
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    slicer = ConfusionSlicer(n_slices=4).fit(None, targets, probs)
    # Cells with 2 errors first: (0->1), (1->0), (2->0), in cell order; then (0->2) with 1.
    assert slicer.cells_ == [(0, 1), (1, 0), (2, 0), (0, 2)]
    scores = slicer.predict_proba(None, targets, probs)
    np.testing.assert_allclose(scores[:, 0], (targets == 0) * probs[:, 1])
    assert slicer.predict(None, targets, probs).tolist() == [-1, 0, 0, 3, -1, 1, 1, -1, 2, 2]
    padded = ConfusionSlicer(n_slices=12).fit(None, targets, probs).predict_proba(None, targets, probs)
    assert padded.shape == (10, 12) and not padded[:, 9:].any()


def test_kmeans_slicer_returns_the_worst_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    groups = np.repeat([0, 1, 2], 50)
    x = centres[groups] + 0.3 * rng.standard_normal((150, 2))
    targets = np.zeros(150, dtype=int)
    predicted = np.where((groups == 2) & (rng.random(150) < 0.8), 1, 0)  # group 2: 80% errors
    probs = np.eye(2)[predicted]
    slicer = KMeansSlicer(n_slices=1, n_clusters=3, seed=0).fit(x, targets, probs)
    assert np.array_equal(slicer.predict(x, targets, probs) == 0, groups == 2)
    soft = KMeansSlicer(n_slices=1, n_clusters=3, scoring="soft", seed=0).fit(x, targets, probs)
    assert slice_metrics((groups == 2).astype(int), soft.predict_proba(x, targets, probs))["auroc"] == 1.0
    hard = KMeansSlicer(n_slices=1, n_clusters=3, scoring="membership", seed=0).fit(x, targets, probs)
    hard_scores = hard.predict_proba(x, targets, probs)[:, 0]
    assert hard_scores[groups == 2].min() > 1 > hard_scores[groups != 2].max()
    with pytest.raises(InputError, match="n_clusters"):
        KMeansSlicer(n_slices=1, n_clusters=200).fit(x, targets, probs)
    with pytest.raises(InputError, match="selection"):
        KMeansSlicer(selection="largest")
