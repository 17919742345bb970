"""CI regression of Table 1's numbers (experiments.regression), robust to the CPU's kernel set.

* Every method on the committed frozen models: no (method, error type) mean precision@10 may
  drop more than ``TOLERANCE`` below ``results/regression/<input type>.json``.
* The same problems trained afresh: accuracy and slice statistics within their bands.
* Tests of the test: InfEmbed fed noise instead of influence embeddings, and Domino without its
  error weighting, must each be caught, and only in their own method's cells.

Everything runs in an empty temporary cache. Skips when the shared datasets are absent: the
baselines were measured on them.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from experiments import regression, table1
from harness.baselines import DominoSlicer
from harness.errors import InputError
from harness.paths import has_dataset

pytestmark = pytest.mark.slow

INPUT_TYPES = list(regression.NEEDED_DATA)


def need_data(input_type: str) -> None:
    name = regression.NEEDED_DATA[input_type]
    if not has_dataset(name):
        pytest.skip(f"shared data absent ({name}): the regression baselines were measured on it")


@pytest.fixture(scope="module")
def frozen_runs():
    """Frozen-model runs per input type, built once for the module in an empty cache."""
    runs = {}

    def get(input_type: str):
        need_data(input_type)
        if input_type not in runs:
            with regression.temporary_cache(), regression.single_thread():
                runs[input_type] = regression.frozen_runs(input_type)
        return runs[input_type]

    return get


def drops_now(runs, input_type):
    with regression.single_thread():
        now = regression.cell_means(regression.score_runs(runs))
    return regression.precision_drops(regression.load_baseline(input_type)["means"], now)


@pytest.mark.parametrize("input_type", INPUT_TYPES)
def test_no_precision_drop_on_frozen_models(frozen_runs, input_type):
    drops = drops_now(frozen_runs(input_type), input_type)
    assert not drops, f"precision@10 dropped by more than {regression.TOLERANCE} (baseline, now): {drops}"


@pytest.mark.parametrize("input_type", INPUT_TYPES)
def test_fresh_training_keeps_accuracy_and_slice_statistics(input_type):
    need_data(input_type)
    with regression.temporary_cache(), regression.single_thread():
        now = regression.fresh_statistics(input_type)
    outside = regression.statistics_outside_band(regression.load_baseline(input_type)["statistics"], now)
    assert not outside, f"fresh training outside the statistics' bands (frozen, fresh): {outside}"


def broken_cells(drops: dict, method_prefix: str) -> tuple[list[str], list[str]]:
    own = [cell for cell in drops if cell.startswith(method_prefix)]
    return own, sorted(set(drops) - set(own))


def test_regression_catches_infembed_on_noise(frozen_runs, monkeypatch):
    """Influence embeddings replaced by Gaussian noise of the same shape."""
    runs = frozen_runs("natural_images")
    real = table1.influence_embeddings

    def noise(run, config):
        shape = real(run, config).shape
        return np.random.default_rng(run.spec.seed).standard_normal(shape).astype(np.float32)

    monkeypatch.setattr(table1, "influence_embeddings", noise)
    own, others = broken_cells(drops_now(runs, "natural_images"), "InfEmbed |")
    assert own, "InfEmbed on noise was not caught by the regression"
    assert not others, f"other methods flagged by an InfEmbed-only break: {others}"


def test_regression_catches_domino_without_error_weighting(frozen_runs, monkeypatch):
    """Domino's label and prediction log-likelihood weights set to 0: a plain Gaussian mixture."""
    runs = frozen_runs("natural_images")
    unweighted = functools.partial(DominoSlicer, y_log_likelihood_weight=0.0, y_hat_log_likelihood_weight=0.0)
    monkeypatch.setattr(table1, "DominoSlicer", unweighted)
    own, others = broken_cells(drops_now(runs, "natural_images"), "Domino")
    assert own, "Domino without error weighting was not caught by the regression"
    assert not others, f"other methods flagged by a Domino-only break: {others}"


def test_frozen_model_of_another_problem_is_refused(monkeypatch):
    need_data("medical_time_series")
    suite, spec = regression.regression_specs("medical_time_series")[0]
    monkeypatch.setattr(regression, "problem_digest", lambda suite, spec: "another problem")
    with pytest.raises(InputError, match="another version of this problem"):
        regression.load_frozen_model(suite, spec)


def test_changed_method_list_needs_new_baselines():
    with pytest.raises(InputError, match="methods/cells changed"):
        regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.5, "B | rare": 0.1})
    assert regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.44}) == {"A | rare": (0.5, 0.44)}
    assert regression.precision_drops({"A | rare": 0.5}, {"A | rare": 0.46}) == {}
