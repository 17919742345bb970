"""The one place that splits data: class-stratified parts, per-patient (grouped) parts and
seeded per-class subsets. Every function returns sorted integer positions, so a split is
also an index into any array aligned with the labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from harness.errors import InputError


def stratified_split(labels: np.ndarray, n_first: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of a class-stratified first part of ``n_first`` examples and of the rest."""
    labels = np.asarray(labels)
    if not isinstance(n_first, (int, np.integer)) or not 0 < n_first < labels.shape[0]:
        raise InputError(f"n_first must be an integer in 1..{labels.shape[0] - 1}; got {n_first!r}")
    first, rest = train_test_split(np.arange(labels.shape[0]), train_size=int(n_first), stratify=labels,
                                   random_state=seed)
    return np.sort(first), np.sort(rest)


def patient_split(groups: Sequence, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with every patient's images on one side only (no leakage between splits)."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1); got {test_fraction}")
    groups = np.asarray(groups)
    if np.unique(groups).size < 2:
        raise InputError("a patient-grouped split needs at least 2 patients")
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return np.sort(train), np.sort(test)


def per_class_subset(labels: Sequence[int] | np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most ``per_class`` examples of every class, drawn with ``seed``
    (classes in increasing order, one generator); ``None`` keeps every example."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(labels.shape[0])
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise InputError(f"per_class must be a positive integer or None; got {per_class!r}")
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)
