"""Table 1 (paper, section 4.1): precision@10 of slice-discovery methods on dcbench-style problems.

Default (``SOURCE=mini``): the offline mini-dcbench of :mod:`harness.dcbench`: the suites of
:func:`harness.dcbench.suites.shipped_suites` whose data is present (MNIST and Tiny-ImageNet,
COVID-19 X-rays, pooled ECG; without ``../shared/data`` only scikit-learn's digits), at
least ``--problems`` problems per (input type, error type) cell, spread over the input
type's suites and cycling over their distinct ground-truth slices. Per problem a head is
fine-tuned on the cached features of a pretrained trunk; every method is fitted on the
problem's validation split and scores its test split (dcbench's protocol).
``SOURCE=dcbench``: the real dcbench through :func:`harness.dcbench.client.run_dcbench_problem`.

Statistics: per cell the mean precision@10 over non-degenerate problems (degenerate: no
error inside the slice) with a 95% interval from a bootstrap that resamples distinct
slices, then problems within a slice; for InfEmbed against every other method the paired
mean difference with its interval and win / tie / loss counts.

Writes ``table1.md``, ``table1.csv`` (cell summary), ``table1_paired.csv`` and
``table1_problems.csv`` (every problem and method) to ``--out`` (default ``results/``).
The CI regression of these numbers lives in :mod:`experiments.regression`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from harness.dcbench.methods import DCBENCH_INFEMBED, TABLE1_INFEMBED, InfEmbedConfig
from harness.dcbench.metrics import cluster_bootstrap, paired_comparison
from harness.dcbench.protocol import KINDS, ProblemSpec
from harness.dcbench.runner import NOT_RUN, run_problems
from harness.dcbench.suites import INPUT_TYPES, SUITES, Suite, shipped_suites
from harness.errors import InputError, exit_status
from harness.io import atomic_write_text
from harness.paths import REPO_ROOT

RESULTS = REPO_ROOT / "results"
DEFAULT_PROBLEMS = 40
# Reported problems use seeds from 0, development problems (ablations.py) from 1000, on
# disjoint example pools and other (sub-group, coarse class) pairs (harness.dcbench.suites).
REPORT_FIRST_SEED = 0
DEV_FIRST_SEED = 1000
REFERENCE = "InfEmbed"
METRICS = ("precision_at_10", "precision_at_25", "auroc")

PAPER_TABLE1 = {  # Table 1 of the paper: precision@10 on the real dcbench (Domino on CLIP)
    ("natural_images", "Domino"): (0.40, 0.45, 0.60),
    ("natural_images", "InfEmbed"): (0.65, 0.55, 0.67),
    ("medical_images", "Domino"): (0.39, 0.60, 0.58),
    ("medical_images", "InfEmbed"): (0.57, 0.62, 0.73),
    ("medical_time_series", "Domino"): (0.60, 0.55, 0.90),
    ("medical_time_series", "InfEmbed"): (0.64, 0.65, 0.81),
}
# Our analogue of the paper's Domino-on-CLIP row: Domino on the frozen pretrained trunk's features.
PAPER_DOMINO_ROW = "Domino (trunk features)"


# ---------------------------------------------------------------- which problems
def problem_jobs(suites: list[Suite], n_per_cell: int, first_seed: int = REPORT_FIRST_SEED,
                 split: str = "report") -> list[tuple[Suite, ProblemSpec]]:
    """At least ``n_per_cell`` problems per (input type, kind), split evenly over the input
    type's suites (those with a ``split`` pool)."""
    jobs = []
    by_type: dict[str, list[Suite]] = {}
    for suite in suites:
        if suite.datasets(split):
            by_type.setdefault(suite.input_type, []).append(suite)
    for members in by_type.values():
        per_suite = math.ceil(n_per_cell / len(members))
        for suite in members:
            for kind in KINDS:
                jobs.extend((suite, spec) for spec in suite.specs(kind, per_suite, first_seed, split))
    return jobs


# ---------------------------------------------------------------- summaries
def _usable(results: pd.DataFrame) -> pd.DataFrame:
    return results[~results["degenerate"].astype(bool)]


def summarize(results: pd.DataFrame, metric: str = "precision_at_10") -> pd.DataFrame:
    """Per (input type, method, kind): mean and cluster-bootstrap 95% interval over the
    non-degenerate problems, problem and distinct-slice counts."""
    rows = []
    usable = _usable(results)
    for (input_type, method), group in usable.groupby(["input_type", "method"], sort=False):
        row = {"input_type": input_type, "method": method}
        for kind in KINDS:
            cell = group[group["kind"] == kind]
            mean, low, high = cluster_bootstrap(cell[metric], cell["slice_id"]) if len(cell) else (np.nan,) * 3
            row.update({f"{kind}_mean": mean, f"{kind}_low": low, f"{kind}_high": high,
                        f"{kind}_n": len(cell), f"{kind}_slices": cell["slice_id"].nunique()})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_summary(results: pd.DataFrame, metric: str = "precision_at_10", reference: str = REFERENCE) -> pd.DataFrame:
    """InfEmbed minus every other method per cell, paired by problem."""
    rows = []
    usable = _usable(results)
    for (input_type, kind), cell in usable.groupby(["input_type", "kind"], sort=False):
        wide = cell.pivot_table(index=["suite", "data", "seed", "slice_id"], columns="method", values=metric,
                                aggfunc="first").reset_index()
        if reference not in wide:
            continue
        for method in [m for m in cell["method"].unique() if m != reference]:
            comparison = paired_comparison(wide[reference], wide[method], wide["slice_id"])
            rows.append({"input_type": input_type, "kind": kind, "method": method, **comparison})
    return pd.DataFrame(rows)


def _interval(mean: float, low: float, high: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{mean:.2f}"


def markdown_table(summary: pd.DataFrame, paper: bool = True) -> str:
    lines = ["| Input type | Method | Rare | Correlation | Noisy label |", "|---|---|---|---|---|"]
    for _, row in summary.iterrows():
        cells = [_interval(row[f"{k}_mean"], row[f"{k}_low"], row[f"{k}_high"]) for k in KINDS]
        lines.append(f"| {row['input_type'].replace('_', ' ')} | {row['method']} | " + " | ".join(cells) + " |")
        paper_method = {"InfEmbed": "InfEmbed", PAPER_DOMINO_ROW: "Domino"}.get(row["method"])
        values = PAPER_TABLE1.get((row["input_type"], paper_method)) if paper else None
        if values is not None:
            lines.append(f"| | *paper: {paper_method} (real dcbench)* | " + " | ".join(f"*{v:.2f}*" for v in values)
                         + " |")
    return "\n".join(lines)


def counts_table(results: pd.DataFrame, not_run: pd.DataFrame) -> str:
    """Problems, distinct slices, degenerate and unbuildable problems and precision@10 ceilings per cell."""
    per_problem = results.drop_duplicates(["suite", "data", "kind", "seed"])
    lines = ["| Input type | Error type | Problems | Distinct slices | Degenerate (left out) | Not built (left out) "
             "| Slices < 10 members (mean ceiling) | Slice share of errors | Accuracy in / outside slice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (input_type, kind), cell in per_problem.groupby(["input_type", "kind"], sort=False):
        unbuilt = int(((not_run["input_type"] == input_type) & (not_run["kind"] == kind)).sum())
        usable = cell[~cell["degenerate"].astype(bool)]
        small = usable[usable["n_slice"] < 10]
        ceiling = f"{len(small)} ({small['precision_at_10_ceiling'].mean():.2f})" if len(small) else "0"
        lines.append(f"| {input_type.replace('_', ' ')} | {kind} | {len(usable)} | {usable['slice_id'].nunique()} | "
                     f"{int(cell['degenerate'].astype(bool).sum())} | {unbuilt} | {ceiling} | {usable['slice_share_of_errors'].mean():.2f} | "
                     f"{usable['accuracy_in_slice'].mean():.2f} / {usable['accuracy_outside_slice'].mean():.2f} |")
    return "\n".join(lines)


def suite_table(results: pd.DataFrame, metric: str = "precision_at_10") -> str:
    """Mean ``metric`` per suite and error type (non-degenerate problems): which data drives a row block."""
    usable = _usable(results)
    means = usable.pivot_table(index=["suite", "method"], columns="kind", values=metric, aggfunc="mean", sort=False)
    counts = usable.drop_duplicates(["suite", "data", "kind", "seed"]).groupby(["suite", "kind"]).size()
    lines = ["| Suite | Method | " + " | ".join(f"{k} (n)" for k in KINDS) + " |", "|---" * (len(KINDS) + 2) + "|"]
    for (suite, method), row in means.iterrows():
        cells = [f"{row[k]:.2f} ({counts.get((suite, k), 0)})" if k in row and np.isfinite(row[k]) else "n/a"
                 for k in KINDS]
        lines.append(f"| {suite} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: pd.DataFrame) -> str:
    lines = ["| Input type | Error type | InfEmbed minus | Difference [95% interval] | Decided | Win / tie / loss |",
             "|---|---|---|---|---|---|"]
    for _, r in paired.iterrows():
        decided = ("InfEmbed better" if r["low"] > 0 else "InfEmbed worse") if r["decided"] else "no"
        lines.append(f"| {r['input_type'].replace('_', ' ')} | {r['kind']} | {r['method']} | "
                     f"{_interval(r['difference'], r['low'], r['high'])} | {decided} | "
                     f"{r['wins']} / {r['ties']} / {r['losses']} |")
    return "\n".join(lines)


def write_results(results: pd.DataFrame, out: Path, header: list[str]) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    not_run = results[results["method"] == NOT_RUN] if "method" in results else results.iloc[:0]
    results = results[results["method"] != NOT_RUN]
    summary = summarize(results)
    paired = paired_summary(results)
    atomic_write_text(summary.to_csv(index=False, float_format="%.4f"), out / "table1.csv")
    atomic_write_text(paired.to_csv(index=False, float_format="%.4f"), out / "table1_paired.csv")
    atomic_write_text(results.to_csv(index=False, float_format="%.4f"), out / "table1_problems.csv")
    text = header + [
        "", "## precision@10 (mean [95% interval])", "", markdown_table(summary),
        "", "## InfEmbed against every other method (paired precision@10 differences)", "", paired_table(paired),
        "", "## Problems per cell", "", counts_table(results, not_run),
        "", "## precision@10 per suite (mean over its problems; n = problems)", "", suite_table(results),
    ]
    for metric in METRICS[1:]:
        text += ["", f"## {metric}", "", markdown_table(summarize(results, metric), paper=False)]
    text.append("")
    atomic_write_text("\n".join(text), out / "table1.md")
    return summary


# ---------------------------------------------------------------- the real dcbench
DCBENCH_METHODS = {"infembed": "InfEmbed", "domino_clip": "Domino (CLIP)", "domino_activations": "Domino (activations)",
                   "confusion": "Confusion matrix", "kmeans_activations": "K-Means (activations)"}
DCBENCH_INPUT_TYPES = {"imagenet": "natural_images", "celeba": "natural_images", "mimic": "medical_images",
                       "eeg": "medical_time_series"}


def run_real_dcbench(problem_ids: list[str], n_per_cell: int, config: InfEmbedConfig = DCBENCH_INFEMBED) -> pd.DataFrame:
    """The real dcbench (needs network access or a mirror, see harness.dcbench.client): the
    given problem ids, or the first ``n_per_cell`` trained-model problems of every cell."""
    from harness.dcbench.client import list_problems, run_dcbench_problem

    if not problem_ids:
        listing = list_problems()
        if "synthetic_preds" in listing.columns:  # the paper evaluates trained models only
            listing = listing[~listing["synthetic_preds"].astype(bool)]
        listing = listing.assign(input_type=listing["dataset"].map(DCBENCH_INPUT_TYPES))
        problem_ids = [pid for _, cell in listing.groupby(["input_type", "slice_category"])
                       for pid in cell.index[:n_per_cell]]
    rows = []
    for problem_id in tqdm(problem_ids, desc="dcbench problems"):
        results = run_dcbench_problem(problem_id, infembed=config, progress=False)
        attributes = results.pop("_problem")
        for method, metrics in results.items():
            rows.append({"input_type": DCBENCH_INPUT_TYPES.get(attributes.get("dataset"), attributes.get("dataset")),
                         "suite": "dcbench", "kind": attributes.get("slice_category"), "data": "dcbench",
                         "seed": problem_id, "slice_id": problem_id, "target": str(attributes.get("slice_names", "")),
                         "method": DCBENCH_METHODS[method], "degenerate": False, **metrics})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS,
                        help=f"problems per (input type, error type) cell (default {DEFAULT_PROBLEMS})")
    parser.add_argument("--workers", type=int, default=1, help="problems run in this many processes (default 1)")
    parser.add_argument("--suites", nargs="*", default=None, help="only these suites (default: every available one)")
    parser.add_argument("--out", default=None, help="output folder (default: results/)")
    parser.add_argument("--source", default=os.environ.get("SOURCE") or "mini", choices=("mini", "dcbench"),
                        help="mini (offline mini-dcbench, default) or dcbench (real dcbench; env SOURCE)")
    parser.add_argument("--dcbench-problems", nargs="*", default=[], help="dcbench problem ids (SOURCE=dcbench)")
    args = parser.parse_args(argv)
    if args.problems < 2:
        parser.error(f"--problems must be >= 2 for an interval; got {args.problems}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}")
    # One thread per process: these small models run several times faster than with
    # threads competing for the cores; --workers uses the other cores.
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else RESULTS
    start = time.time()
    if args.source == "dcbench":
        from harness.dcbench.client import DcbenchUnavailable

        try:
            results = run_real_dcbench(args.dcbench_problems, args.problems)
        except DcbenchUnavailable as exc:  # offline without a mirror: say so, write nothing
            print(f"error: {exc}", file=sys.stderr)
            return 2
        header = ["# Table 1 on the real dcbench", "", f"{results['seed'].nunique()} problems; InfEmbed: "
                  f"`{DCBENCH_INFEMBED}`."]
        write_results(results, out, header)
        return 0
    try:
        suites, skipped = shipped_suites(tuple(args.suites) if args.suites else None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    type_of = {name: input_type for name, (_, _, input_type) in SUITES.items()}
    ran_types = {s.input_type for s in suites}
    not_run = {t: "; ".join(dict.fromkeys(why for name, why in skipped.items() if type_of.get(name) == t))
               for t in INPUT_TYPES if t not in ran_types}
    for input_type, why in not_run.items():
        print(f"not run: {input_type.replace('_', ' ')}: {why}", file=sys.stderr)
    for name, why in skipped.items():
        if type_of.get(name) in ran_types:
            print(f"suite {name} not run: {why}", file=sys.stderr)
    if not suites:
        print("error: no suite can run", file=sys.stderr)
        return 2
    fallback = [s for s in suites if "fallback" in s.source]
    for suite in fallback:
        print(f"{suite.input_type.replace('_', ' ')}: {suite.source}", file=sys.stderr)
    jobs = problem_jobs(suites, args.problems)
    stats: dict = {}
    results = pd.DataFrame(run_problems(jobs, workers=args.workers, stats=stats))
    elapsed = time.time() - start
    title = "# Table 1 on the offline mini-dcbench"
    if skipped or fallback:
        title += " — FALLBACK run without the data folder (PyPI-shipped data only; not the reported Table 1)" \
            if fallback else " — some suites not run (see below)"
    header = [
        title, "",
        f"Generated by `python -m experiments.table1 --problems {args.problems} --workers {args.workers}` "
        f"({len(jobs)} problems, {stats['cached']} of them read back from the cache of an earlier run; this "
        f"invocation {elapsed / 60:.1f} min on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at "
        "the end). Every method is fitted on each problem's validation split and "
        "scores its test split. Means over non-degenerate problems, 95% intervals from a bootstrap over distinct "
        "slices, then problems within a slice. *Italic rows: the paper's Table 1 on the real dcbench (other data, "
        "models, slices): for orientation only.*", "",
        "Suites: " + "; ".join(f"{s.name} ({s.input_type.replace('_', ' ')}): {s.source}" for s in suites) + ".",
    ]
    if skipped:
        header += ["", "## Cells not run", ""]
        header += [f"- {t.replace('_', ' ')} ({', '.join(k.replace('_', ' ') for k in KINDS)}): {why}"
                   for t, why in not_run.items()]
        header += [f"- suite {name} ({type_of.get(name, '?').replace('_', ' ')}): {why}"
                   for name, why in skipped.items() if type_of.get(name) in ran_types]
    header += ["", f"InfEmbed: `{TABLE1_INFEMBED}`, chosen on development problems only (results/ablations_grid.md)."]
    summary = write_results(results, out, header)
    print(markdown_table(summary))
    print(f"wrote {out / 'table1.md'}, table1.csv, table1_paired.csv, table1_problems.csv in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.table1", main))
