"""The slice-discovery problem generator (dcbench's protocol: three disjoint splits, split by
source) and the mini-dcbench data loaders."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from harness.dcbench.protocol import (
    LabeledData,
    ProblemSpec,
    coarse_sets,
    disjoint_merges,
    make_problem,
    median_split,
    merge_classes,
    slice_statistics,
)
from harness.errors import InputError
from harness.paths import has_dataset
from harness.train import Predictions


@pytest.fixture(scope="module")
def digits() -> LabeledData:
    """scikit-learn's digits: coarse classes = digits merged in pairs, sub-group = the digit."""
    digits = load_digits()
    fine = digits.target.astype(np.int64)
    ink = digits.images.mean(axis=(1, 2))
    return LabeledData(
        inputs=(digits.data / 16.0).astype(np.float32),
        labels=merge_classes(fine, 5, seed=0),
        groups=fine,
        attributes={"thick": median_split(ink, fine)},
        name="digits",
    )


def test_merge_classes_is_a_seeded_partition():
    fine = np.repeat(np.arange(10), 3)
    coarse = merge_classes(fine, 4, seed=3)
    # every fine class maps to exactly one coarse class, and sizes differ by at most one fine class
    mapping = {f: set(coarse[fine == f]) for f in range(10)}
    assert all(len(v) == 1 for v in mapping.values())
    per_coarse = np.bincount([next(iter(v)) for v in mapping.values()])
    assert per_coarse.max() - per_coarse.min() <= 1 and len(per_coarse) == 4
    assert np.array_equal(coarse, merge_classes(fine, 4, seed=3))
    assert not np.array_equal(coarse, merge_classes(fine, 4, seed=4))
    with pytest.raises(InputError, match="n_coarse"):
        merge_classes(fine, 11, seed=0)


def test_median_split_is_balanced_inside_every_group():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 100)
    values = rng.normal(size=200) + 10 * groups  # group 1 is much larger: a global split would be a function of it
    attribute = median_split(values, groups)
    assert attribute[groups == 0].sum() == 50 and attribute[groups == 1].sum() == 50


@pytest.mark.parametrize("kind", ["rare", "correlation", "noisy_label"])
def test_problem_slice_share_and_determinism(digits, kind):
    spec = ProblemSpec(kind, target=3 if kind != "correlation" else 1, seed=5,
                       attribute="thick" if kind == "correlation" else None, slice_share=0.04)
    problem = make_problem(digits, spec)
    assert abs(problem.test_slice.mean() - 0.04) < 0.005 and abs(problem.val_slice.mean() - 0.04) < 0.005
    for a, b in ((problem.train_index, problem.val_index), (problem.train_index, problem.test_index),
                 (problem.val_index, problem.test_index)):
        assert len(np.intersect1d(a, b)) == 0
    again = make_problem(digits, spec)
    assert np.array_equal(problem.test_index, again.test_index)
    assert np.array_equal(problem.train_labels, again.train_labels)
    if kind != "correlation":  # the slice is exactly the sub-group's test examples
        assert np.array_equal(problem.test_slice, digits.groups[problem.test_index] == 3)


def test_rare_keeps_the_requested_share_of_the_sub_group(digits):
    problem = make_problem(digits, ProblemSpec("rare", target=7, seed=0, rare_keep=0.1))
    pool = make_problem(digits, ProblemSpec("rare", target=7, seed=0, rare_keep=1.0))
    kept = (digits.groups[problem.train_index] == 7).sum()
    full = (digits.groups[pool.train_index] == 7).sum()
    assert kept == round(0.1 * full) and full > 50
    # nothing else in training changes
    assert (digits.groups[problem.train_index] != 7).sum() == (digits.groups[pool.train_index] != 7).sum()


def test_noisy_label_flips_the_sub_group_to_one_class(digits):
    problem = make_problem(digits, ProblemSpec("noisy_label", target=4, seed=1, noise_rate=0.5))
    true = digits.labels[problem.train_index]
    flipped = problem.train_labels != true
    in_group = digits.groups[problem.train_index] == 4
    assert not flipped[~in_group].any()
    assert 0.35 < flipped[in_group].mean() < 0.65
    assert len(np.unique(problem.train_labels[flipped])) == 1
    assert np.array_equal(problem.test_labels, digits.labels[problem.test_index])  # the test set stays clean
    assert np.array_equal(problem.val_labels, digits.labels[problem.val_index])  # and so does validation


def test_correlation_makes_the_attribute_predict_the_class(digits):
    problem = make_problem(digits, ProblemSpec("correlation", target=2, seed=0, attribute="thick", correlation=0.9))
    labels = digits.labels[problem.train_index]
    thick = digits.attributes["thick"][problem.train_index]
    assert abs(thick[labels == 2].mean() - 0.9) < 0.02
    assert abs(thick[labels != 2].mean() - 0.1) < 0.02
    test_labels, test_thick = problem.test_labels, digits.attributes["thick"][problem.test_index]
    assert np.array_equal(problem.test_slice, (test_labels == 2) & (test_thick == 0))


def test_bad_inputs_raise(digits):
    with pytest.raises(InputError, match="kind"):
        ProblemSpec("shift", target=0, seed=0)
    with pytest.raises(InputError, match="attribute"):
        ProblemSpec("correlation", target=0, seed=0)
    with pytest.raises(InputError, match="no attribute"):
        make_problem(digits, ProblemSpec("correlation", target=0, seed=0, attribute="slant"))
    with pytest.raises(InputError, match="no sub-group"):
        make_problem(digits, ProblemSpec("rare", target=42, seed=0))
    with pytest.raises(InputError, match="labels"):
        LabeledData(np.zeros((3, 2), np.float32), np.array([0.5, 1.0, 0.0]))
    with pytest.raises(InputError, match="groups must be a 1-D integer array"):  # was numpy's "object too deep"
        LabeledData(np.zeros((2, 2), np.float32), np.array([0, 1]), groups=np.array([[0, 1], [1, 0]], dtype=object))
    with pytest.raises(InputError, match="split"):
        ProblemSpec("rare", target=0, seed=0, split=(0.5, 0.5, 0.0))


def test_splits_never_cut_a_source():
    """Examples sharing a source (a patient) land in one split only; the test fails if any crosses."""
    rng = np.random.default_rng(0)
    n = 600
    patients = rng.integers(0, 150, size=n)  # ~4 images per patient
    fine = rng.integers(0, 4, size=n)
    data = LabeledData(rng.normal(size=(n, 3)).astype(np.float32), (fine >= 2).astype(np.int64), groups=fine,
                       split_groups=patients)
    for seed in range(5):
        problem = make_problem(data, ProblemSpec("rare", target=1, seed=seed, slice_share=0.1))
        sources = [set(patients[i]) for i in (problem.train_index, problem.val_index, problem.test_index)]
        assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
        assert 200 < len(problem.train_index) < 360  # the shares hold up to one source's size


def test_disjoint_merges_share_no_coarse_class():
    fine = np.repeat(np.arange(10), 3)
    merges = disjoint_merges(fine, 5, 3, first_seed=0)
    sets = [coarse_sets(fine, m) for m in merges]
    assert all(len(s) == 5 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    more = disjoint_merges(fine, 5, 1, first_seed=100, avoid=sets[0] | sets[1])
    assert not coarse_sets(fine, more[0]) & (sets[0] | sets[1])


def test_slice_statistics_flags_degenerate_problems_and_ceilings(digits):
    problem = make_problem(digits, ProblemSpec("rare", target=3, seed=0, slice_share=0.02))
    truth = problem.test_labels
    perfect = Predictions(np.eye(digits.n_classes)[truth] * 10.0, truth)
    stats = slice_statistics(problem, perfect)
    assert stats["degenerate"] and stats["slice_errors"] == 0
    assert stats["precision_at_10_ceiling"] == min(stats["n_slice"], 10) / 10
    wrong = Predictions(np.eye(digits.n_classes)[(truth + 1) % digits.n_classes] * 10.0, truth)
    assert not slice_statistics(problem, wrong)["degenerate"]


def test_read_ts_parses_multichannel_series(tmp_path):
    from harness.data.timeseries import read_ts

    path = tmp_path / "toy.ts"
    path.write_text("# comment\n@problemName toy\n@data\n1,2,3:4,5,6:a\n7,8,9:1,1,1:b\n", encoding="utf-8")
    series, labels = read_ts(path)
    assert series.shape == (2, 2, 3) and list(labels) == ["a", "b"]
    assert series[0, 1, 2] == 6
    path.write_text("@data\n1,2:a\n1,2,3:b\n", encoding="utf-8")
    with pytest.raises(InputError, match="unequal lengths"):
        read_ts(path)


def test_stroke_slant_sign():
    from harness.data.mnist import stroke_attributes

    image = np.zeros((2, 28, 28), dtype=np.uint8)
    for r in range(4, 24):  # "/" leans right, "\" leans left
        image[0, r, 24 - r] = 255
        image[1, r, r] = 255
    slant = stroke_attributes(image)["slant"].to_numpy()
    assert slant[0] > 0.5 and slant[1] < -0.5


@pytest.mark.skipif(not has_dataset("mnist"), reason="shared MNIST data absent")
def test_load_mnist_matches_the_readme_counts():
    from harness.data.mnist import load_mnist

    mnist = load_mnist()
    assert mnist.images.shape == (10000, 28, 28)
    assert np.bincount(mnist.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not has_dataset("timeseries"), reason="shared time-series data absent")
def test_pooled_ecg_holds_every_single_lead_series():
    from harness.data.timeseries import pooled_ecg

    pooled = pooled_ecg(64)
    # ECG200 200 + ECG5000 train 500 + ECGFiveDays 884 + TwoLeadECG 1162 (README table)
    assert pooled.series.shape == (2746, 1, 64)
    assert np.allclose(pooled.series.mean(axis=-1), 0, atol=1e-4)


def test_a_validation_set_too_small_for_the_slicers_is_refused():
    """Few slice members in a split shrink the evaluation set to keep the slice share; below
    MIN_VALIDATION examples the slicers cannot be fitted, and the problem is refused by name."""
    from harness.dcbench.protocol import MIN_VALIDATION

    n = 200
    groups = np.zeros(n, dtype=np.int64)
    groups[:6] = 1  # a 6-member sub-group: about 1 member in the validation split
    data = LabeledData(np.zeros((n, 2), np.float32), (np.arange(n) % 2).astype(np.int64), groups=groups, name="tiny")
    with pytest.raises(InputError, match=rf"validation set of \d+ examples \(< {MIN_VALIDATION}\)"):
        make_problem(data, ProblemSpec("rare", target=1, seed=0, slice_share=0.1))
