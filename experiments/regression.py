"""The CI regression of Table 1: the slice-discovery code on frozen trained models.

Trained weights depend on which vectorised kernels torch picks for the CPU (AVX-512, AVX2 or the
scalar ``default`` set): a 0.1% change of test accuracy can move one problem's precision@10
from 0.8 to 0.0. A regression that trains afresh therefore tests the CPU, not the code. This one
is split in two:

* **Slicers on frozen models** (``frozen_runs``): per suite of the mini-dcbench the pretrained
  trunk and the fine-tuned heads of a fixed set of Table 1 problems are committed under
  ``tests/fixtures/regression/<suite>/``; the regression rebuilds each problem (its splits come
  from numpy's seeded generator, the same on every CPU), loads the frozen weights and runs every
  method. Only the methods' own arithmetic is exercised, and it is stable across kernel sets
  (measured: ``results/regression/kernel_spread.json``). Per (suite, method, error type), the
  mean precision@10 may not drop more than ``TOLERANCE`` below
  ``results/regression/<suite>.json``.
* **Training end to end** (``fresh_statistics``): the same problems trained afresh (trunk and
  heads), checked on what is stable across kernel sets: each problem's test accuracy and slice
  statistics, within a band of the frozen model's.

Both run in a temporary cache (``temporary_cache``), so a warm cache can never stand in for the
code under test. Baselines and fixtures change only through ``make update-regression``
(``python -m experiments.regression --update``), never automatically.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.table1 import REPORT_FIRST_SEED
from harness.cache import state_dict_key
from harness.dcbench.methods import TABLE1_INFEMBED, InfEmbedConfig
from harness.dcbench.protocol import KINDS, ProblemSpec, make_problem
from harness.dcbench.runner import (
    ProblemRun,
    evaluate,
    method_scores,
    prepare_problem,
    pretrained_trunk,
    suite_features,
    suite_raw_embeddings,
)
from harness.dcbench.suites import SUITES, Suite, shipped_suites
from harness.errors import InputError, exit_status
from harness.io import atomic_torch_save, atomic_write_text
from harness.paths import REPO_ROOT, has_dataset

BASELINE_DIR = REPO_ROOT / "results" / "regression"
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "regression"
PROBLEMS_PER_CELL = 3
# A per-cell mean precision@10 may drop at most this much below its baseline. On frozen models
# the spread between kernel sets is far smaller (kernel_spread.json); one problem losing its slice
# moves a 3-problem mean by up to 0.33, which this catches.
TOLERANCE = 0.05
# Fresh training: a statistic may differ from the frozen model's by max(floor, flips / n), n the
# examples it is computed over, so small test sets (X-rays: slices of about 10) may flip a few
# predictions. Measured between kernel sets (kernel_spread.json): test accuracy moved by up to 0.034
# (Tiny-ImageNet, 50 of 1,500 predictions: its trunk is retrained too), accuracy in the slice by up to
# 4 predictions; a broken training loop or problem generator moves them far more.
STATISTICS_BAND = {"accuracy": 0.07, "accuracy_in_slice": 0.25, "accuracy_outside_slice": 0.07,
                   "slice_share_of_errors": 0.15}
BAND_FLIPS = {"accuracy": ("n_test", 8), "accuracy_in_slice": ("n_slice", 4),
              "accuracy_outside_slice": ("n_outside", 8), "slice_share_of_errors": ("n_errors", 8)}


@contextlib.contextmanager
def temporary_cache() -> Iterator[str]:
    """Points ``INFEMBED_CACHE`` at an empty folder for the duration (restored afterwards)."""
    previous = os.environ.get("INFEMBED_CACHE")
    with tempfile.TemporaryDirectory(prefix="infembed-regression-") as folder:
        os.environ["INFEMBED_CACHE"] = folder
        try:
            yield folder
        finally:
            if previous is None:
                os.environ.pop("INFEMBED_CACHE", None)
            else:
                os.environ["INFEMBED_CACHE"] = previous


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One thread, as the baselines were written with (the arithmetic order then matches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def suite_data(name: str) -> tuple[str, ...]:
    """The shared datasets a suite's frozen fixtures were made on: "digits" is MNIST when the
    shared data has it (its scikit-learn fallback is exercised by tests/test_no_shared_data.py)."""
    return SUITES[name][1] or ("mnist",)


def suite_names() -> list[str]:
    return list(SUITES)


def available_suites() -> list[str]:
    return [name for name in suite_names() if all(has_dataset(d) for d in suite_data(name))]


def build_suite(name: str) -> Suite:
    suites, skipped = shipped_suites((name,))
    if skipped:
        raise InputError(f"suite {name}: {skipped[name]}")
    return suites[0]


def regression_specs(suite: Suite) -> list[ProblemSpec]:
    """The suite's fixed problems: its first ``PROBLEMS_PER_CELL`` reported problems of every
    error type (Table 1's own seeds)."""
    return [spec for kind in KINDS for spec in suite.specs(kind, PROBLEMS_PER_CELL, REPORT_FIRST_SEED)]


def problem_name(spec: ProblemSpec) -> str:
    return f"{spec.kind}_{spec.data}_target{spec.target}_seed{spec.seed}"


def trunk_path(suite: Suite):
    return FIXTURE_DIR / suite.name / "trunk.pt"


def head_path(suite: Suite, spec: ProblemSpec):
    return FIXTURE_DIR / suite.name / f"{problem_name(spec)}.pt"


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def trunk_digest(suite: Suite) -> str:
    """A hash of the trunk's pretraining pool: a frozen trunk is valid only for the pool it saw."""
    return _digest(suite.trunk.data.example_ids, np.asarray(suite.trunk.data.labels, dtype=np.int64))


def problem_digest(suite: Suite, spec: ProblemSpec) -> str:
    """A hash of the problem's splits, training labels and slice: a frozen head is valid only
    for the exact problem it was fine-tuned on."""
    problem = make_problem(suite.dataset(spec.data), spec)
    return _digest(problem.train_index, problem.train_labels, problem.val_index, problem.test_index,
                   problem.test_labels, problem.test_slice)


def _load_fixture(path, digest: str, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"no frozen {what} {path}: run `make update-regression`")
    frozen = torch.load(path, map_location="cpu", weights_only=True)
    if frozen["digest"] != digest:
        raise InputError(f"{path} was trained on another version of this {what}'s data or splits: "
                         "run `make update-regression`")
    return frozen["state_dict"]


def frozen_runs(suite: Suite, progress: bool = False) -> list[ProblemRun]:
    """Every regression problem of ``suite`` with its frozen trunk and heads (no training)."""
    trunk = _load_fixture(trunk_path(suite), trunk_digest(suite), "trunk")
    features, raw = suite_features(suite, trunk), suite_raw_embeddings(suite)
    return [prepare_problem(suite, spec, features, raw,
                            _load_fixture(head_path(suite, spec), problem_digest(suite, spec), "problem"))
            for spec in tqdm(regression_specs(suite), desc=f"frozen {suite.name}", disable=not progress)]


def fresh_runs(suite: Suite, progress: bool = False) -> list[ProblemRun]:
    """Every regression problem of ``suite`` trained afresh, trunk and heads (in whatever cache
    is active)."""
    trunk = pretrained_trunk(suite.trunk, progress=progress)
    features, raw = suite_features(suite), suite_raw_embeddings(suite)
    weights = state_dict_key(trunk.state_dict())
    return [prepare_problem(suite, spec, features, raw, trunk_weights=weights)
            for spec in tqdm(regression_specs(suite), desc=f"training {suite.name}", disable=not progress)]


def score_runs(runs: list[ProblemRun], infembed: InfEmbedConfig = TABLE1_INFEMBED) -> pd.DataFrame:
    rows = []
    for run in runs:
        scores, info = method_scores(run, infembed)
        rows.extend(evaluate(run, scores, info))
    return pd.DataFrame(rows)


def cell_means(results: pd.DataFrame) -> dict[str, float]:
    """{"method | kind": mean precision@10} of one suite."""
    return {f"{method} | {kind}": round(float(group["precision_at_10"].mean()), 4)
            for (method, kind), group in results.groupby(["method", "kind"])}


def precision_drops(baseline: dict[str, float], now: dict[str, float],
                    tolerance: float = TOLERANCE) -> dict[str, tuple[float, float]]:
    """The cells whose mean fell more than ``tolerance`` below the baseline: {cell: (baseline, now)}.
    Cells that appeared or vanished are an error: the method list changed without new baselines."""
    if set(now) != set(baseline):
        raise InputError(f"methods/cells changed: {sorted(set(now) ^ set(baseline))}; run `make update-regression`")
    return {cell: (baseline[cell], now[cell]) for cell in baseline if now[cell] < baseline[cell] - tolerance}


def baseline_path(suite_name: str):
    """The baselines of one suite, by its name (``Suite.name``: "mnist" for the digits suite on MNIST)."""
    return BASELINE_DIR / f"{suite_name}.json"


def load_baseline(suite_name: str) -> dict:
    path = baseline_path(suite_name)
    if not path.is_file():
        raise InputError(f"no baseline {path}: run `make update-regression`")
    return json.loads(path.read_text())


def statistics_of(runs: list[ProblemRun]) -> dict[str, dict[str, float]]:
    """Per problem: the banded statistics and the example counts their bands are scaled by."""
    out = {}
    for run in runs:
        stats = run.statistics
        counts = {"n_test": stats["n_test"], "n_slice": stats["n_slice"],
                  "n_outside": stats["n_test"] - stats["n_slice"], "n_errors": int((~run.test.correct).sum())}
        out[problem_name(run.spec)] = {**{k: round(stats[k], 4) for k in STATISTICS_BAND}, **counts}
    return out


def band(statistic: str, frozen: dict[str, float]) -> float:
    count, flips = BAND_FLIPS[statistic]
    return max(STATISTICS_BAND[statistic], flips / max(frozen[count], 1))


def fresh_statistics(suite: Suite, progress: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy and slice statistics of every regression problem trained afresh."""
    return statistics_of(fresh_runs(suite, progress))


def statistics_outside_band(baseline: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) -> dict:
    """{problem: {statistic: (frozen, fresh)}} for every statistic outside its band."""
    if set(now) != set(baseline):
        raise InputError(f"problems changed: {sorted(set(now) ^ set(baseline))}; run `make update-regression`")
    out = {}
    for problem, values in baseline.items():
        bad = {k: (values[k], now[problem][k]) for k in STATISTICS_BAND
               if abs(now[problem][k] - values[k]) > band(k, values)}
        if bad:
            out[problem] = bad
    return out


def update(names: list[str]) -> None:
    """Trains the regression problems afresh, freezes their weights and writes the baselines."""
    with temporary_cache(), single_thread():
        for name in names:
            suite = build_suite(name)
            runs = fresh_runs(suite, progress=True)
            trunk = pretrained_trunk(suite.trunk)
            atomic_torch_save({"state_dict": trunk.state_dict(), "digest": trunk_digest(suite)}, trunk_path(suite))
            for run in runs:
                atomic_torch_save({"state_dict": run.head.state_dict(), "digest": problem_digest(suite, run.spec)},
                                  head_path(suite, run.spec))
            # Baselines from the frozen weights exactly as the test loads them.
            frozen = frozen_runs(suite, progress=True)
            payload = {"metric": "precision_at_10", "problems_per_cell": PROBLEMS_PER_CELL, "tolerance": TOLERANCE,
                       "infembed": asdict(TABLE1_INFEMBED), "means": cell_means(score_runs(frozen)),
                       "statistics": statistics_of(runs), "torch": torch.__version__,
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}
            atomic_write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", baseline_path(suite.name))
            print(f"wrote {baseline_path(suite.name)}, a trunk and {len(runs)} heads in {FIXTURE_DIR / suite.name}")


def measure(names: list[str]) -> dict:
    """What this machine's kernel set gives: every method's cell means on the frozen models and
    on freshly trained ones, and the fresh models' statistics (run it under several
    ``ATEN_CPU_CAPABILITY`` values; ``--spread`` compares the outputs)."""
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "frozen_means": {}, "fresh_means": {},
           "fresh_statistics": {}}
    with temporary_cache(), single_thread():
        for name in names:
            suite = build_suite(name)
            out["frozen_means"][suite.name] = cell_means(score_runs(frozen_runs(suite)))
            fresh = fresh_runs(suite)
            out["fresh_means"][suite.name] = cell_means(score_runs(fresh))
            out["fresh_statistics"][suite.name] = statistics_of(fresh)
    return out


def kernel_spread(measurements: list[dict]) -> dict:
    """Per suite, how far the kernel sets' numbers lie apart (max - min over the sets): the
    frozen-model cell means, the freshly trained cell means, and each fresh statistic."""
    def spread(values_per_set: list[dict[str, float]]) -> dict[str, float]:
        return {key: round(max(v[key] for v in values_per_set) - min(v[key] for v in values_per_set), 4)
                for key in values_per_set[0]}

    out = {"cpu_capabilities": [m["cpu_capability"] for m in measurements], "suites": {}}
    for name in measurements[0]["frozen_means"]:
        frozen = spread([m["frozen_means"][name] for m in measurements])
        fresh = spread([m["fresh_means"][name] for m in measurements])
        problems = measurements[0]["fresh_statistics"][name]
        statistics = {stat: max(spread([{stat: m["fresh_statistics"][name][p][stat]} for m in measurements])[stat]
                                for p in problems) for stat in STATISTICS_BAND}
        out["suites"][name] = {
            "frozen_cell_means_max_spread": max(frozen.values()), "fresh_cell_means_max_spread": max(fresh.values()),
            "fresh_cell_means_mean_spread": round(float(np.mean(list(fresh.values()))), 4),
            "fresh_statistics_max_spread": statistics, "frozen_cell_means": frozen, "fresh_cell_means": fresh}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--update", action="store_true", help="retrain, refreeze and rewrite the baselines")
    action.add_argument("--measure", metavar="JSON", help="write this kernel set's frozen means and fresh "
                        "statistics to JSON (for measuring the spread between kernel sets)")
    action.add_argument("--spread", nargs="+", metavar="JSON", help="compare --measure outputs of several "
                        "kernel sets; writes results/regression/kernel_spread.json")
    parser.add_argument("--suites", nargs="+", choices=suite_names(), help="only these suites (default: all whose "
                        "shared data is present)")
    args = parser.parse_args(argv)
    if args.spread:
        measurements = [json.loads(open(path).read()) for path in args.spread]
        path = BASELINE_DIR / "kernel_spread.json"
        atomic_write_text(json.dumps(kernel_spread(measurements), indent=2, sort_keys=True) + "\n", path)
        print(f"wrote {path}")
        return 0
    names = args.suites or available_suites()
    missing = sorted(set(suite_names()) - set(available_suites()))
    if missing and not args.suites:
        print(f"shared data absent: skipping suites {missing}", file=sys.stderr)
    if args.update:
        update(names)
    else:
        atomic_write_text(json.dumps(measure(names), indent=2, sort_keys=True) + "\n", args.measure)
        print(f"wrote {args.measure}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.regression", main))
