"""How much Table 1 moves between CPU kernel sets -> results/table1_kernel_spread.json.

torch picks vectorised kernels by CPU (AVX-512, AVX2, or the scalar ``default`` set under
``ATEN_CPU_CAPABILITY=default``); trained weights differ with them, and so do the problems'
errors and every method's slices. Run the same reduced Table 1 twice, each in an empty cache,
then compare the two ``table1_problems.csv`` files problem by problem::

    INFEMBED_CACHE=$(mktemp -d) python -m experiments.table1 --suites ecg --problems 4 --out /tmp/native
    ATEN_CPU_CAPABILITY=default INFEMBED_CACHE=$(mktemp -d) \\
        python -m experiments.table1 --suites ecg --problems 4 --out /tmp/default
    python -m experiments.kernel_spread /tmp/native/table1_problems.csv /tmp/default/table1_problems.csv

(``make table1-kernel-spread`` does all three.) Any two runs of the same problems compare:
a run of more problems holds the reduced run's problems (same seeds) and serves as the native
side.
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from harness.errors import InputError, exit_status
from harness.io import atomic_write_text
from harness.paths import REPO_ROOT

KEY = ["suite", "data", "kind", "seed", "method"]
COLUMNS = ("precision_at_10", "auroc", "accuracy", "slice_share_of_errors")


def spread(first: pd.DataFrame, second: pd.DataFrame) -> dict:
    both = first.merge(second, on=KEY, suffixes=("_a", "_b"))
    if both.empty:
        raise InputError("the two runs share no (suite, data, kind, seed, method) row")
    out = {"problems": int(both.drop_duplicates(KEY[:4]).shape[0]), "rows": int(len(both)), "per_problem": {}}
    for column in COLUMNS:
        diff = (both[f"{column}_a"] - both[f"{column}_b"]).abs()
        out["per_problem"][column] = {"mean_abs_difference": round(float(diff.mean()), 4),
                                      "max_abs_difference": round(float(diff.max()), 4),
                                      "share_changed": round(float((diff > 1e-9).mean()), 4)}
    cells = both.groupby(["kind", "method"])[["precision_at_10_a", "precision_at_10_b"]].mean()
    delta = (cells["precision_at_10_a"] - cells["precision_at_10_b"]).abs()
    out["cell_mean_precision_at_10"] = {"problems_per_cell": int(both.drop_duplicates(KEY[:4]).groupby("kind").size()
                                                                 .min()),
                                        "mean_abs_difference": round(float(delta.mean()), 4),
                                        "max_abs_difference": round(float(delta.max()), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="table1_problems.csv of one kernel set")
    parser.add_argument("second", help="table1_problems.csv of the other")
    parser.add_argument("--labels", nargs=2, default=("native", "default"), help="names of the two kernel sets")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "table1_kernel_spread.json"))
    args = parser.parse_args(argv)
    try:
        result = spread(pd.read_csv(args.first), pd.read_csv(args.second))
    except (OSError, InputError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"runs": dict(zip(args.labels, (args.first, args.second))), **result}
    atomic_write_text(json.dumps(result, indent=2) + "\n", args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.kernel_spread", main))
