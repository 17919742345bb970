"""The one pipeline of the case studies: a study supplies its data, its trunk/head model and
its configuration; this module runs the cached stages, slices, finds opponents, computes
coverage and writes the results folder.

A study describes itself as a :class:`Study`:

- ``sources``: the example sets the trunk runs on (:class:`Source`: a loader of
  ``(inputs, targets)`` batches and a content key), e.g. ``{"train": ..., "test": ...}``;
- the parts of them that play each role (:class:`Part`: a source and positions in it):
  ``analysed`` (clustered into slices), ``fit`` (FactorHessian is fitted on it; the
  model's training data) and ``pool`` (where opponents are searched; optional);
- ``model``: a :class:`harness.models.TrunkHead`; ``training`` (optional,
  :class:`Training`): how to train it, on input batches (the whole model) or on trunk
  features (the head only, when the trunk is frozen);
- ``factors``: the :class:`harness.FactorConfig` of the embedder.

:func:`embed` runs the stages, each cached by :class:`harness.cache.Cache` under a key
derived from its inputs' keys and its configuration::

    trained weights -> trunk features (per source) -> [trained head] -> predictions
        -> factors (fit part) -> embeddings (analysed part, pool part)

and returns an :class:`Embedded`, whose methods slice (K-Means or InfEmbed-Rule),
summarise, attach opponents and compute the coverage metrics the studies report. What is
a study's own (its data, model, tables, figures) stays in its module; the command line of
every study is built by :func:`study_parser` / :func:`study_config` from its
configuration dataclass (help in the fields' metadata), with the paper-scale preset that
``--device cuda`` (or ``--paper-scale``) selects.

Under ``torchrun --nproc-per-node N -m experiments.<study>`` the factors and embeddings
are computed data-parallel (:mod:`harness.distributed`: each rank fits and embeds its
shard of the fit and analysed parts); every rank ends with the same embeddings, and only
rank 0 (``Embedded.writes_results``) writes the results folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import FactorConfig, InfluenceEmbedder, distributed
from harness.cache import Cache, Keyed, content_key, weights_key
from harness.embed import FACTORS_FORMAT
from harness.errors import InputError
from harness.io import atomic_write_text
from harness.models import TrunkHead, compute_features
from harness.options import add_config_options, config_from_args
from harness.paths import REPO_ROOT
from harness.report import save_slice_table
from harness.slicing import RuleNode, kmeans_slices, opponents_per_slice, rule_slices, summarize_slices
from harness.train import Predictions, TrainConfig, predict, train_model


# ---------------------------------------------------------------- what a study supplies
@dataclass
class Source:
    """Examples the trunk runs on: ``loader`` yields their ``(inputs, targets)`` batches (or
    dicts with ``labels``), in source order or, if given, in the order ``order`` (source
    positions, e.g. texts sorted by length); ``key`` identifies their content."""

    loader: Iterable
    key: str
    order: np.ndarray | None = None


@dataclass
class Part:
    """The examples of ``source`` at ``positions`` (sorted or not; ``None``: all of them)."""

    source: str
    positions: np.ndarray | None = None

    def key(self) -> str:
        return content_key(self.source, None if self.positions is None else np.asarray(self.positions, dtype=np.int64))


@dataclass
class Training:
    """How the study's model is trained (the result is cached).

    Either ``loader`` (input batches; trains the whole model; ``data_key`` identifies its
    examples, ``settings`` anything else that shapes training, e.g. the batch size), or
    ``on_features`` (trains only the head, on the trunk features of that part, in
    shuffled batches of ``batch_size`` seeded by the training seed). ``on_epoch`` is passed
    to :func:`harness.train.train_model` when training runs (not on a cache hit) and is no
    part of the key, e.g. to record a learning curve."""

    config: TrainConfig
    loader: Iterable | None = None
    data_key: str | None = None
    on_features: Part | None = None
    batch_size: int = 64
    settings: Mapping[str, Any] = field(default_factory=dict)
    on_epoch: Callable[[int, nn.Module, float], None] | None = None


@dataclass
class Study:
    """Everything the pipeline needs from a case study (see the module docstring)."""

    name: str
    model: TrunkHead
    sources: dict[str, Source]
    analysed: Part
    fit: Part
    class_names: Sequence[str]
    factors: FactorConfig
    pool: Part | None = None
    training: Training | None = None
    batch_size: int = 64
    chunk_size: int | None = None
    device: str = "cpu"
    n_nearest: int = 4


def feature_loader(features: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool = False,
                   seed: int = 0) -> DataLoader:
    """(features, targets) batches; shuffling is seeded so training is repeatable."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(features, targets), batch_size=batch_size, shuffle=shuffle, generator=generator)


# ---------------------------------------------------------------- the cached stages
@dataclass
class Embedded:
    """The stages' results: predictions and embeddings of the analysed part, embeddings of
    the opponent pool, the fitted embedder, and every stage's cache key."""

    study: Study
    predictions: Predictions
    embeddings: np.ndarray
    pool_embeddings: np.ndarray | None
    embedder: InfluenceEmbedder
    keys: dict[str, str]
    fit_size: int

    @property
    def writes_results(self) -> bool:
        """Whether this process writes the results: every rank of a torchrun job holds the
        same embeddings, and rank 0 writes them."""
        return distributed.rank() == 0

    @property
    def labels(self) -> np.ndarray:
        return self.predictions.targets

    @property
    def predicted(self) -> np.ndarray:
        return self.predictions.predicted

    def kmeans(self, n_slices: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
        """InfEmbed: (slice id of every analysed example, the summary of every cluster)."""
        ids, _ = kmeans_slices(self.embeddings, n_slices, seed)
        return ids, self.summarize(ids)

    def rule(self, max_accuracy: float, min_size: int, branching: int, max_depth: int,
             seed: int) -> tuple[list[np.ndarray], RuleNode, pd.DataFrame | None]:
        """InfEmbed-Rule: (slices, region tree, their summary or None when none is found)."""
        slices, tree = rule_slices(self.embeddings, self.predictions.correct, max_accuracy, min_size, branching,
                                   max_depth, seed)
        return slices, tree, self.summarize(slices) if slices else None

    def summarize(self, slices: np.ndarray | Sequence[np.ndarray]) -> pd.DataFrame:
        return summarize_slices(slices, self.embeddings, self.labels, self.predicted, self.study.n_nearest,
                                self.study.class_names)

    def opponents(self, frame: pd.DataFrame, k: int) -> list[tuple[list[int], list[float]]]:
        """The ``k`` strongest opponents of every slice of ``frame``: (positions in the pool
        part, influence scores)."""
        if self.pool_embeddings is None:
            raise InputError(f"study {self.study.name!r} has no opponent pool")
        return opponents_per_slice(self.pool_embeddings, self.embeddings, frame["members"], k)

    def coverage(self, frame: pd.DataFrame | None) -> dict[str, Any]:
        """How much of the analysed data and its errors the slices of ``frame`` cover."""
        correct = self.predictions.correct
        in_slices = np.zeros(len(correct), dtype=bool)
        for members in ([] if frame is None else frame["members"]):
            in_slices[np.asarray(members, dtype=np.int64)] = True
        n_errors = int((~correct).sum())
        covered = int((in_slices & ~correct).sum())
        return {
            "analysed_examples": int(len(correct)),
            "test_accuracy": round(self.predictions.accuracy, 4),
            "n_errors": n_errors,
            "n_slices": 0 if frame is None else int(len(frame)),
            "slice_examples": int(in_slices.sum()),
            "slice_accuracy": round(float(correct[in_slices].mean()), 4) if in_slices.any() else None,
            "errors_covered": covered,
            "share_of_errors_covered": round(covered / n_errors, 4) if n_errors else None,
        }


def embed(study: Study, progress: bool = True) -> Embedded:
    """Runs (or loads from the cache) every stage of ``study``; see the module docstring."""
    for role, part in (("analysed", study.analysed), ("fit", study.fit), ("pool", study.pool)):
        if part is not None and part.source not in study.sources:
            raise InputError(f"the {role} part names source {part.source!r}; the study has {sorted(study.sources)}")
    cache, split, device, training = Cache(study.name), study.model, study.device, study.training
    # Under torchrun every rank trains and runs the trunk alike (or loads them from the cache), then
    # fits and embeds its own contiguous shard; HVPs are summed and embeddings gathered in order.
    distributed.init_from_env()
    world = distributed.world_size()

    def shard_loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
        examples = TensorDataset(x, y)
        return DataLoader(distributed.shard(examples) if world > 1 else examples, batch_size=study.batch_size)

    # Weights: the whole model, trained on input batches (or as given).
    if training is not None and training.loader is not None:
        if not training.data_key:
            raise InputError("Training.loader needs a data_key naming its examples (the cache key follows them)")
        model = cache.trained(split.model, lambda m: train_model(m, training.loader, training.config,
                                                                 progress=progress, on_epoch=training.on_epoch),
                              inputs={"data": training.data_key},
                              config={"train": asdict(training.config), **training.settings})
        weights = model.key
    else:
        weights = weights_key(split.model)
    split.model.to(device)

    # Trunk features of every source, in source order.
    features: dict[str, Keyed[dict[str, torch.Tensor]]] = {}
    for name, source in study.sources.items():
        def compute(source: Source = source, name: str = name) -> dict[str, torch.Tensor]:
            x, y = compute_features(split.trunk, source.loader, split.model, device, progress,
                                    f"trunk features ({name})")
            if source.order is not None:
                back = np.argsort(np.asarray(source.order))
                x, y = x[back], y[back]
            return {"features": x, "targets": y}

        features[name] = cache.stage("features", compute, inputs={"weights": weights, "data": source.key},
                                     config={"head_layers": list(split.head_layers)})

    def part_tensors(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        stored = features[part.source].value
        if part.positions is None:
            return stored["features"], stored["targets"]
        rows = torch.as_tensor(np.asarray(part.positions, dtype=np.int64))
        return stored["features"][rows], stored["targets"][rows]

    # The head alone, trained on trunk features (a frozen trunk).
    if training is not None and training.on_features is not None:
        x, y = part_tensors(training.on_features)
        loader = feature_loader(x, y, training.batch_size, shuffle=True, seed=training.config.seed)
        cache.trained(split.head, lambda h: train_model(h, loader, training.config, progress=progress,
                                                       on_epoch=training.on_epoch),
                      inputs={"features": features[training.on_features.source],
                              "rows": training.on_features.key()},
                      config={"train": asdict(training.config), "batch_size": training.batch_size,
                              **training.settings}, stage="heads")
        split.head.to(device)
    head = weights_key(split.head)

    analysed_loader = feature_loader(*part_tensors(study.analysed), study.batch_size)
    predictions = predict(split.head, analysed_loader, device=device, progress=progress)

    # FactorHessian on the fit part.
    def fit() -> InfluenceEmbedder:
        embedder = InfluenceEmbedder(split.head, layers=list(split.head_layers), device=device,
                                     chunk_size=study.chunk_size, progress=progress, **asdict(study.factors))
        return embedder.fit(shard_loader(*part_tensors(study.fit)))

    factors = cache.stage(
        "factors", fit, inputs={"head": head, "features": features[study.fit.source], "rows": study.fit.key()},
        config={"factors": asdict(study.factors), "layers": list(split.head_layers), "batch_size": study.batch_size,
                "world_size": world},
        version=FACTORS_FORMAT, save=lambda embedder, path: embedder.save(path),
        load=lambda path: InfluenceEmbedder.load(path, split.head, device=device, chunk_size=study.chunk_size,
                                                 progress=progress),
    )
    embedder = factors.value

    def embeddings_of(part: Part) -> Keyed:
        return cache.stage(
            "embeddings", lambda: torch.from_numpy(embedder.transform(shard_loader(*part_tensors(part)))),
            inputs={"factors": factors, "features": features[part.source], "rows": part.key()},
            config={"batch_size": study.batch_size, "world_size": world},
        )

    analysed = embeddings_of(study.analysed)
    pool = None
    if study.pool is not None:
        pool = analysed if study.pool.key() == study.analysed.key() else embeddings_of(study.pool)
    return Embedded(
        study=study, predictions=predictions, embeddings=analysed.value.numpy(),
        pool_embeddings=None if pool is None else pool.value.numpy(), embedder=embedder,
        keys={"weights": weights, "head": head, "factors": factors.key, "embeddings": analysed.key,
              **({"pool_embeddings": pool.key} if pool is not None else {}),
              **{f"features_{name}": keyed.key for name, keyed in features.items()}},
        fit_size=int(part_tensors(study.fit)[1].shape[0]),
    )


# ---------------------------------------------------------------- results
def errors_by_pair(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Share of all errors per (label -> prediction) pair, largest first."""
    wrong = labels != predictions
    if not wrong.any():
        return {}
    pairs = pd.Series([f"{class_names[a]} -> {class_names[b]}" for a, b in zip(labels[wrong], predictions[wrong])])
    return {name: round(float(share), 4) for name, share in pairs.value_counts(normalize=True).items()}


def results_dir(experiment: str, out: str | None) -> Path:
    """``out``, or ``results/<experiment>``; created."""
    path = Path(out) if out is not None else REPO_ROOT / "results" / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(out_dir: Path, slices: pd.DataFrame, summary: dict[str, Any], started: float) -> dict[str, Any]:
    """``slices.csv`` (the HTML report's slice-table contract) and ``summary.json`` (with the
    run time and the environment)."""
    save_slice_table(slices, out_dir / "slices.csv")
    summary = {**summary, "runtime_s": round(time.time() - started, 1),
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "threads": torch.get_num_threads()}}
    atomic_write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", out_dir / "summary.json")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# ---------------------------------------------------------------- command line
def study_parser(config_type: type, doc: str, prog: str, paper_scale: Mapping[str, Any]) -> argparse.ArgumentParser:
    """``--out``, ``--quiet``, ``--paper-scale`` and one option per field of ``config_type``
    (help from the fields' metadata; the paper-scale value shown where it differs).
    ``doc`` is the study's module docstring (its first paragraph describes the program)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], prog=prog)
    parser.add_argument("--out", default=None, help=f"results folder (default: results/{prog.split('.')[-1]})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--paper-scale", action=argparse.BooleanOptionalAction, default=None,
                        help="the paper-scale preset (default: on with --device cuda); explicit options override it")
    add_config_options(parser.add_argument_group("configuration"), config_type, presets={"paper scale": paper_scale})
    return parser


def study_config(config_type: type, paper_scale: Mapping[str, Any], args: argparse.Namespace) -> Any:
    """The defaults, or the paper-scale preset (``--paper-scale``, or by default on a CUDA
    device), then every option given explicitly."""
    defaults = config_type()
    device = getattr(args, "device", getattr(defaults, "device", "cpu"))
    paper = args.paper_scale if args.paper_scale is not None else str(device).startswith("cuda")
    return config_from_args(defaults, args, paper_scale if paper else None)
