"""Suites (the public way to benchmark new data), the shipped suites' pools, and the runner."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from harness.dcbench.protocol import KINDS, LabeledData, coarse_sets, disjoint_merges, merge_classes, median_split
from harness.dcbench.suites import Suite, TrunkRecipe, digits_suite, shipped_suites
from harness.errors import InputError
from harness.models.small import image_trunk, series_trunk
from harness.paths import has_dataset
from harness.train import TrainConfig


def _digits_pools():
    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    fine = digits.target.astype(np.int64)
    ink = median_split(digits.images.mean(axis=(1, 2)), fine)
    order = np.random.default_rng(0).permutation(len(fine))
    pretrain, report, dev = order[:400], order[400:1400], order[1400:]
    coarse = merge_classes(fine, 5, seed=0)

    def data(index, name, labels=None, **kw):
        return LabeledData(x[index], coarse[index] if labels is None else labels, groups=fine[index],
                           attributes={"thick": ink[index]}, name=name, ids=index, **kw)

    return x, fine, coarse, pretrain, report, dev, data


def small_suite(**overrides) -> Suite:
    x, fine, coarse, pretrain, report, dev, data = _digits_pools()
    dev_coarse = disjoint_merges(fine[dev], 5, 1, first_seed=1000, avoid=coarse_sets(fine[report], coarse[report]))[0]
    options = dict(
        input_type="any_name", name="small", source="scikit-learn digits",
        report=(data(report, "small"),), dev=(data(dev, "small-dev", labels=dev_coarse),),
        trunk=TrunkRecipe("conv8-tiny", lambda: image_trunk(1, (8, 16)),
                          LabeledData(x[pretrain], fine[pretrain], name="pool", ids=pretrain),
                          TrainConfig(epochs=2, lr=3e-3)),
        head_train=TrainConfig(epochs=5, lr=3e-3), correlation_attributes=("thick",),
        defaults={"slice_share": 0.08}, min_members=20,
    )
    options.update(overrides)
    return Suite(**options)


def test_a_suite_for_new_data_is_public_and_checked():
    suite = small_suite()
    assert suite.n_features == 16 and suite.input_type == "any_name"
    specs = suite.specs("rare", 12)
    assert len(specs) == 12 and len({s.slice_id for s in specs}) == 10  # cycles over the 10 distinct digits
    assert [s.seed for s in specs] == list(range(12))
    x, fine, coarse, pretrain, report, dev, data = _digits_pools()
    with pytest.raises(InputError, match="share 400 examples"):  # the pretraining pool reused for problems
        small_suite(report=(data(pretrain, "small"),))
    with pytest.raises(InputError, match="sub-group, coarse class"):  # same merge in dev and report
        small_suite(dev=(data(dev, "small-dev"),))
    with pytest.raises(InputError, match="no correlation attribute"):  # was a raw KeyError
        small_suite(correlation_attributes=("slant",))
    with pytest.raises(InputError, match="need sub-group labels"):  # was numpy's "object too deep"
        small_suite(report=(LabeledData(x[report], coarse[report], name="small", ids=report),),
                    correlation_attributes=()).specs("rare", 2)
    series = np.random.default_rng(0).normal(size=(60, 32)).astype(np.float32)  # (N, L): no channel axis
    with pytest.raises(InputError, match="channel axis"):
        Suite("ts", "series", "toy", report=(LabeledData(series, np.arange(60) % 2, name="s"),),
              trunk=TrunkRecipe("c1", lambda: series_trunk(1), LabeledData(series, np.arange(60) % 2, name="p",
                                                                             ids=np.arange(60) + 100),
                                TrainConfig(epochs=1)))


def test_shipped_digits_suite_pools_are_disjoint_and_attributes_vary_inside_fine_classes():
    suite = digits_suite()  # MNIST with the shared data, scikit-learn's digits without
    suite.check_pools()
    report_ids = {int(i) for d in suite.report for i in d.example_ids}
    dev_ids = {int(i) for d in suite.dev for i in d.example_ids}
    assert not report_ids & dev_ids and not report_ids & set(suite.trunk.data.example_ids.tolist())
    report_pairs = set().union(*(d.subgroup_pairs() for d in suite.report))
    dev_pairs = set().union(*(d.subgroup_pairs() for d in suite.dev))
    assert report_pairs and dev_pairs and not report_pairs & dev_pairs
    for kind in KINDS:
        assert len(suite.slices(kind)) >= 10, kind  # >= 10 distinct ground-truth slices per cell
    _assert_attributes_vary(suite)


def _assert_attributes_vary(suite: Suite) -> None:
    for data in suite.report + suite.dev:
        for name in suite.correlation_attributes:
            values = np.asarray(data.attributes[name])
            for group in np.unique(data.groups):
                inside = values[np.asarray(data.groups) == group]
                assert 0 < inside.mean() < 1, f"{data.name}: {name} is constant inside sub-group {group}"


@pytest.mark.skipif(not all(has_dataset(d) for d in ("tiny-imagenet-subset", "covid-chestxray", "timeseries")),
                    reason="shared data absent")
def test_every_shipped_suite_keeps_dev_and_report_apart():
    suites, skipped = shipped_suites()
    assert not skipped
    for suite in suites:
        suite.check_pools()
        _assert_attributes_vary(suite)
        if suite.name == "covid-xray":  # patients never cross splits
            assert suite.report[0].split_groups is not None


def test_run_problem_from_given_weights_matches_the_trained_run(tmp_path, monkeypatch, one_thread):
    """The regression hook: a problem run on given (frozen) trunk and head weights gives the
    same rows as the run that trained them; a killed run resumes from its finished problems."""
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path))
    from harness.dcbench import runner
    from harness.dcbench.methods import InfEmbedConfig

    suite = small_suite()
    config = InfEmbedConfig(arnoldi_dim=30, embedding_dim=10, n_fit=200, n_clusters=6)
    spec = suite.specs("noisy_label", 1)[0]
    trained = runner.run_problem(suite, spec, config)
    weights = runner.problem_weights(suite, spec)
    assert sum(p.numel() for p in weights["head"].values()) > 2000  # two layers, width 128
    given = runner.run_problem(suite, spec, config, weights=weights)
    assert [r["method"] for r in trained] == [r["method"] for r in given]
    for a, b in zip(trained, given):
        assert a["precision_at_10"] == b["precision_at_10"] and a["auroc"] == pytest.approx(b["auroc"])
    assert trained[0]["arnoldi_iterations"] == 30 and trained[0]["n_parameters"] > 2000

    jobs = [(suite, s) for s in suite.specs("rare", 2)]
    first = runner.run_problems(jobs, config, progress=False)
    monkeypatch.setattr(runner, "_run_job", lambda *a: pytest.fail("finished problems must not rerun"))
    assert runner.run_problems(jobs, config, progress=False) == first
    with pytest.raises(InputError, match="weights"):
        runner.run_problem(suite, spec, config, weights={"model": {}})
