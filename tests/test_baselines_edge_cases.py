"""The simple baselines by hand: the confusion slicer's cell ranking and scores, the K-Means
slicer's defaults and argument checks. Written against the mutants of harness/baselines/simple.py
that a partial `make mutation` run found alive."""

from __future__ import annotations

import numpy as np
import pytest

from harness.baselines import ConfusionSlicer, KMeansSlicer
from harness.errors import InputError

TARGETS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDICTED = np.array([1, 1, 0, 0, 1, 2, 0, 0, 1])


def _soft(predicted, n_classes=3, confidence=0.8):
    probs = np.full((len(predicted), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def test_confusion_cells_ranked_by_errors_then_size_then_index():
    """Errors: (0,1) 2, (2,0) 2, (1,0) 1, (2,1) 1; then error-free cells by size: (0,0) (1 example)
    before the empty cells."""
    slicer = ConfusionSlicer(n_slices=5).fit(None, TARGETS, _soft(PREDICTED))
    assert slicer.cells_ == [(0, 1), (2, 0), (1, 0), (2, 1), (0, 0)]
    assert slicer.cell_errors_ == [2, 2, 1, 1, 0]
    assert slicer.n_classes_ == 3


def test_confusion_scores_and_assignment():
    probs = _soft(PREDICTED)
    slicer = ConfusionSlicer(n_slices=2).fit(None, TARGETS, probs)
    scores = slicer.predict_proba(None, TARGETS, probs)
    np.testing.assert_allclose(scores[:, 0], (TARGETS == 0) * probs[:, 1])
    np.testing.assert_allclose(scores[:, 1], (TARGETS == 2) * probs[:, 0])
    assert slicer.predict(None, TARGETS, probs).tolist() == [0, 0, -1, -1, -1, -1, 1, 1, -1]
    assert ConfusionSlicer().n_slices == 5


def test_confusion_slicer_still_checks_the_embeddings_it_ignores():
    with pytest.raises(InputError, match="^mismatched lengths: embeddings has 2 rows"):
        ConfusionSlicer().fit(np.zeros((2, 3)), TARGETS, _soft(PREDICTED))
    slicer = ConfusionSlicer().fit(None, TARGETS, _soft(PREDICTED))
    with pytest.raises(InputError, match="^mismatched lengths: embeddings has 2 rows"):
        slicer.predict_proba(np.zeros((2, 3)), TARGETS, _soft(PREDICTED))
    with pytest.raises(InputError, match="^mismatched lengths: embeddings has 2 rows"):
        slicer.predict(np.zeros((2, 3)), TARGETS, _soft(PREDICTED))


def test_kmeans_slicer_defaults():
    slicer = KMeansSlicer()
    assert (slicer.n_slices, slicer.n_clusters, slicer.seed, slicer.n_init) == (5, 25, 0, 10)
    assert (slicer.selection, slicer.scoring) == ("accuracy", "distance")
    assert KMeansSlicer(n_slices=4, n_clusters=4).n_slices == 4  # as many slices as clusters is allowed


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ConfusionSlicer(n_slices=0), "^n_slices must be an integer >= 1; got 0$"),
        (lambda: KMeansSlicer(n_slices=0), "^n_slices must be an integer >= 1; got 0$"),
        (lambda: KMeansSlicer(n_clusters=0), "^n_clusters must be an integer >= 1; got 0$"),
        (lambda: KMeansSlicer(n_slices=6, n_clusters=5),
         r"^n_slices \(6\) > n_clusters \(5\): cannot return more slices than clusters$"),
        (lambda: KMeansSlicer(n_init=0), "^n_init must be an integer >= 1; got 0$"),
    ],
)
def test_bad_arguments_name_the_problem(make, message):
    with pytest.raises(InputError, match=message):
        make()
