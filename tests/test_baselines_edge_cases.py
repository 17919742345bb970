"""The simple baselines by hand: the confusion slicer's cell ranking and scores, the K-Means
slicer's defaults and argument checks. Written against the mutants of harness/baselines/simple.py
that a partial `make mutation` run found alive."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from harness.baselines import ConfusionSlicer, KMeansSlicer
from harness.baselines.simple import PROBABILITY_ATOL, check_inputs
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


# --- check_inputs by hand -------------------------------------------------------------------------


def test_binary_probabilities_become_two_columns_of_float64():
    inputs = check_inputs(None, [0, 1, 1], [0.25, 0.75, 1.0], need_embeddings=False)
    assert inputs.pred_probs.dtype == np.float64
    np.testing.assert_array_equal(inputs.pred_probs, [[0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    one_hot = check_inputs(None, [0, 1], np.array([[1, 0], [0, 1]]), need_embeddings=False)
    assert one_hot.pred_probs.dtype == np.float64  # integer one-hot rows are read as float probabilities
    assert one_hot.embeddings is None and one_hot.targets.dtype == np.int64


def test_embeddings_are_required_by_default_and_read_as_float64():
    with pytest.raises(InputError, match="^embeddings are required by this slicer$"):
        check_inputs(None, [0, 1], [0.5, 0.5])
    inputs = check_inputs(np.array([[1, 2], [3, 4]]), [0, 1], [0.5, 0.5])
    assert inputs.embeddings.dtype == np.float64
    np.testing.assert_array_equal(inputs.embeddings, [[1.0, 2.0], [3.0, 4.0]])
    assert check_inputs(None, [0], [[0.5, 0.5]], need_embeddings=False).n_classes == 2  # one example is enough


SHAPE = r"^pred_probs must be \(N, C\) class probabilities with C >= 2 or \(N,\); got shape "


@pytest.mark.parametrize(
    "probs, message",
    [
        (np.zeros((0, 2)), SHAPE + r"\(0, 2\)$"),
        (np.ones((3, 1)), SHAPE + r"\(3, 1\)$"),
        (np.full((2, 2, 2), 0.5), SHAPE + r"\(2, 2, 2\)$"),
        ([[np.nan, 1.0]], "^pred_probs contains non-finite values$"),
        ([[-0.1, 0.55, 0.55]], r"^pred_probs must lie in \[0, 1\]; got range \[-0.1, 0.55\]$"),
        ([[1.002, -0.001, -0.001]], r"^pred_probs must lie in \[0, 1\]; got range \[-0.001, 1.002\]$"),
        # the message names the worst row, whether it sums to too little or too much
        ([[0.25, 0.25], [0.5, 0.5], [0.5, 0.6]], r"^pred_probs rows must sum to 1 \(probabilities, not logits\); "
                                                 r"worst row sums to 0.5$"),
        ([[0.45, 0.45], [0.5, 0.5], [0.75, 0.75]], "worst row sums to 1.5$"),
    ],
)
def test_bad_probabilities_name_the_problem(probs, message):
    n = np.shape(probs)[0] if np.ndim(probs) else 0
    with pytest.raises(InputError, match=message):
        check_inputs(None, np.zeros(n, dtype=int), probs, need_embeddings=False)


def test_probabilities_on_the_tolerance_boundary_are_accepted():
    """PROBABILITY_ATOL is inclusive at both ends of [0, 1]."""
    at = PROBABILITY_ATOL
    check_inputs(None, [0], [[-at, 0.5, 0.5 + at]], need_embeddings=False)
    check_inputs(None, [0], [[1 + at, -at]], need_embeddings=False)


@pytest.mark.parametrize("targets", [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0], dtype=np.float32)])
def test_whole_float_targets_are_class_indices(targets):
    inputs = check_inputs(None, targets, _soft([0, 1, 2]), need_embeddings=False)
    assert inputs.targets.dtype == np.int64 and inputs.targets.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "targets, dtype",
    [(np.array([0.0, 0.5, 2.0]), "float64"), (np.array(["a", "b", "c"]), "<U1"), (np.array([True, False, True]), "bool")],
)
def test_targets_that_are_not_class_indices(targets, dtype):
    with pytest.raises(InputError, match=f"^targets must be integer class indices; got dtype {dtype}$"):
        check_inputs(None, targets, _soft([0, 1, 2]), need_embeddings=False)


@pytest.mark.parametrize(
    "embeddings, message",
    [
        (np.zeros(9), r"^embeddings must be a 2-D array \(examples x dimensions\); got shape \(9,\)$"),
        (np.full((9, 2), np.inf), "^embeddings contains non-finite values$"),
    ],
)
def test_bad_embeddings_name_the_problem(embeddings, message):
    with pytest.raises(InputError, match=message):
        check_inputs(embeddings, TARGETS, _soft(PREDICTED))


@pytest.mark.parametrize("value", [True, 2.0, "3"])
def test_counts_must_be_real_integers(value):
    with pytest.raises(InputError, match=f"^n_slices must be an integer >= 1; got {value!r}$"):
        ConfusionSlicer(n_slices=value)


# --- the fitted-state checks ----------------------------------------------------------------------


def test_predict_checks_fit_state_classes_width_and_embeddings():
    for slicer in (ConfusionSlicer(), KMeansSlicer(n_slices=1, n_clusters=2)):
        name = type(slicer).__name__
        with pytest.raises(InputError, match=rf"^this {name} is not fitted: call fit\(embeddings, targets, "
                                             r"pred_probs\) first$"):
            slicer.predict_proba(X4, Y4, P4)
        slicer.fit(X4, Y4, P4)
        with pytest.raises(InputError, match="^pred_probs has 2 classes but the slicer was fitted on 3$"):
            slicer.predict(X4[:2], [0, 1], [0.5, 0.5])
    with pytest.raises(InputError, match="^embeddings have 3 dimensions but the slicer was fitted on 2$"):
        slicer.predict_proba(np.zeros((len(Y4), 3)), Y4, P4)
    for method in (slicer.predict_proba, slicer.predict):
        with pytest.raises(InputError, match="^embeddings are required by this slicer$"):
            method(None, Y4, P4)


def test_unknown_scoring_names_the_choices():
    with pytest.raises(InputError, match=r"^scoring must be one of \('distance', 'soft', 'membership'\); got 'x'$"):
        KMeansSlicer(scoring="x")


# --- KMeansSlicer by hand on four well-separated groups -------------------------------------------
# group: (centre, size, errors): A 4 points 2 errors (accuracy 0.5), B 3 points no error (1.0),
# C 1 point 1 error (0.0), D 2 points 1 error (0.5). K-Means (K=4) finds the groups; the group
# means are the centroids.
_GROUPS = {"A": ((0.0, 0.0), 4, 2), "B": ((20.0, 0.0), 3, 0), "C": ((0.0, 20.0), 1, 1), "D": ((20.0, 20.0), 2, 1)}
_OFFSETS = np.array([[0.5, 0.0], [-0.5, 0.0], [0.0, 1.0], [0.0, -1.0]])


def _grouped():
    x, correct, group = [], [], []
    for name, (centre, size, errors) in _GROUPS.items():
        x.append(np.asarray(centre) + _OFFSETS[:size] * (1 + len(group) % 3))
        correct += [False] * errors + [True] * (size - errors)
        group += [name] * size
    targets = np.zeros(len(group), dtype=int)
    predicted = np.where(correct, 0, 1)
    return np.vstack(x), targets, _soft(predicted, n_classes=3), np.array(group)


X4, Y4, P4, G4 = _grouped()
MEANS = {name: X4[G4 == name].mean(axis=0) for name in _GROUPS}


def _distances_to(names, x=X4):
    return np.stack([np.linalg.norm(x - MEANS[name], axis=1) for name in names], axis=1)


@pytest.mark.parametrize(
    "selection, order",
    [("accuracy", "CADB"),  # lowest accuracy first; A and D tie at 0.5: the larger (A) first
     ("errors", "ACDB")],  # most errors first; C and D tie at 1 error: the lower accuracy (C) first
)
def test_kmeans_selection_ranks_the_clusters(selection, order):
    slicer = KMeansSlicer(n_slices=3, n_clusters=4, selection=selection).fit(X4, Y4, P4)
    expected = {name: (order.index(name) if order.index(name) < 3 else -1) for name in _GROUPS}
    assert slicer.predict(X4, Y4, P4).tolist() == [expected[g] for g in G4]
    label = {name: int(slicer.kmeans_.labels_[G4 == name][0]) for name in _GROUPS}
    accuracy = {name: 1 - errors / size for name, (_, size, errors) in _GROUPS.items()}
    for name, (_, size, _) in _GROUPS.items():
        assert slicer.cluster_sizes_[label[name]] == size
        assert slicer.cluster_accuracy_[label[name]] == pytest.approx(accuracy[name], abs=1e-12)


def test_kmeans_scorings_by_hand():
    """On the fit data and on points between the groups, where the soft assignment is not saturated."""
    n = len(Y4)
    temperature = sum(((X4[G4 == name] - MEANS[name]) ** 2).sum() for name in _GROUPS) / n
    between = np.array([[10.25, 0.5], [10.2, 10.1], [0.3, 9.8]])
    returned = list("CAD")
    for scoring in KMeansSlicer.SCORINGS:
        slicer = KMeansSlicer(n_slices=3, n_clusters=4, scoring=scoring).fit(X4, Y4, P4)
        assert slicer.temperature_ == pytest.approx(temperature, rel=1e-9)
        for x, y, probs in ((X4, Y4, P4), (between, Y4[:3], P4[:3])):
            scores = slicer.predict_proba(x, y, probs)
            selected = _distances_to(returned, x)
            if scoring == "distance":
                expected = -selected
            elif scoring == "soft":
                logits = -_distances_to("ABCD", x) ** 2 / temperature
                weights = np.exp(logits - logits.max(axis=1, keepdims=True))
                expected = (weights / weights.sum(axis=1, keepdims=True))[:, ["ABCD".index(c) for c in returned]]
            else:
                nearest = np.array(list("ABCD"))[_distances_to("ABCD", x).argmin(axis=1)]
                expected = (nearest[:, None] == np.array(returned)[None, :]) + np.exp(-selected / np.sqrt(temperature))
            np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12, err_msg=scoring)
        if scoring == "soft":
            assert ((scores > 1e-6) & (scores < 0.999)).any(axis=1).all()  # not saturated between the groups


def test_kmeans_takes_its_seed_and_restarts():
    slicer = KMeansSlicer(n_slices=2, n_clusters=3, seed=7, n_init=4).fit(X4, Y4, P4)
    params = slicer.kmeans_.get_params()
    assert (params["n_clusters"], params["random_state"], params["n_init"]) == (3, 7, 4)
    assert KMeansSlicer(n_slices=2, n_clusters=3).fit(X4, Y4, P4).kmeans_.get_params()["n_init"] == 10


def test_kmeans_with_as_many_clusters_as_examples():
    slicer = KMeansSlicer(n_slices=1, n_clusters=len(Y4)).fit(X4, Y4, P4)
    assert sorted(slicer.cluster_sizes_.tolist()) == [1] * len(Y4)
    assert slicer.cluster_accuracy_[slicer.slice_clusters_[0]] == 0.0  # a one-example error cluster
    with pytest.raises(InputError, match=rf"^n_clusters \({len(Y4) + 1}\) > number of examples \({len(Y4)}\)$"):
        KMeansSlicer(n_slices=1, n_clusters=len(Y4) + 1).fit(X4, Y4, P4)


def test_empty_clusters_are_counted_and_ranked_last():
    """Two distinct points and three clusters: scikit-learn leaves one cluster empty."""
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning about the empty cluster
        slicer = KMeansSlicer(n_slices=3, n_clusters=3).fit(x, [0, 0, 0, 0, 0], _soft([0, 0, 0, 0, 0]))
    assert len(slicer.cluster_sizes_) == 3 and sorted(slicer.cluster_sizes_.tolist()) == [0, 2, 3]
    empty = int(np.flatnonzero(slicer.cluster_sizes_ == 0)[0])
    assert slicer.cluster_accuracy_[empty] == np.inf
    assert slicer.slice_clusters_[-1] == empty
