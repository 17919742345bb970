"""CI regression of the mini-dcbench numbers against the committed baselines.

Runs the fixed-seed subset of Table 1 (experiments.table1.regression_results: 2 problems
per cell, every method) and fails when any (method, error type) mean precision@10 of an
input type drops by more than ``REGRESSION_TOLERANCE`` (0.1) below
``results/regression/<input type>.json``. Rises pass (update the baselines to lock them in).
Baselines change only through ``python -m experiments.table1 --update-regression``.
Skips when the shared data is absent: the baselines were measured on it.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.paths import has_dataset

pytestmark = pytest.mark.slow

NEEDED = ("mnist", "covid-chestxray", "timeseries")


@pytest.fixture(scope="module")
def measured():
    missing = [name for name in NEEDED if not has_dataset(name)]
    if missing:
        pytest.skip(f"shared data absent ({', '.join(missing)}): the regression baselines were measured on it")
    from experiments.table1 import regression_means, regression_results

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the baselines were written: same arithmetic order
    try:
        return regression_means(regression_results())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("input_type", ["natural_images", "medical_images", "medical_time_series"])
def test_no_precision_drop(measured, input_type):
    from experiments.table1 import REGRESSION_TOLERANCE, regression_baseline_path

    path = regression_baseline_path(input_type)
    assert path.is_file(), f"no baseline {path}: run `python -m experiments.table1 --update-regression`"
    baseline = json.loads(path.read_text())["means"]
    now = measured[input_type]
    assert set(now) == set(baseline), f"methods/cells changed: {sorted(set(now) ^ set(baseline))}; update the baseline"
    drops = {k: (baseline[k], now[k]) for k in baseline if now[k] < baseline[k] - REGRESSION_TOLERANCE}
    assert not drops, f"precision@10 dropped by more than {REGRESSION_TOLERANCE} (baseline, now): {drops}"
