"""Slice-discovery metrics: hand-checked values, and equality with dcbench 0.0.4's own evaluate."""

from __future__ import annotations

import numpy as np
import pytest

from harness.dcbench.metrics import pairwise_metrics, per_slice_metrics, precision_at_k, slice_metrics
from harness.compat import legacy_stack_available
from harness.errors import InputError

needs_dcbench = pytest.mark.skipif(
    not legacy_stack_available("dcbench"), reason="dcbench 0.0.4 not installed (see harness/compat.py)"
)


def test_precision_at_k_by_hand_with_ties_broken_by_order():
    members = np.array([0, 1, 1, 0, 1, 0])
    scores = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1])
    # Top 2: examples 0 and 1 (tied at 0.9) -> 1 member of 2.
    assert precision_at_k(members, scores, 2) == 0.5
    # Top 3: ties at 0.5 are taken in example order -> example 2 (a member).
    assert precision_at_k(members, scores, 3) == pytest.approx(2 / 3)
    # k beyond N divides by N, as dcbench's precision of the top-k mask does.
    assert precision_at_k(members, scores, 10) == 0.5


def test_match_is_the_highest_auroc_slice_and_best_precision_may_differ():
    n = 200
    truth = np.zeros(n, dtype=int)
    truth[:20] = 1
    # Predicted slice 0: ten members on top (precision@10 = 1) but the other ten at the bottom (AUROC 0.5).
    sharp_top = np.full(n, 0.5)
    sharp_top[:10] = 1.0
    sharp_top[10:20] = 0.0
    # Predicted slice 1: one non-member on top, then all members (precision@10 = 0.9, AUROC = 179/180).
    good_ranking = np.zeros(n)
    good_ranking[:20] = 1.0
    good_ranking[20] = 2.0
    scores = np.stack([sharp_top, good_ranking], axis=1)
    pairs = pairwise_metrics(truth, scores)
    assert pairs["auroc"].tolist() == pytest.approx([0.5, 179 / 180])
    assert pairs["precision_at_10"].tolist() == [1.0, 0.9]
    row = per_slice_metrics(truth, scores).iloc[0]
    assert row["pred_slice"] == 1 and row["precision_at_10"] == 0.9 and row["best_precision_at_10"] == 1.0
    summary = slice_metrics(truth, scores)
    assert summary["precision_at_10"] == 0.9 and summary["best_precision_at_10"] == 1.0
    assert summary["auroc"] == pytest.approx(179 / 180)


def test_undefined_slices_are_nan_and_skipped():
    truth = np.zeros((30, 2), dtype=int)
    truth[:5, 0] = 1  # slice 1 is empty: undefined
    scores = np.linspace(1, 0, 30)[:, None]
    out = slice_metrics(truth, scores)
    assert out["precision_at_10"] == 0.5 and out["auroc"] == 1.0
    assert np.isnan(per_slice_metrics(truth, scores).loc[1, "auroc"])


@pytest.mark.parametrize(
    "slices, scores, message",
    [
        (np.zeros((5, 1)), np.zeros((4, 1)), "mismatched lengths"),
        (np.full((5, 1), 2), np.zeros((5, 1)), "0/1"),
        (np.zeros((5, 1)), np.full((5, 1), np.inf), "infinite"),
        (np.zeros((0, 1)), np.zeros((0, 1)), "shape"),
    ],
)
def test_bad_inputs(slices, scores, message):
    with pytest.raises(InputError, match=message):
        slice_metrics(slices, scores)


def _random_case(rng, n, n_truth, n_pred, discrete):
    truth = np.zeros((n, n_truth), dtype=int)
    for g in range(n_truth):
        truth[rng.choice(n, size=int(rng.integers(5, n // 4)), replace=False), g] = 1
    signal = truth @ rng.random((n_truth, n_pred))
    scores = signal + rng.random((n, n_pred)) * rng.uniform(0.2, 3)
    if discrete:  # many exact ties, as hard-assignment methods give
        scores = np.round(scores * 3) / 3
    return truth, scores


@needs_dcbench
def test_equals_dcbench_evaluate(tmp_path):
    """Our numbers equal dcbench's SliceDiscoveryProblem.evaluate on the same predictions."""
    import meerkat as mk

    from harness.dcbench.client import _dcbench_config
    from harness.compat import import_dcbench

    dcbench = import_dcbench()
    from dcbench.tasks.slice_discovery.metrics import compute_metrics

    rng = np.random.default_rng(0)
    compared = 0
    with _dcbench_config(tmp_path):
        for case in range(6):
            n = int(rng.integers(60, 400))
            truth, scores = _random_case(rng, n, int(rng.integers(1, 4)), int(rng.integers(1, 6)), discrete=case % 2 == 1)
            ids = np.array([f"x{i}" for i in range(n)])
            order = rng.permutation(n)  # the solution lists examples in another order: evaluate merges on id
            problem = dcbench.SliceDiscoveryProblem.from_artifacts(
                artifacts={"test_slices": mk.DataPanel({"id": ids, "slices": truth})}, container_id=f"case{case}"
            )
            solution = problem.solve(mk.DataPanel({"id": ids[order], "pred_slices": scores[order]}))
            theirs = problem.evaluate(solution)
            ours = slice_metrics(truth, scores)
            for key in ("precision_at_10", "precision_at_25", "auroc"):
                assert ours[key] == pytest.approx(theirs[key], abs=1e-12), (case, key)
            their_table = compute_metrics(truth, scores)
            assert np.array_equal(per_slice_metrics(truth, scores)["pred_slice"].to_numpy(),
                                  their_table["pred_slice_idx"].to_numpy())
            compared += 1
    assert compared == 6


def test_cluster_bootstrap_resamples_slices_not_reseeds():
    """Ten re-seeds of each of two slices are two units, not twenty: the interval is wide."""
    from harness.dcbench.metrics import cluster_bootstrap

    values = np.r_[np.full(10, 1.0), np.full(10, 0.0)] + np.random.default_rng(0).normal(0, 0.01, 20)
    clusters = np.repeat(["a", "b"], 10)
    mean, low, high = cluster_bootstrap(values, clusters)
    assert abs(mean - 0.5) < 0.01
    assert low < 0.05 and high > 0.95  # a naive t-interval over 20 problems would be about +-0.24
    independent = cluster_bootstrap(values, np.arange(20).astype(str))
    assert independent[2] - independent[1] < 0.6
    assert np.isnan(cluster_bootstrap(values, np.repeat("a", 20))[1])  # one slice: no interval
    assert cluster_bootstrap(np.append(values, np.nan), np.append(clusters, "a")) == (mean, low, high)  # NaN dropped
    with pytest.raises(InputError, match="one length"):
        cluster_bootstrap(values, clusters[:5])


def test_paired_comparison_counts_and_decides():
    from harness.dcbench.metrics import paired_comparison

    clusters = np.repeat(np.arange(10), 2)
    a = np.full(20, 0.8)
    b = np.r_[np.full(18, 0.5), 0.8, 0.9]
    result = paired_comparison(a, b, clusters)
    assert (result["wins"], result["ties"], result["losses"]) == (18, 1, 1)
    assert result["decided"] and result["low"] > 0 and abs(result["difference"] - (a - b).mean()) < 1e-12
    assert not paired_comparison(a, a, clusters)["decided"]


def _naive_cluster_bootstrap(values, clusters, n_boot, confidence, seed):
    """The two-stage bootstrap one replicate at a time, on the random draws cluster_bootstrap
    makes (cluster picks, then one uniform per problem slot): draw clusters with replacement,
    then each drawn cluster's problems with replacement, and average all drawn problems."""
    names, inverse = np.unique(clusters, return_inverse=True)
    members = [values[inverse == c] for c in range(len(names))]
    longest = max(len(m) for m in members)
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(names), size=(n_boot, len(names)))
    uniforms = rng.random((n_boot, len(names), longest))
    means = []
    for b in range(n_boot):
        drawn = []
        for s, c in enumerate(picked[b]):
            size = len(members[c])
            drawn += [members[c][int(u * size)] for u in uniforms[b, s, :size]]
        means.append(np.mean(drawn))
    alpha = (1 - confidence) / 2
    return float(values.mean()), *np.quantile(means, [alpha, 1 - alpha])


def test_cluster_bootstrap_equals_the_naive_two_stage_bootstrap():
    """Clusters of unequal sizes (1 to 5 problems) with spread inside them."""
    from harness.dcbench.metrics import cluster_bootstrap

    rng = np.random.default_rng(1)
    sizes = [1, 3, 5, 2, 4, 5]
    clusters = np.repeat([f"slice{i}" for i in range(len(sizes))], sizes)
    values = rng.normal(0, 1, len(clusters)) + np.repeat(rng.normal(0, 1, len(sizes)), sizes)
    got = cluster_bootstrap(values, clusters, n_boot=300, confidence=0.9, seed=4)
    np.testing.assert_allclose(got, _naive_cluster_bootstrap(values, clusters, 300, 0.9, 4), rtol=1e-12, atol=1e-12)
    assert got[1] < got[0] < got[2]
    # defaults: 2000 replicates, seed 0, a 95% interval
    assert cluster_bootstrap(values, clusters) == cluster_bootstrap(values, clusters, n_boot=2000, confidence=0.95, seed=0)
    np.testing.assert_allclose(cluster_bootstrap(values, clusters),
                               _naive_cluster_bootstrap(values, clusters, 2000, 0.95, 0), rtol=1e-12, atol=1e-12)


def test_cluster_bootstrap_edge_cases():
    from harness.dcbench.metrics import cluster_bootstrap

    assert np.isnan(cluster_bootstrap([np.nan, np.nan], ["a", "b"])).all()  # nothing left: NaN, not an error
    mean, low, high = cluster_bootstrap([0.25], ["a"])  # one value: its mean, no interval
    assert mean == 0.25 and np.isnan(low) and np.isnan(high)
    # missing values given as None are NaN and dropped
    assert cluster_bootstrap([0.25, None, 0.75], ["a", "b", "b"]) == cluster_bootstrap([0.25, 0.75], ["a", "b"])
    for confidence in (0, 1, 1.5, -0.1):
        with pytest.raises(InputError, match=rf"^confidence must be in \(0, 1\); got {confidence}$"):
            cluster_bootstrap([0.1, 0.2], ["a", "b"], confidence=confidence)


def test_paired_comparison_is_the_bootstrap_of_the_differences():
    from harness.dcbench.metrics import cluster_bootstrap, paired_comparison

    rng = np.random.default_rng(2)
    clusters = np.repeat(np.arange(6), 3)
    a, b = rng.random(18), rng.random(18)
    result = paired_comparison(a, b, clusters, n_boot=500, seed=3)
    mean, low, high = cluster_bootstrap(a - b, clusters, n_boot=500, seed=3)
    assert (result["difference"], result["low"], result["high"]) == (mean, low, high)
    assert paired_comparison(a, b, clusters) == paired_comparison(a, b, clusters, n_boot=2000, seed=0)
    assert paired_comparison(a, b, clusters)["high"] == cluster_bootstrap(a - b, clusters)[2]
    # a missing result (None) on either side drops that problem
    with_missing = paired_comparison([None, *a[1:]], [b[0], None, *b[2:]], clusters, n_boot=500, seed=3)
    assert with_missing == paired_comparison(a[2:], b[2:], clusters[2:], n_boot=500, seed=3)
    with pytest.raises(InputError, match=r"^a and b must have one shape; got \(3,\) and \(2,\)$"):
        paired_comparison([0.1, 0.2, 0.3], [0.1, 0.2], [0, 1, 2])
