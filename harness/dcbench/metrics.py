"""Slice-discovery metrics, defined exactly as dcbench 0.0.4's ``SliceDiscoveryProblem.evaluate``.

Inputs are ``slices`` (N, G): ground-truth membership (0/1) of G slices, and
``pred_slices`` (N, S): a method's score for each of its S predicted slices (higher = more
likely a member; e.g. :meth:`DominoSlicer.predict_proba`).

- precision@k of a predicted slice for a ground-truth slice: the share of ground-truth
  members among the k examples with the highest score. Ties are broken by example order
  (the earlier example ranks first), as dcbench's ordinal ranking does.
- AUROC: scikit-learn's ``roc_auc_score`` of the membership against the score.
- dcbench's figure (``precision_at_10``, ``precision_at_25``, ``auroc``): for every
  ground-truth slice, the predicted slice with the highest AUROC is matched (first one on
  ties) and its three numbers are kept; each is then averaged over ground-truth slices.
- the Domino paper's variant (``best_precision_at_10``): for every ground-truth slice, the
  best precision@10 of any predicted slice, averaged over ground-truth slices.

A ground-truth slice that is empty or covers every example, or scores with any NaN, give
NaN for that slice (dcbench's convention); averages skip NaN, and are NaN only when every
ground-truth slice is NaN (where dcbench itself raises).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from harness.errors import InputError

PRECISION_KS = (10, 25)


def _as_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} must be an (N, n_slices) array; got shape {array.shape}")
    return array


def _check(slices, pred_slices) -> tuple[np.ndarray, np.ndarray]:
    truth = _as_matrix(slices, "slices")
    scores = _as_matrix(pred_slices, "pred_slices").astype(np.float64)
    if truth.shape[0] != scores.shape[0]:
        raise InputError(f"mismatched lengths: slices has {truth.shape[0]} rows but pred_slices has {scores.shape[0]}")
    if not np.isin(truth, (0, 1)).all():
        raise InputError("slices must be 0/1 ground-truth membership")
    if np.isinf(scores).any():
        raise InputError("pred_slices contains infinite values")
    return truth.astype(np.int64), scores


def precision_at_k(slice_members: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of members among the ``k`` highest-scoring examples (ties: earlier example first).

    Divides by min(k, N), as scikit-learn's precision of the top-k prediction does.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(slice_members)[top].sum() / top.size)


def pairwise_metrics(slices, pred_slices, ks: tuple[int, ...] = PRECISION_KS) -> pd.DataFrame:
    """One row per (ground-truth slice, predicted slice): ``auroc`` and ``precision_at_{k}``."""
    truth, scores = _check(slices, pred_slices)
    has_nan = bool(np.isnan(scores).any())
    rows = []
    for g in range(truth.shape[1]):
        members = truth[:, g]
        defined = 0 < members.sum() < members.size and not has_nan
        for s in range(scores.shape[1]):
            row = {"slice": g, "pred_slice": s}
            row["auroc"] = float(roc_auc_score(members, scores[:, s])) if defined else np.nan
            for k in ks:
                row[f"precision_at_{k}"] = precision_at_k(members, scores[:, s], k) if defined else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def per_slice_metrics(slices, pred_slices, ks: tuple[int, ...] = PRECISION_KS) -> pd.DataFrame:
    """One row per ground-truth slice: the dcbench match (highest AUROC) and the best precision@k.

    Columns: ``slice``, ``pred_slice`` (the match), ``auroc``, ``precision_at_{k}`` (of the
    match), ``best_precision_at_{k}`` (over all predicted slices).
    """
    pairs = pairwise_metrics(slices, pred_slices, ks)
    rows = []
    for g, group in pairs.groupby("slice", sort=True):
        aurocs = group["auroc"].to_numpy()
        row = {"slice": int(g), "pred_slice": -1, "auroc": np.nan}
        row.update({f"precision_at_{k}": np.nan for k in ks})
        if not np.isnan(aurocs).all():
            match = group.iloc[int(np.nanargmax(aurocs))]  # first maximum, as pandas' idxmax
            row.update({"pred_slice": int(match["pred_slice"]), "auroc": float(match["auroc"])})
            row.update({f"precision_at_{k}": float(match[f"precision_at_{k}"]) for k in ks})
        for k in ks:
            values = group[f"precision_at_{k}"].to_numpy()
            row[f"best_precision_at_{k}"] = np.nan if np.isnan(values).all() else float(np.nanmax(values))
        rows.append(row)
    return pd.DataFrame(rows)


def slice_metrics(slices, pred_slices, ks: tuple[int, ...] = PRECISION_KS) -> dict[str, float]:
    """Means over ground-truth slices: ``precision_at_{k}`` and ``auroc`` (dcbench's ``evaluate``)
    and ``best_precision_at_{k}`` (the Domino paper's best-over-predicted-slices variant)."""
    table = per_slice_metrics(slices, pred_slices, ks)
    columns = [f"precision_at_{k}" for k in ks] + ["auroc"] + [f"best_precision_at_{k}" for k in ks]
    out = {}
    for column in columns:
        values = table[column].to_numpy(dtype=np.float64)
        out[column] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    return out


# ---------------------------------------------------------------- statistics over problems
def cluster_bootstrap(values, clusters, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean of ``values`` and its bootstrap interval, resampling *clusters* (distinct
    ground-truth slices) with replacement and then the values (problems) inside each drawn
    cluster: problems that re-seed one slice are not independent, so the interval must not
    treat them as such. Returns (mean, low, high); NaN values are dropped, a single cluster
    gives a NaN interval."""
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    if values.shape != clusters.shape or values.ndim != 1:
        raise InputError(f"values and clusters must be 1-D of one length; got {values.shape} and {clusters.shape}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1); got {confidence}")
    keep = ~np.isnan(values)
    values, clusters = values[keep], clusters[keep]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    names, inverse = np.unique(clusters, return_inverse=True)
    if len(names) < 2:
        return mean, float("nan"), float("nan")
    sizes = np.bincount(inverse)
    padded = np.zeros((len(names), sizes.max()))
    for c in range(len(names)):
        padded[c, : sizes[c]] = values[inverse == c]
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(names), size=(n_boot, len(names)))
    n = sizes[picked]  # (B, S) problems in each drawn cluster
    within = (rng.random((n_boot, len(names), sizes.max())) * n[..., None]).astype(np.int64)
    mask = np.arange(sizes.max())[None, None, :] < n[..., None]
    drawn = padded[picked[..., None], within]
    means = (drawn * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high)


def paired_comparison(a, b, clusters, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Method ``a`` against ``b`` on the same problems: the mean paired difference a - b
    with its cluster-bootstrap 95% interval (:func:`cluster_bootstrap`), whether the
    interval excludes 0, and win / tie / loss counts of a. Problems where either is NaN
    are dropped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"a and b must have one shape; got {a.shape} and {b.shape}")
    difference = a - b
    mean, low, high = cluster_bootstrap(difference, clusters, n_boot=n_boot, seed=seed)
    kept = difference[~np.isnan(difference)]
    return {"difference": mean, "low": low, "high": high,
            "decided": bool(np.isfinite(low) and (low > 0 or high < 0)),
            "wins": int((kept > 0).sum()), "ties": int((kept == 0).sum()), "losses": int((kept < 0).sum())}
