"""Input checks shared by every slicer, and the two simple baselines.

Every slicer in :mod:`harness.baselines` follows one interface, so the metric code treats
all methods alike::

    slicer.fit(embeddings, targets, pred_probs)            # on validation data
    scores = slicer.predict_proba(embeddings, targets, pred_probs)   # (N, n_slices)

``scores[:, j]`` ranks examples by membership of returned slice ``j`` (higher = more
likely a member); slices come most-erroneous first. ``predict`` gives every example's
returned slice (0..n_slices-1) or -1 when it belongs to none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from sklearn.cluster import KMeans

from harness.errors import InputError
from harness.slicing import KMEANS_N_INIT

PROBABILITY_ATOL = 1e-3


@dataclass
class SlicerInputs:
    """Validated inputs: embeddings (N, D) float64 or None, targets (N,) int64, pred_probs (N, C) float64."""

    embeddings: np.ndarray | None
    targets: np.ndarray
    pred_probs: np.ndarray

    @property
    def n_classes(self) -> int:
        return int(self.pred_probs.shape[1])

    @property
    def correct(self) -> np.ndarray:
        return self.pred_probs.argmax(axis=1) == self.targets


def check_inputs(embeddings, targets, pred_probs, *, need_embeddings: bool = True) -> SlicerInputs:
    """Validates one (embeddings, targets, pred_probs) triple; raises :class:`InputError`.

    ``pred_probs`` is (N, C) class probabilities (soft or one-hot) or, for binary tasks,
    (N,) probabilities of class 1. ``targets`` are class indices in [0, C).
    """
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise InputError(f"pred_probs must be (N, C) class probabilities with C >= 2 or (N,); got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise InputError("pred_probs contains non-finite values")
    if probs.min() < -PROBABILITY_ATOL or probs.max() > 1 + PROBABILITY_ATOL:
        raise InputError(f"pred_probs must lie in [0, 1]; got range [{probs.min():.4g}, {probs.max():.4g}]")
    row_sums = probs.sum(axis=1)
    if np.abs(row_sums - 1).max() > PROBABILITY_ATOL:
        raise InputError(f"pred_probs rows must sum to 1 (probabilities, not logits); worst row sums to "
                         f"{row_sums[np.abs(row_sums - 1).argmax()]:.4g}")
    n = probs.shape[0]

    labels = np.asarray(targets)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InputError(f"mismatched lengths: targets has shape {labels.shape} but pred_probs has {n} rows")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.mod(labels, 1) == 0):
            raise InputError(f"targets must be integer class indices; got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise InputError(f"targets out of range: pred_probs has {probs.shape[1]} classes but targets span "
                         f"[{labels.min()}, {labels.max()}]")

    x = None
    if embeddings is not None:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2:
            raise InputError(f"embeddings must be a 2-D array (examples x dimensions); got shape {x.shape}")
        if x.shape[0] != n:
            raise InputError(f"mismatched lengths: embeddings has {x.shape[0]} rows but pred_probs has {n}")
        if not np.isfinite(x).all():
            raise InputError("embeddings contains non-finite values")
    elif need_embeddings:
        raise InputError("embeddings are required by this slicer")
    return SlicerInputs(x, labels, probs)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or an :class:`InputError` naming ``name`` when it is not an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


class _FittedCheck:
    def _check_fitted(self) -> None:
        if not hasattr(self, "n_classes_"):
            raise InputError(f"this {type(self).__name__} is not fitted: call fit(embeddings, targets, pred_probs) first")

    def _check_predict_inputs(self, embeddings, targets, pred_probs, need_embeddings: bool) -> SlicerInputs:
        self._check_fitted()
        inputs = check_inputs(embeddings, targets, pred_probs, need_embeddings=need_embeddings)
        if inputs.n_classes != self.n_classes_:
            raise InputError(f"pred_probs has {inputs.n_classes} classes but the slicer was fitted on {self.n_classes_}")
        width = getattr(self, "n_features_", None)
        if need_embeddings and width is not None and inputs.embeddings.shape[1] != width:
            raise InputError(f"embeddings have {inputs.embeddings.shape[1]} dimensions but the slicer was fitted on {width}")
        return inputs


class ConfusionSlicer(_FittedCheck):
    """The confusion-matrix baseline: one slice per (label, prediction) cell.

    The score of cell (t, p) is ``[target == t] * pred_probs[:, p]`` (dcbench's
    ``confusion_sdm``). Cells are ranked by how many of the fit data's errors they hold
    (off-diagonal cells only; ties by cell size, then by cell index); the top
    ``n_slices`` are returned, padded with all-zero columns when there are fewer cells.
    ``embeddings`` are accepted for a uniform interface and ignored.
    """

    def __init__(self, n_slices: int = 5):
        self.n_slices = check_positive_int("n_slices", n_slices)

    def fit(self, embeddings, targets, pred_probs) -> "ConfusionSlicer":
        """Ranks the confusion cells of the fit data by their number of errors."""
        inputs = check_inputs(embeddings, targets, pred_probs, need_embeddings=False)
        n_classes = inputs.n_classes
        predicted = inputs.pred_probs.argmax(axis=1)
        counts = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(counts, (inputs.targets, predicted), 1)
        errors = counts * (1 - np.eye(n_classes, dtype=np.int64))
        cells = np.arange(n_classes * n_classes)
        order = np.lexsort((cells, -counts.ravel(), -errors.ravel()))
        self.cells_ = [divmod(int(c), n_classes) for c in order[: self.n_slices]]
        self.cell_errors_ = [int(errors[t, p]) for t, p in self.cells_]
        self.n_classes_ = n_classes
        return self

    def predict_proba(self, embeddings, targets, pred_probs) -> np.ndarray:
        """(N, n_slices) cell scores ``[target == t] * pred_probs[:, p]``, most errors first."""
        inputs = self._check_predict_inputs(embeddings, targets, pred_probs, need_embeddings=False)
        scores = np.zeros((inputs.targets.shape[0], self.n_slices))
        for j, (t, p) in enumerate(self.cells_):
            scores[:, j] = (inputs.targets == t) * inputs.pred_probs[:, p]
        return scores

    def predict(self, embeddings, targets, pred_probs) -> np.ndarray:
        """The returned cell of every example (its (label, argmax prediction) cell), or -1."""
        inputs = self._check_predict_inputs(embeddings, targets, pred_probs, need_embeddings=False)
        predicted = inputs.pred_probs.argmax(axis=1)
        out = np.full(inputs.targets.shape[0], -1, dtype=np.int64)
        for j, (t, p) in enumerate(self.cells_):
            out[(inputs.targets == t) & (predicted == p)] = j
        return out


class KMeansSlicer(_FittedCheck):
    """K-Means on any embedding, the ``n_slices`` worst clusters returned.

    Used for InfEmbed (on influence embeddings) and for the plain K-Means baseline (on
    the model's activations), so both share one code path. ``fit`` clusters the fit
    data into ``n_clusters`` (scikit-learn K-Means, k-means++, ``n_init`` restarts,
    seeded) and ranks clusters by ``selection``:

    - ``"accuracy"``: lowest accuracy first (ties: larger cluster first);
    - ``"errors"``: most errors first (ties: lower accuracy first).

    ``predict_proba`` scores every example against each returned cluster by ``scoring``:

    - ``"distance"``: minus the Euclidean distance to the cluster's centroid;
    - ``"soft"``: the soft assignment softmax(-d^2 / T) over all centroids, with T the
      fit data's mean squared distance to their own centroid;
    - ``"membership"``: the hard K-Means assignment first (members of the cluster above
      every non-member), then closeness: 1[member] + exp(-d / sqrt(T)).
    """

    SELECTIONS = ("accuracy", "errors")
    SCORINGS = ("distance", "soft", "membership")

    def __init__(
        self,
        n_slices: int = 5,
        n_clusters: int = 25,
        selection: str = "accuracy",
        scoring: str = "distance",
        seed: int = 0,
        n_init: int = KMEANS_N_INIT,
    ):
        self.n_slices = check_positive_int("n_slices", n_slices)
        self.n_clusters = check_positive_int("n_clusters", n_clusters)
        if self.n_slices > self.n_clusters:
            raise InputError(f"n_slices ({n_slices}) > n_clusters ({n_clusters}): cannot return more slices than clusters")
        if selection not in self.SELECTIONS:
            raise InputError(f"selection must be one of {self.SELECTIONS}; got {selection!r}")
        if scoring not in self.SCORINGS:
            raise InputError(f"scoring must be one of {self.SCORINGS}; got {scoring!r}")
        self.selection = selection
        self.scoring = scoring
        self.seed = int(seed)
        self.n_init = check_positive_int("n_init", n_init)

    def fit(self, embeddings, targets, pred_probs) -> "KMeansSlicer":
        """Clusters the fit data and ranks the clusters by ``selection``."""
        inputs = check_inputs(embeddings, targets, pred_probs)
        n = inputs.embeddings.shape[0]
        if self.n_clusters > n:
            raise InputError(f"n_clusters ({self.n_clusters}) > number of examples ({n})")
        kmeans = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.seed).fit(inputs.embeddings)
        labels = kmeans.labels_
        sizes = np.bincount(labels, minlength=self.n_clusters)
        errors = np.bincount(labels, weights=~inputs.correct, minlength=self.n_clusters)
        accuracy = np.where(sizes > 0, 1 - errors / np.maximum(sizes, 1), np.inf)
        clusters = np.arange(self.n_clusters)
        if self.selection == "accuracy":
            order = np.lexsort((clusters, -sizes, accuracy))
        else:
            order = np.lexsort((clusters, accuracy, -errors))
        self.kmeans_ = kmeans
        self.slice_clusters_ = order[: self.n_slices]
        self.cluster_accuracy_ = accuracy
        self.cluster_sizes_ = sizes
        self.temperature_ = max(float(kmeans.inertia_) / n, np.finfo(np.float64).tiny)
        self.n_features_ = inputs.embeddings.shape[1]
        self.n_classes_ = inputs.n_classes
        return self

    def _distances(self, embeddings, targets, pred_probs) -> np.ndarray:
        inputs = self._check_predict_inputs(embeddings, targets, pred_probs, need_embeddings=True)
        return self.kmeans_.transform(inputs.embeddings)

    def predict_proba(self, embeddings, targets, pred_probs) -> np.ndarray:
        """(N, n_slices) scores of membership of the returned clusters (see ``scoring``)."""
        distances = self._distances(embeddings, targets, pred_probs)
        selected = distances[:, self.slice_clusters_]
        if self.scoring == "distance":
            return -selected
        if self.scoring == "soft":
            return softmax(-(distances**2) / self.temperature_, axis=1)[:, self.slice_clusters_]
        members = distances.argmin(axis=1)[:, None] == self.slice_clusters_[None, :]
        return members + np.exp(-selected / np.sqrt(self.temperature_))

    def predict(self, embeddings, targets, pred_probs) -> np.ndarray:
        """The returned slice of every example's nearest centroid, or -1 when that cluster is not returned."""
        nearest = self._distances(embeddings, targets, pred_probs).argmin(axis=1)
        lookup = np.full(self.n_clusters, -1, dtype=np.int64)
        lookup[self.slice_clusters_] = np.arange(len(self.slice_clusters_))
        return lookup[nearest]
