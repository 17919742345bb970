"""Slices from influence embeddings: K-Means (InfEmbed), InfEmbed-Rule (its thresholds in
:class:`RuleConfig`), opponents, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from harness.errors import InputError
from harness.validation import check_float, check_indices, check_int, check_numeric_array, check_seed

KMEANS_N_INIT = 10


@dataclass(frozen=True)
class RuleConfig:
    """InfEmbed-Rule's thresholds; the defaults are the paper's ImageNet values."""

    max_accuracy: float = field(default=0.4, metadata={"help": "A: a slice has accuracy <= A."})
    min_size: int = field(default=25, metadata={"help": "S: a slice has at least S examples."})
    branching: int = field(default=3, metadata={"help": "B: K-Means clusters per split of a region."})
    max_depth: int = field(default=10, metadata={"help": "Deepest split of the region tree (the root is 0)."})


def _as_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    array = check_numeric_array(embeddings, name)
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

    Raises ``InputError`` for: embeddings that are not a non-empty finite 2-D array of real
    numbers (strings, bools, NaN); ``n_slices`` not an integer >= 1 (``True`` included) or
    larger than the number of examples; a ``seed`` outside the integers 0..2**32-1.
    """
    x = _as_embeddings(embeddings)
    n_slices = check_int(n_slices, "n_slices", 1)
    seed = check_seed(seed)
    if n_slices > x.shape[0]:
        raise InputError(f"n_slices ({n_slices}) > number of examples ({x.shape[0]})")
    km = _kmeans(x, n_slices, seed)
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
    branching: int = RuleConfig.branching,
    max_depth: int = RuleConfig.max_depth,
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

    Raises ``InputError`` for: embeddings as in :func:`kmeans_slices`; ``correct`` not of
    the embeddings' length or not boolean/0-1; ``max_accuracy`` not a finite number in
    [0, 1] (``"0.5"`` included); ``min_size`` < 1, ``branching`` < 2, ``max_depth`` < 0 or
    any of them not an integer; a bad ``seed``.
    """
    x = _as_embeddings(embeddings)
    correct = _check_length(correct, x.shape[0], "correct")
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise InputError("correct must be boolean (or 0/1): whether each prediction is right")
        correct = correct.astype(bool)
    max_accuracy = check_float(max_accuracy, "max_accuracy", 0.0, 1.0)
    min_size = check_int(min_size, "min_size", 1)
    branching = check_int(branching, "branching", 2)
    max_depth = check_int(max_depth, "max_depth", 0)
    seed = check_seed(seed)

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
    """Influence of every training example on the slice's total loss: mu(z')^T sum_i mu(z_i).

    Raises ``InputError`` when either array is not a non-empty finite 2-D array of real
    numbers or their widths differ."""
    train = _as_embeddings(train_embeddings, "train_embeddings")
    members = _as_embeddings(slice_embeddings, "slice_embeddings")
    if train.shape[1] != members.shape[1]:
        raise InputError(
            f"train_embeddings have {train.shape[1]} dimensions but slice_embeddings {members.shape[1]}: "
            "embed both with the same fitted InfluenceEmbedder"
        )
    return train @ members.sum(axis=0)


def _top(scores: np.ndarray, k: int, most_negative: bool) -> tuple[np.ndarray, np.ndarray]:
    k = min(check_int(k, "k", 1), scores.shape[0])
    keyed = scores if most_negative else -scores
    order = np.lexsort((np.arange(scores.shape[0]), keyed))[:k]  # ties broken by index: deterministic
    return order, scores[order]


def slice_opponents(
    train_embeddings: np.ndarray, slice_embeddings: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training examples most harmful to the slice (paper, C.6).

    Returns ``(indices, scores)`` into ``train_embeddings``, most negative influence on the
    slice's total loss first. Raises ``InputError`` as :func:`slice_influence`, and when
    ``k`` is not an integer >= 1.
    """
    return _top(slice_influence(train_embeddings, slice_embeddings), k, most_negative=True)


def slice_proponents(
    train_embeddings: np.ndarray, slice_embeddings: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training examples most helpful to the slice: most positive influence first.
    Rejects what :func:`slice_opponents` rejects."""
    return _top(slice_influence(train_embeddings, slice_embeddings), k, most_negative=False)


def opponents_per_slice(pool_embeddings: np.ndarray, embeddings: np.ndarray, members: Sequence[Sequence[int]],
                        k: int, progress: bool = False) -> list[tuple[list[int], list[float]]]:
    """For every slice (its ``members``, indices into ``embeddings``), the ``k`` pool examples
    most harmful to its total loss and their influence (rounded to 6 digits)."""
    out = []
    for indices in tqdm(members, desc="slice opponents", disable=not progress, leave=False):
        found, scores = slice_opponents(pool_embeddings, embeddings[np.asarray(indices)], k=k)
        out.append((found.tolist(), [round(float(s), 6) for s in scores]))
    return out


# ---------------------------------------------------------------- summaries
def as_slice_list(slices: np.ndarray | Sequence[np.ndarray], n_examples: int) -> list[np.ndarray]:
    """Index arrays from either a slice id per example or a list of index arrays."""
    if isinstance(slices, np.ndarray) and slices.ndim == 1 and slices.dtype != object:
        ids = _check_length(slices, n_examples, "slice ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"slice ids must be integers (one per example); got dtype {ids.dtype}")
        return [np.flatnonzero(ids == s) for s in np.unique(ids[ids >= 0])]
    if isinstance(slices, (str, bytes)) or not isinstance(slices, (Sequence, np.ndarray)):
        raise InputError(f"slices must be slice ids or a list of index arrays; got {type(slices).__name__}")
    return [check_indices(members, f"slice {i} indices", n_examples) for i, members in enumerate(slices)]


def _check_class_indices(values: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"with class_names, {name} must be non-negative integer class indices; got dtype {values.dtype}")
    if values.size and values.min() < 0:
        raise InputError(f"with class_names, {name} must be non-negative integer class indices; got {values.min()}")
    return values


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

    Raises ``InputError`` for: embeddings as in :func:`kmeans_slices`; labels, predictions
    or slice ids not 1-D of the embeddings' length; slice ids that are not integers; index
    arrays that are not flat lists of distinct integer indices in range (``1.7``, ``"3"``,
    ``True`` and nested lists included); ``n_nearest`` not an integer >= 1; ``class_names`` that
    is not a sequence of names or has fewer names than the classes the labels and
    predictions reach (which must then be non-negative integers).
    """
    x = _as_embeddings(embeddings)
    n = x.shape[0]
    labels = _check_length(labels, n, "labels")
    predictions = _check_length(predictions, n, "predictions")
    n_nearest = check_int(n_nearest, "n_nearest", 1)
    if class_names is not None:
        labels, predictions = _check_class_indices(labels, "labels"), _check_class_indices(predictions, "predictions")
        if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
            raise InputError(f"class_names must be a sequence of names; got {type(class_names).__name__}")
        span = int(max(labels.max(), predictions.max()))
        if span >= len(class_names):
            raise InputError(f"class_names has {len(class_names)} names but labels/predictions reach class {span}")
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
