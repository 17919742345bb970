"""The mini-dcbench: slice-discovery problems with dcbench's protocol, and the real dcbench.

- :mod:`harness.dcbench.protocol`: :class:`LabeledData`, :class:`ProblemSpec`, :func:`make_problem`
  (manipulated training split, clean validation and test splits, split by source).
- :mod:`harness.dcbench.suites`: :class:`Suite` / :class:`TrunkRecipe` (public: build one for
  your data) and the shipped suites (MNIST or scikit-learn digits, Tiny-ImageNet, COVID-19
  X-rays, pooled ECG).
- :mod:`harness.dcbench.methods`: :class:`InfEmbedConfig` (the one InfEmbed configuration)
  and InfEmbed's slices.
- :mod:`harness.dcbench.runner`: trunk pretraining, cached features, per-problem heads,
  every method; many problems in parallel, resumable.
- :mod:`harness.dcbench.metrics`: dcbench's precision@k / AUROC and the slice-level bootstrap.
- :mod:`harness.dcbench.client`: the real dcbench through the ``dcbench`` package.
"""

from harness.dcbench.methods import TABLE1_INFEMBED, InfEmbedConfig
from harness.dcbench.protocol import KINDS, LabeledData, ProblemSpec, SliceProblem, make_problem
from harness.dcbench.runner import run_problem, run_problems
from harness.dcbench.suites import Suite, TrunkRecipe, shipped_suites

__all__ = ["KINDS", "TABLE1_INFEMBED", "InfEmbedConfig", "LabeledData", "ProblemSpec", "SliceProblem", "Suite",
           "TrunkRecipe", "make_problem", "run_problem", "run_problems", "shipped_suites"]
