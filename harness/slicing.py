"""Slices from influence embeddings: K-Means (InfEmbed), InfEmbed-Rule, opponents, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from harness.errors import InputError

KMEANS_N_INIT = 10


def _as_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (examples x dimensions); got shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains non-finite values")
    return array.astype(np.float64, copy=False)


def _check_length(array: np.ndarray, n: int, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1 or array.shape[0] != n:
        raise InputError(f"mismatched lengths: {name} has shape {array.shape}, expected ({n},) to match the embeddings")
    return array


def _kmeans(embeddings: np.ndarray, n_clusters: int, seed: int) -> KMeans:
    return KMeans(n_clusters=n_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit(embeddings)


# ---------------------------------------------------------------- InfEmbed (K-Means)
def kmeans_slices(embeddings: np.ndarray, n_slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """InfEmbed (Algorithm 2): K-Means with K = ``n_slices`` on the embeddings.

    Returns ``(slice_ids, distances)``: the slice of every example (0..K-1) and its
    Euclidean distance to its slice's centroid. scikit-learn's K-Means (k-means++,
    ``n_init=10`` restarts, best inertia kept) seeded by ``seed``.
    """
    x = _as_embeddings(embeddings)
    if not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise InputError(f"n_slices must be a positive integer; got {n_slices!r}")
    if n_slices > x.shape[0]:
        raise InputError(f"n_slices ({n_slices}) > number of examples ({x.shape[0]})")
    km = _kmeans(x, int(n_slices), seed)
    distances = np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1)
    return km.labels_.astype(np.int64), distances


# ---------------------------------------------------------------- InfEmbed-Rule
@dataclass
class RuleNode:
    """One region visited by InfEmbed-Rule.

    ``status`` is ``"returned"`` (accuracy <= A and size >= S: a slice), ``"too_small"``
    (size < S: dropped), ``"max_depth"`` (neither, at the depth limit: dropped),
    ``"unsplittable"`` (all its embeddings coincide, K-Means cannot split it: dropped)
    or ``"split"`` (children hold its B K-Means clusters).
    """

    indices: np.ndarray
    accuracy: float
    depth: int
    status: str = "split"
    children: list["RuleNode"] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def rule_slices(
    embeddings: np.ndarray,
    correct: np.ndarray,
    max_accuracy: float,
    min_size: int,
    branching: int = 3,
    max_depth: int = 10,
    seed: int = 0,
) -> tuple[list[np.ndarray], RuleNode]:
    """InfEmbed-Rule (paper, Algorithm 6 RuleFind): recursive K-Means until slices have
    accuracy <= ``max_accuracy`` (A) and size >= ``min_size`` (S).

    A region meeting the rule is returned whole and not split further; a region smaller
    than S is dropped; otherwise it is split into ``branching`` (B) K-Means clusters and
    each is searched. The root is depth 0; a region at ``max_depth`` that does not meet
    the rule is dropped instead of split. Returns ``(slices, tree)``: the index arrays
    (sorted, in tree order) and the root :class:`RuleNode`. K-Means at every node uses
    ``seed``, so the same inputs and seed give the same slices.
    """
    x = _as_embeddings(embeddings)
    correct = _check_length(correct, x.shape[0], "correct")
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise InputError("correct must be boolean (or 0/1): whether each prediction is right")
        correct = correct.astype(bool)
    if not 0.0 <= max_accuracy <= 1.0:
        raise InputError(f"max_accuracy must be in [0, 1]; got {max_accuracy}")
    if not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise InputError(f"min_size must be a positive integer; got {min_size!r}")
    if not isinstance(branching, (int, np.integer)) or branching < 2:
        raise InputError(f"branching must be an integer >= 2; got {branching!r}")
    if not isinstance(max_depth, (int, np.integer)) or max_depth < 0:
        raise InputError(f"max_depth must be a non-negative integer; got {max_depth!r}")

    slices: list[np.ndarray] = []

    def visit(indices: np.ndarray, depth: int) -> RuleNode:
        node = RuleNode(indices=indices, accuracy=float(correct[indices].mean()), depth=depth)
        if node.accuracy <= max_accuracy and node.size >= min_size:
            node.status = "returned"
            slices.append(indices)
            return node
        if node.size < min_size:
            node.status = "too_small"
            return node
        if depth >= max_depth:
            node.status = "max_depth"
            return node
        region = x[indices]
        n_distinct = np.unique(region, axis=0).shape[0]
        if n_distinct < 2:
            node.status = "unsplittable"
            return node
        labels = _kmeans(region, min(branching, n_distinct), seed).labels_
        for k in range(labels.max() + 1):
            node.children.append(visit(indices[labels == k], depth + 1))
        return node

    tree = visit(np.arange(x.shape[0]), 0)
    return slices, tree


# ---------------------------------------------------------------- opponents / proponents
def slice_influence(train_embeddings: np.ndarray, slice_embeddings: np.ndarray) -> np.ndarray:
    """Influence of every training example on the slice's total loss: mu(z')^T sum_i mu(z_i)."""
    train = _as_embeddings(train_embeddings, "train_embeddings")
    members = _as_embeddings(slice_embeddings, "slice_embeddings")
    if train.shape[1] != members.shape[1]:
        raise InputError(
            f"train_embeddings have {train.shape[1]} dimensions but slice_embeddings {members.shape[1]}: "
            "embed both with the same fitted InfluenceEmbedder"
        )
    return train @ members.sum(axis=0)


def _top(scores: np.ndarray, k: int, most_negative: bool) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    k = min(int(k), scores.shape[0])
    keyed = scores if most_negative else -scores
    order = np.lexsort((np.arange(scores.shape[0]), keyed))[:k]  # ties broken by index: deterministic
    return order, scores[order]


def slice_opponents(
    train_embeddings: np.ndarray, slice_embeddings: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training examples most harmful to the slice (paper, C.6).

    Returns ``(indices, scores)`` into ``train_embeddings``, most negative influence on the
    slice's total loss first.
    """
    return _top(slice_influence(train_embeddings, slice_embeddings), k, most_negative=True)


def slice_proponents(
    train_embeddings: np.ndarray, slice_embeddings: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training examples most helpful to the slice: most positive influence first."""
    return _top(slice_influence(train_embeddings, slice_embeddings), k, most_negative=False)


# ---------------------------------------------------------------- summaries
def as_slice_list(slices: np.ndarray | Sequence[np.ndarray], n_examples: int) -> list[np.ndarray]:
    """Index arrays from either a slice id per example or a list of index arrays."""
    if isinstance(slices, np.ndarray) and slices.ndim == 1 and slices.dtype != object:
        ids = _check_length(slices, n_examples, "slice ids")
        return [np.flatnonzero(ids == s) for s in np.unique(ids[ids >= 0])]
    out = []
    for members in slices:
        members = np.asarray(members, dtype=np.int64)
        if members.size and (members.min() < 0 or members.max() >= n_examples):
            raise InputError(f"slice indices out of range for {n_examples} examples")
        out.append(members)
    return out


def _distribution(values: np.ndarray, names: Sequence[str] | None) -> dict:
    uniques, counts = np.unique(values, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    return {(names[u] if names is not None else u.item()): round(float(c / total), 4)
            for u, c in zip(uniques[order], counts[order])}


def summarize_slices(
    slices: np.ndarray | Sequence[np.ndarray],
    embeddings: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    n_nearest: int = 4,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per slice: size, accuracy, errors, label/prediction distributions,
    dominant label/prediction and the ``n_nearest`` examples nearest the slice centre
    (mean embedding), sorted by accuracy then size (descending).

    ``slices`` is a slice id per example (as from :func:`kmeans_slices`; negative ids are
    ignored) or a list of index arrays (as from :func:`rule_slices`).
    """
    x = _as_embeddings(embeddings)
    n = x.shape[0]
    labels = _check_length(labels, n, "labels")
    predictions = _check_length(predictions, n, "predictions")
    rows = []
    for slice_id, members in enumerate(as_slice_list(slices, n)):
        if members.size == 0:
            continue
        centre = x[members].mean(axis=0)
        distance = np.linalg.norm(x[members] - centre, axis=1)
        nearest = members[np.argsort(distance, kind="stable")[:n_nearest]]
        right = labels[members] == predictions[members]
        label_dist = _distribution(labels[members], class_names)
        pred_dist = _distribution(predictions[members], class_names)
        rows.append(
            {
                "slice": slice_id,
                "size": int(members.size),
                "accuracy": float(right.mean()),
                "n_errors": int((~right).sum()),
                "top_label": next(iter(label_dist)),
                "top_label_share": next(iter(label_dist.values())),
                "top_prediction": next(iter(pred_dist)),
                "top_prediction_share": next(iter(pred_dist.values())),
                "label_distribution": label_dist,
                "prediction_distribution": pred_dist,
                "nearest": nearest.tolist(),
                "members": members.tolist(),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["accuracy", "size"], ascending=[True, False], kind="stable").reset_index(drop=True)
