"""InfEmbed's design choices on the mini-dcbench *development* problems -> results/ablations.md.

Development problems come from example pools and (sub-group, coarse class) pairs that no
reported problem uses (harness.dcbench.suites; checked by Suite.check_pools), with seeds
from 1000. Table 1's InfEmbed configuration (harness.dcbench.methods.TABLE1_INFEMBED) is
chosen here: ``--grid`` runs the D x K x selection grid -> results/ablations_grid.md.
The default run changes one setting of the base configuration per row: P (with the
Arnoldi iterations actually run and whether Arnoldi broke down), D, K, the layers theta
covers, the lambda^-1/2 scaling, the curvature (Hessian or Gauss-Newton), the selection
rule and the in-slice scoring. The other
methods are measured on the same problems for reference.

Run: ``python -m experiments.ablations [--grid] [--problems N] [--workers W]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from experiments.table1 import DEV_FIRST_SEED, RESULTS, cluster_bootstrap, problem_jobs
from harness.dcbench.methods import TABLE1_INFEMBED, InfEmbedConfig
from harness.dcbench.protocol import KINDS
from harness.dcbench.runner import NOT_RUN, run_problems
from harness.dcbench.suites import shipped_suites
from harness.errors import exit_status
from harness.io import atomic_write_text

BASE = TABLE1_INFEMBED
SHORT = {"natural_images": "natural", "medical_images": "X-ray", "medical_time_series": "time series"}
VARIANTS: list[tuple[str, InfEmbedConfig]] = [
    ("base", BASE),
    ("P = 25", replace(BASE, arnoldi_dim=25, embedding_dim=min(BASE.embedding_dim, 25))),
    ("P = 50", replace(BASE, arnoldi_dim=50)),
    ("P = 100", replace(BASE, arnoldi_dim=100)),
    ("P = 200", replace(BASE, arnoldi_dim=200)),
    ("D = 10", replace(BASE, embedding_dim=10)),
    ("D = 25", replace(BASE, embedding_dim=25)),
    ("D = 50", replace(BASE, embedding_dim=50)),
    ("K = 5", replace(BASE, n_clusters=5)),
    ("K = 10", replace(BASE, n_clusters=10)),
    ("K = 25", replace(BASE, n_clusters=25)),
    ("layers: last (classifier only)", replace(BASE, layers="last")),
    ("layers: head (both layers)", replace(BASE, layers="head")),
    ("no lambda^-1/2 scaling", replace(BASE, scaled=False)),
    ("curvature: Gauss-Newton (GGN)", replace(BASE, curvature="ggn")),
    ("selection: lowest accuracy", replace(BASE, selection="accuracy")),
    ("selection: most errors", replace(BASE, selection="errors")),
    ("selection: InfEmbed-Rule (A=0.5, S=10)", replace(BASE, selection="rule")),
    ("scoring: distance", replace(BASE, scoring="distance")),
    ("scoring: soft assignment", replace(BASE, scoring="soft")),
    ("scoring: membership", replace(BASE, scoring="membership")),
]
# The grid Table 1's configuration is picked from (by mean precision@10 over the cells).
GRID: list[tuple[str, InfEmbedConfig]] = [
    (f"D={d}, K={k}, selection={sel}", replace(BASE, embedding_dim=d, n_clusters=k, selection=sel))
    for d in (10, 25, 50) for k in (5, 10, 25) for sel in ("accuracy", "errors")
]


def ablation_table(results: pd.DataFrame, metric: str = "precision_at_10", interval: bool = False) -> str:
    usable = results[~results["degenerate"].astype(bool)]
    cells = [(t, k) for t in usable["input_type"].unique() for k in KINDS]
    header = "| Variant | " + " | ".join(f"{SHORT.get(t, t)} {k}" for t, k in cells) + " | mean |"
    lines = [header, "|---" * (len(cells) + 2) + "|"]
    for method, group in usable.groupby("method", sort=False):
        means = []
        texts = []
        for t, k in cells:
            cell = group[(group["input_type"] == t) & (group["kind"] == k)]
            mean, low, high = cluster_bootstrap(cell[metric], cell["slice_id"]) if len(cell) else (np.nan,) * 3
            means.append(mean)
            texts.append(f"{mean:.2f} [{low:.2f}, {high:.2f}]" if interval and np.isfinite(low) else f"{mean:.2f}")
        lines.append(f"| {method} | " + " | ".join(texts) + f" | {np.nanmean(means):.2f} |")
    return "\n".join(lines)


def arnoldi_table(results: pd.DataFrame) -> str:
    """Per P-variant: the parameter count, Arnoldi iterations run, breakdowns, components kept."""
    rows = results[results["method"].str.startswith("P = ") | (results["method"] == "base")]
    lines = ["| Variant | Input type | Parameters of theta | Arnoldi iterations (mean, min) | Breakdowns | "
             "Components kept (mean) |", "|---|---|---|---|---|---|"]
    for (method, input_type), g in rows.groupby(["method", "input_type"], sort=False):
        lines.append(f"| {method} | {SHORT.get(input_type, input_type)} | {int(g['n_parameters'].median())} | "
                     f"{g['arnoldi_iterations'].mean():.0f}, {int(g['arnoldi_iterations'].min())} | "
                     f"{int(g['arnoldi_breakdown'].astype(bool).sum())} of {len(g)} | {g['n_components'].mean():.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=20, help="development problems per cell (default 20)")
    parser.add_argument("--workers", type=int, default=1, help="problems run in this many processes")
    parser.add_argument("--grid", action="store_true",
                        help="instead: the selection grid (D x K x selection) -> results/ablations_grid.md")
    args = parser.parse_args(argv)
    if args.problems < 1:
        parser.error(f"--problems must be >= 1; got {args.problems}")
    torch.set_num_threads(1)  # as in experiments.table1
    start = time.time()
    suites, skipped = shipped_suites()
    jobs = problem_jobs(suites, args.problems, DEV_FIRST_SEED, split="dev")
    variants = GRID if args.grid else VARIANTS
    stats: dict = {}
    results = pd.DataFrame(run_problems(jobs, BASE, workers=args.workers, variants=variants,
                                        desc="development problems", stats=stats))
    results = results[results["method"] != NOT_RUN]
    n_problems = results.drop_duplicates(["suite", "data", "kind", "seed"]).shape[0]
    note = (f"{n_problems} development problems ({args.problems} per cell; {stats['cached']} read back from the cache "
            f"of an earlier run, this invocation {time.time() - start:.0f} s); suites "
            f"{', '.join(s.name for s in suites if s.dev)}"
            + (f"; skipped {', '.join(skipped)}" if skipped else "")
            + ". The X-ray and EEG suites have no development pool (too few examples): their settings come from these. "
            "Degenerate problems (no error inside the slice) are left out. Mean precision@10 per cell.")
    if args.grid:
        infembed = results[~results["method"].str.startswith("reference: ")]
        text = ["# Selection grid for Table 1's InfEmbed configuration (development problems)", "",
                f"Generated by `python -m experiments.ablations --grid`: {note} Other settings as `{BASE}`.", "",
                ablation_table(infembed), "", "## AUROC of the matched slice", "", ablation_table(infembed, "auroc"), ""]
        atomic_write_text("\n".join(text), RESULTS / "ablations_grid.md")
        print("\n".join(text))
        return 0
    text = [
        "# Ablations of InfEmbed on the mini-dcbench development problems", "",
        f"Generated by `python -m experiments.ablations`: {note}", "",
        f"Base configuration (Table 1's): `{BASE}`. Each row changes one setting; `reference:` rows are the other "
        "methods on the same problems. Intervals: bootstrap over distinct slices, then problems.", "",
        "## precision@10", "", ablation_table(results, interval=True), "",
        "## What Arnoldi did (theta = the head's parameters unless the row says otherwise)", "",
        arnoldi_table(results), "",
        "## AUROC of the matched slice", "", ablation_table(results, "auroc"), "",
    ]
    atomic_write_text("\n".join(text), RESULTS / "ablations.md")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.ablations", main))
