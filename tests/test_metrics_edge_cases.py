"""Slice-discovery metrics at their edges, by hand: undefined slices, NaN scores, ties, k = 1,
one-dimensional inputs, custom k. Written to kill the mutants `make mutation` found alive in
harness/dcbench/metrics.py; every value here follows from the definitions in its docstring."""

from __future__ import annotations

import numpy as np
import pytest

from harness.dcbench.metrics import pairwise_metrics, per_slice_metrics, precision_at_k, slice_metrics
from harness.errors import InputError


def test_precision_at_one_and_at_n():
    members = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.2])
    assert precision_at_k(members, scores, 1) == 1.0
    assert precision_at_k(members, scores, 2) == 0.5
    assert precision_at_k(members, scores, 4) == 0.5
    assert precision_at_k(members, -scores, 1) == 0.0
    assert precision_at_k(members, scores, np.int64(3)) == pytest.approx(2 / 3)


def test_precision_of_boolean_scores():
    """Hard assignments passed as booleans rank like 0/1 scores."""
    members = np.array([0, 1, 1, 0])
    assert precision_at_k(members, np.array([False, True, True, False]), 2) == 1.0


@pytest.mark.parametrize("k", [0, -1, True, 2.0])
def test_precision_rejects_a_k_that_is_not_a_positive_integer(k):
    with pytest.raises(InputError, match="^k must be a positive integer"):
        precision_at_k(np.array([0, 1]), np.array([0.0, 1.0]), k)


def test_one_dimensional_inputs_are_one_slice():
    truth = np.array([1, 1, 0, 0, 0])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    table = pairwise_metrics(truth, scores, ks=(1, 2))
    assert table.columns.tolist() == ["slice", "pred_slice", "auroc", "precision_at_1", "precision_at_2"]
    assert table.iloc[0].tolist() == [0, 0, 1.0, 1.0, 1.0]
    out = slice_metrics(truth, scores, ks=(2,))
    assert out == {"precision_at_2": 1.0, "auroc": 1.0, "best_precision_at_2": 1.0}


def test_a_slice_covering_every_example_is_undefined():
    truth = np.stack([np.ones(6, dtype=int), np.array([1, 0, 1, 0, 0, 0])], axis=1)
    scores = np.arange(6, dtype=float)[::-1, None]
    table = per_slice_metrics(truth, scores)
    assert np.isnan(table.loc[0, "auroc"]) and np.isnan(table.loc[0, "precision_at_10"])
    assert table.loc[0, "pred_slice"] == -1 and np.isnan(table.loc[0, "best_precision_at_10"])
    assert table.loc[1, "pred_slice"] == 0 and table.loc[1, "auroc"] == pytest.approx(7 / 8)
    # averages skip the undefined slice
    assert slice_metrics(truth, scores)["auroc"] == pytest.approx(7 / 8)


def test_an_empty_slice_is_undefined_and_a_single_member_slice_is_not():
    truth = np.zeros((6, 2), dtype=int)
    truth[2, 1] = 1  # slice 0 is empty, slice 1 has one member
    scores = np.array([0.0, 0.1, 0.9, 0.2, 0.3, 0.4])[:, None]
    table = per_slice_metrics(truth, scores, ks=(1,))
    assert table.loc[0, ["auroc", "precision_at_1", "best_precision_at_1"]].isna().all()
    assert table.loc[1, "auroc"] == 1.0 and table.loc[1, "precision_at_1"] == 1.0


def test_nan_scores_make_every_pair_undefined_and_all_nan_averages_nan():
    truth = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.3, 1.0], [np.nan, 0.0], [0.2, 1.0], [0.1, 0.0]])
    table = pairwise_metrics(truth, scores)
    assert table[["auroc", "precision_at_10", "precision_at_25"]].isna().all().all()
    out = slice_metrics(truth, scores)
    assert all(np.isnan(v) for v in out.values()) and len(out) == 5


def test_the_match_is_the_first_of_tied_aurocs_and_best_precision_is_over_all():
    truth = np.array([1, 1, 0, 0, 0, 0])
    # predicted slices 0 and 1 rank identically (same AUROC); 2 is worse
    base = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    scores = np.stack([base, base * 2, base[::-1]], axis=1)
    row = per_slice_metrics(truth, scores, ks=(1,)).iloc[0]
    assert row["pred_slice"] == 0 and row["auroc"] == 1.0 and row["best_precision_at_1"] == 1.0
    scores = np.stack([base[::-1], np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])], axis=1)
    row = per_slice_metrics(truth, scores, ks=(1,)).iloc[0]
    # slice 1: one member above every non-member, one tied with all four: AUROC 6/8; slice 0: AUROC 0
    assert row["pred_slice"] == 1 and row["auroc"] == pytest.approx(0.75) and row["precision_at_1"] == 1.0


def test_averages_are_means_over_ground_truth_slices():
    truth = np.zeros((8, 2), dtype=int)
    truth[:2, 0] = 1
    truth[6:, 1] = 1
    scores = np.arange(8, dtype=float)[::-1, None]  # ranks slice 0 perfectly and slice 1 last
    out = slice_metrics(truth, scores, ks=(2,))
    assert out["auroc"] == pytest.approx(0.5) and out["precision_at_2"] == pytest.approx(0.5)
    table = per_slice_metrics(truth, scores, ks=(2,))
    assert table["slice"].tolist() == [0, 1] and table["auroc"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "slices, scores, message",
    [
        (np.zeros((5, 0)), np.zeros((5, 1)), r"^slices must be an \(N, n_slices\) array; got shape \(5, 0\)"),
        (np.zeros((5, 1)), np.zeros((5, 0)), r"^pred_slices must be an \(N, n_slices\) array"),
        (np.zeros((5, 1, 1)), np.zeros((5, 1)), r"^slices must be an \(N, n_slices\) array"),
        (np.zeros((5, 1)), np.zeros((4, 1)), "^mismatched lengths: slices has 5 rows but pred_slices has 4"),
        (np.full((5, 1), 2), np.zeros((5, 1)), "^slices must be 0/1 ground-truth membership$"),
        (np.zeros((5, 1)), np.full((5, 1), -np.inf), "^pred_slices contains infinite values$"),
    ],
)
def test_bad_inputs_name_the_problem(slices, scores, message):
    with pytest.raises(InputError, match=message):
        slice_metrics(slices, scores)
