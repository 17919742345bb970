"""CI regression of Table 1's numbers (experiments.regression), robust to the CPU's kernel set.

* Every method on the committed frozen trunks and heads: no (method, error type) mean
  precision@10 of a suite may drop more than ``TOLERANCE`` below ``results/regression/<suite>.json``.
* The same problems trained afresh: accuracy and slice statistics within their bands.
* Tests of the test: InfEmbed fed noise instead of influence embeddings, and Domino without its
  error weighting, must each be caught, and only in their own method's cells; an untrained model
  must fail the fresh-training check.

Everything runs in an empty temporary cache. Skips when the shared datasets are absent: the
baselines were measured on them.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from experiments import regression
from harness.baselines import DominoSlicer
from harness.dcbench import runner
from harness.errors import InputError
from harness.paths import has_dataset

pytestmark = pytest.mark.slow

SUITE_NAMES = regression.suite_names()
# The tests of the test break a method on the suite where every method finds slices.
BREAK_SUITE = "ecg"


def need_data(name: str) -> None:
    missing = [d for d in regression.suite_data(name) if not has_dataset(d)]
    if missing:
        pytest.skip(f"shared data absent ({', '.join(missing)}): the regression baselines were measured on it")


@pytest.fixture(scope="module")
def frozen_runs():
    """Frozen-model runs per suite, built once for the module in an empty cache."""
    runs = {}

    def get(name: str):
        need_data(name)
        if name not in runs:
            with regression.temporary_cache(), regression.single_thread():
                runs[name] = regression.frozen_runs(regression.build_suite(name))
        return runs[name]

    return get


def drops_now(runs):
    with regression.single_thread():
        now = regression.cell_means(regression.score_runs(runs))
    return regression.precision_drops(regression.load_baseline(runs[0].suite.name)["means"], now)


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_no_precision_drop_on_frozen_models(frozen_runs, name):
    drops = drops_now(frozen_runs(name))
    assert not drops, f"precision@10 dropped by more than {regression.TOLERANCE} (baseline, now): {drops}"


@pytest.fixture(scope="module")
def fresh_cache():
    """One empty cache for the module's fresh-training tests (the X-ray suite reuses the
    Tiny-ImageNet trunk pretrained by the test before it), never the user's."""
    with regression.temporary_cache() as folder:
        yield folder


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_fresh_training_keeps_accuracy_and_slice_statistics(fresh_cache, name, monkeypatch):
    need_data(name)
    monkeypatch.setenv("INFEMBED_CACHE", fresh_cache)
    with regression.single_thread():
        suite = regression.build_suite(name)
        now = regression.fresh_statistics(suite)
    outside = regression.statistics_outside_band(regression.load_baseline(suite.name)["statistics"], now)
    assert not outside, f"fresh training outside the statistics' bands (frozen, fresh): {outside}"


def broken_cells(drops: dict, method_prefix: str) -> tuple[list[str], list[str]]:
    own = [cell for cell in drops if cell.startswith(method_prefix)]
    return own, sorted(set(drops) - set(own))


def test_regression_catches_infembed_on_noise(frozen_runs, monkeypatch):
    """Influence embeddings replaced by Gaussian noise of the same shape."""
    runs = frozen_runs(BREAK_SUITE)
    real = runner.infembed_embeddings

    def noise(run, config):
        val, test, info = real(run, config)
        rng = np.random.default_rng(run.spec.seed)
        return rng.standard_normal(val.shape).astype(np.float32), rng.standard_normal(test.shape).astype(np.float32), info

    monkeypatch.setattr(runner, "infembed_embeddings", noise)
    own, others = broken_cells(drops_now(runs), "InfEmbed")
    assert own, "InfEmbed on noise was not caught by the regression"
    assert not others, f"other methods flagged by an InfEmbed-only break: {others}"


def test_regression_catches_domino_without_error_weighting(frozen_runs, monkeypatch):
    """Domino's label and prediction log-likelihood weights set to 0: a plain Gaussian mixture."""
    runs = frozen_runs(BREAK_SUITE)
    unweighted = functools.partial(DominoSlicer, y_log_likelihood_weight=0.0, y_hat_log_likelihood_weight=0.0)
    monkeypatch.setattr(runner, "DominoSlicer", unweighted)
    own, others = broken_cells(drops_now(runs), "Domino")
    assert own, "Domino without error weighting was not caught by the regression"
    assert not others, f"other methods flagged by a Domino-only break: {others}"


def test_fresh_training_check_catches_an_untrained_model(monkeypatch):
    """The training loop returning its model untouched (trunk and heads never trained)."""
    need_data(BREAK_SUITE)
    monkeypatch.setattr(runner, "train_model", lambda model, loader, config, progress=False: model)
    with regression.temporary_cache(), regression.single_thread():
        suite = regression.build_suite(BREAK_SUITE)
        now = regression.fresh_statistics(suite)
    outside = regression.statistics_outside_band(regression.load_baseline(suite.name)["statistics"], now)
    passed = sorted(set(now) - set(outside))
    assert not passed, f"problems whose untrained model passed the fresh-training check: {passed}"


def test_frozen_head_of_another_problem_is_refused(monkeypatch):
    need_data(BREAK_SUITE)
    suite = regression.build_suite(BREAK_SUITE)
    monkeypatch.setattr(regression, "problem_digest", lambda suite, spec: "another problem")
    with regression.temporary_cache(), pytest.raises(InputError, match="another version of this problem"):
        regression.frozen_runs(suite)


def test_changed_method_list_needs_new_baselines():
    with pytest.raises(InputError, match="methods/cells changed"):
        regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.5, "B | rare": 0.1})
    assert regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.44}) == {"A | rare": (0.5, 0.44)}
    assert regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.46}) == {}
