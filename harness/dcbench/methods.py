"""The slice-discovery methods of Table 1 and InfEmbed's one configuration object.

Every method is fitted on a problem's *validation* split (its embeddings, labels and
predicted probabilities) and scores the *test* split: ``(N_test, n_slices)`` scores,
higher = more likely a member of returned slice j (dcbench's protocol).
:class:`InfEmbedConfig` is used alike by the mini-dcbench (:mod:`harness.dcbench.runner`),
the ablations and the real-dcbench client (:mod:`harness.dcbench.client`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.baselines import KMeansSlicer
from harness.embed import InfluenceEmbedder
from harness.errors import InputError
from harness.slicing import rule_slices

N_SLICES = 5  # slices every method returns (Domino's dcbench default)
LAYERS = {"head": None, "last": ["classifier"]}
SELECTIONS = ("accuracy", "errors", "rule")
SCORINGS = KMeansSlicer.SCORINGS


@dataclass(frozen=True)
class InfEmbedConfig:
    """InfEmbed's settings (paper: P = 500, D = 100, K-Means, lowest-accuracy clusters).

    layers : "head" (every parameter of the per-problem head) or "last" (its classifier
        layer). The real-dcbench client always uses the model's last linear layer.
    arnoldi_dim : P, Arnoldi iterations (capped at the parameter count).
    embedding_dim : D, eigenpairs kept (capped at P).
    n_fit : training examples FactorHessian is fitted on (a seeded subset).
    scaled : the lambda^-1/2 whitening (False: M^T g, an ablation).
    n_clusters : K of K-Means (fitted on the validation embeddings).
    selection : "accuracy" / "errors" (the K-Means clusters of lowest accuracy / most
        errors are returned) or "rule" (InfEmbed-Rule, Algorithm 6, with
        ``rule_max_accuracy`` A and ``rule_min_size`` S; slices with most errors first).
    scoring : in-slice ranking of test examples: "distance" (minus the distance to the
        slice's centroid), "soft" or "membership" (see KMeansSlicer).
    curvature : the curvature FactorHessian factors, "hessian" (the paper) or "ggn" (an
        ablation; see InfluenceEmbedder).
    """

    layers: str = field(default="head", metadata={"help": "'head' (all head layers) or 'last' (classifier)."})
    arnoldi_dim: int = field(default=100, metadata={"help": "P: Arnoldi iterations."})
    embedding_dim: int = field(default=25, metadata={"help": "D: eigenpairs kept = embedding width."})
    n_fit: int = field(default=500, metadata={"help": "Training examples FactorHessian is fitted on."})
    scaled: bool = field(default=True, metadata={"help": "lambda^-1/2 whitening of the embeddings."})
    n_clusters: int = field(default=10, metadata={"help": "K of K-Means."})
    selection: str = field(default="accuracy", metadata={"help": "'accuracy', 'errors' or 'rule'."})
    scoring: str = field(default="distance", metadata={"help": "'distance', 'soft' or 'membership'."})
    rule_max_accuracy: float = field(default=0.5, metadata={"help": "InfEmbed-Rule's A."})
    rule_min_size: int = field(default=10, metadata={"help": "InfEmbed-Rule's S."})
    seed: int = field(default=0, metadata={"help": "Seeds the fit subset, Arnoldi and K-Means."})
    curvature: str = field(default="hessian", metadata={"help": "'hessian' (the paper) or 'ggn' (Gauss-Newton)."})

    def __post_init__(self):
        if self.layers not in LAYERS:
            raise InputError(f"layers must be one of {tuple(LAYERS)}; got {self.layers!r}")
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be one of {SELECTIONS}; got {self.selection!r}")
        if self.curvature not in ("hessian", "ggn"):
            raise InputError(f"curvature must be 'hessian' or 'ggn'; got {self.curvature!r}")
        if self.scoring not in SCORINGS:
            raise InputError(f"scoring must be one of {SCORINGS}; got {self.scoring!r}")
        for name in ("arnoldi_dim", "embedding_dim", "n_fit", "n_clusters", "rule_min_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if not 0.0 <= self.rule_max_accuracy <= 1.0:
            raise InputError(f"rule_max_accuracy must be in [0, 1]; got {self.rule_max_accuracy}")


# Chosen on development problems only (`make ablations` -> results/ablations_grid.md).
TABLE1_INFEMBED = InfEmbedConfig(embedding_dim=10, n_clusters=10, selection="accuracy")
# The real dcbench at the paper's scale, with Table 1's clustering settings.
DCBENCH_INFEMBED = InfEmbedConfig(arnoldi_dim=500, embedding_dim=100, n_clusters=TABLE1_INFEMBED.n_clusters,
                                  selection="accuracy" if TABLE1_INFEMBED.selection == "rule"
                                  else TABLE1_INFEMBED.selection, scoring=TABLE1_INFEMBED.scoring)


def _loader(features: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> DataLoader:
    return DataLoader(TensorDataset(torch.as_tensor(features, dtype=torch.float32),
                                    torch.as_tensor(labels, dtype=torch.long)), batch_size=batch_size)


def influence_embeddings(head: nn.Module, config: InfEmbedConfig, fit: tuple[np.ndarray, np.ndarray],
                         *embed: tuple[np.ndarray, np.ndarray], layers: list[str] | None = None
                         ) -> tuple[list[np.ndarray], dict]:
    """InfEmbed's embeddings of each ``embed`` (inputs, labels) pair w.r.t. the head's
    ``config.layers`` (or explicit ``layers``); FactorHessian on up to ``config.n_fit``
    examples of ``fit`` (the labels the model was trained on). Returns the embeddings
    and what Arnoldi did (``arnoldi_iterations``, ``arnoldi_breakdown``, ``n_components``,
    ``n_parameters``)."""
    inputs, labels = fit
    pick = np.sort(np.random.default_rng(config.seed).permutation(len(labels))[: config.n_fit])
    chosen = LAYERS[config.layers] if layers is None else layers
    n_params = sum(p.numel() for n, p in head.named_parameters()
                   if chosen is None or any(n.startswith(f"{layer}.") or n == layer for layer in chosen))
    arnoldi_dim = min(config.arnoldi_dim, n_params)
    # Plain Arnoldi (block size 1), the paper's FactorHessian: "auto" would take blocks of 4 at
    # P = 10 D, which span another Krylov space and so move slices, and results/ was made with it.
    # Likewise the projection results/ was made with: per-example gradients for the whole head
    # (the layer-wise projection "auto" now picks agrees to float32 round-off, not bit for bit).
    embedder = InfluenceEmbedder(head, layers=chosen, arnoldi_dim=arnoldi_dim,
                                 embedding_dim=min(config.embedding_dim, arnoldi_dim), seed=config.seed, progress=False,
                                 block_size=1, curvature=config.curvature,
                                 projection="gradients" if chosen is None else "auto")
    with warnings.catch_warnings():
        # Fewer than D positive eigenpairs is recorded in n_components, not warned about per problem.
        warnings.simplefilter("ignore", UserWarning)
        embedder.fit(_loader(inputs[pick], labels[pick]))
    out = []
    for x, y in embed:
        embeddings = embedder.transform(_loader(x, y))
        if not config.scaled:  # ablation: M^T g without the lambda^-1/2 whitening
            embeddings = embeddings * np.sqrt(embedder.eigenvalues_.numpy()).astype(np.float32)
        out.append(embeddings)
    info = {"arnoldi_iterations": embedder.arnoldi_iterations_, "arnoldi_breakdown": embedder.arnoldi_breakdown_,
            "n_components": embedder.n_components_, "n_parameters": int(n_params)}
    return out, info


def rule_scores(config: InfEmbedConfig, val_embeddings: np.ndarray, val_correct: np.ndarray,
                test_embeddings: np.ndarray, n_slices: int = N_SLICES) -> np.ndarray:
    """InfEmbed-Rule: slices found on the validation embeddings, the ``n_slices`` with most
    errors kept; test examples scored by minus the distance to each slice's centroid (a
    zero column per missing slice)."""
    slices, _ = rule_slices(val_embeddings, val_correct, config.rule_max_accuracy, config.rule_min_size,
                            seed=config.seed)
    slices = sorted(slices, key=lambda members: (-(~val_correct[members]).sum(), members[0]))[:n_slices]
    scores = np.zeros((len(test_embeddings), n_slices))
    for j, members in enumerate(slices):
        scores[:, j] = -np.linalg.norm(test_embeddings - val_embeddings[members].mean(axis=0), axis=1)
    return scores


def embedding_slice_scores(config: InfEmbedConfig, val_embeddings: np.ndarray, val_targets: np.ndarray,
                           val_probs: np.ndarray, test_embeddings: np.ndarray, test_targets: np.ndarray,
                           test_probs: np.ndarray, n_slices: int = N_SLICES) -> np.ndarray:
    """Slices of influence embeddings by ``config.selection`` (K-Means or the rule), fitted
    on the validation split, scoring the test split."""
    if config.selection == "rule":
        correct = np.asarray(val_probs).argmax(axis=1) == np.asarray(val_targets)
        return rule_scores(config, val_embeddings, correct, test_embeddings, n_slices)
    slicer = KMeansSlicer(n_slices=n_slices, n_clusters=min(config.n_clusters, len(val_targets)),
                          selection=config.selection, scoring=config.scoring, seed=config.seed)
    slicer.fit(val_embeddings, val_targets, val_probs)
    return slicer.predict_proba(test_embeddings, test_targets, test_probs)


def spotlight_slicer_class():
    """``harness.baselines.SpotlightSlicer`` when this checkout has it, else None."""
    try:
        from harness.baselines.spotlight import SpotlightSlicer
    except ImportError:
        return None
    return SpotlightSlicer
