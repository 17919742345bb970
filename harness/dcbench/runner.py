"""Runs mini-dcbench problems: pretrained trunk -> cached features -> fine-tuned head -> every method.

Per suite a trunk is pretrained once on its pool (cached under ``.cache/dcbench/trunks``),
its features of every dataset are cached, and each problem fine-tunes an
:class:`~harness.models.small.MLPHead` on the features of its manipulated training split
(seconds). Every method is fitted on the validation split and scores the test split.

:func:`run_problem` takes optional given weights (``trunk`` / ``head`` state dicts) in
place of training, so a regression can run a problem on frozen weights;
:func:`problem_weights` returns the weights a normal run trains. :func:`run_problems`
runs many problems in ``workers`` processes with a progress bar (ETA) and stores every
finished problem, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from harness.baselines import ConfusionSlicer, DominoSlicer, KMeansSlicer
from harness.cache import Cache, cached_training, config_key, content_key, state_dict_key
from harness.dcbench.methods import (
    N_SLICES,
    TABLE1_INFEMBED,
    InfEmbedConfig,
    embedding_slice_scores,
    influence_embeddings,
    spotlight_slicer_class,
)
from harness.dcbench.metrics import slice_metrics
from harness.dcbench.protocol import ProblemSpec, SliceProblem, make_problem, slice_statistics
from harness.dcbench.suites import Suite, TrunkRecipe
from harness.errors import InputError
from harness.io import atomic_torch_save, atomic_write_text
from harness.models.small import MLPHead, PretrainNet
from harness.paths import cache_dir
from harness.train import Predictions, predict, train_model

RAW_PCA_DIM = 64
# Spotlight at 200 Adam steps with learning rate 1e-2 (the authors' ImageNet rate) instead of
# domino's 1000 steps at 1e-3: 1000 steps cost more than every other method together on these
# problems, and Adam moves the centre ~lr per step, so 200 x 1e-2 still spans the head
# activations' scale (standard deviation ~0.8).
SPOTLIGHT_OPTIONS = {"num_steps": 200, "learning_rate": 1e-2}
SPOTLIGHT_SIZE = 0.02  # domino's default share of the fit data a spotlight must hold
RUNS_FORMAT = "harness.dcbench-run/1"
NOT_RUN = "(not run)"  # the method name of a problem whose splits could not be built


# ---------------------------------------------------------------- trunks and features
def _loader(inputs: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> DataLoader:
    dataset = TensorDataset(torch.as_tensor(np.asarray(inputs), dtype=torch.float32),
                            torch.as_tensor(np.asarray(labels), dtype=torch.long))
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator)


def pretrained_trunk(recipe: TrunkRecipe, state: Mapping[str, torch.Tensor] | None = None,
                     progress: bool = False) -> nn.Module:
    """The suite's trunk: pretrained on ``recipe.data`` (cached), or ``state`` loaded into it."""
    torch.manual_seed(recipe.train.seed)
    trunk = recipe.make()
    if state is not None:
        trunk.load_state_dict(state)
        return trunk.eval()
    with torch.no_grad():
        n_features = trunk.eval()(torch.as_tensor(np.asarray(recipe.data.inputs[:2], dtype=np.float32))).shape[1]
    net = PretrainNet(trunk, n_features, recipe.data.n_classes)
    loader = _loader(recipe.data.inputs, recipe.data.labels, recipe.batch_size, shuffle_seed=recipe.train.seed)
    net = cached_training(net, lambda m: train_model(m, loader, recipe.train, progress=progress), Cache("dcbench"),
                          config=recipe.key, stage="trunks")
    return net.trunk.eval()


@torch.no_grad()
def _features(trunk: nn.Module, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    trunk.eval()
    x = np.asarray(inputs, dtype=np.float32)
    return torch.cat([trunk(torch.as_tensor(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).numpy()


def suite_features(suite: Suite, trunk_state: Mapping[str, torch.Tensor] | None = None,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """{dataset name: (N, F) trunk features} of every report and dev dataset (cached by
    the trunk's weights and the examples)."""
    trunk = pretrained_trunk(suite.trunk, trunk_state, progress=progress)
    weights = state_dict_key(trunk.state_dict())
    out, by_ids = {}, {}
    for data in suite.report + suite.dev:
        ids = content_key(np.ascontiguousarray(data.example_ids))
        if ids not in by_ids:
            def compute(data=data) -> torch.Tensor:
                return torch.from_numpy(_features(trunk, data.inputs))

            # Given trunk weights (frozen fixtures) are computed from, never cached, as before.
            by_ids[ids] = (Cache("dcbench").stage("features", compute, inputs={"weights": weights, "examples": ids}).value
                           if trunk_state is None else compute()).numpy()
        out[data.name] = by_ids[ids]
    return out


def suite_raw_embeddings(suite: Suite) -> dict[str, np.ndarray]:
    """{dataset name: PCA of the raw inputs}, the PCA fitted on the pretraining pool
    (label-free, disjoint from every problem): the second task-agnostic embedding."""
    from sklearn.decomposition import PCA

    raw = suite.trunk.data.raw_features()
    pca = PCA(n_components=min(RAW_PCA_DIM, *raw.shape), random_state=0).fit(raw)
    return {d.name: pca.transform(d.raw_features()).astype(np.float32) for d in suite.report + suite.dev}


# ---------------------------------------------------------------- one problem
@dataclass
class Split:
    """What methods see of one evaluation split."""

    targets: np.ndarray
    probs: np.ndarray
    correct: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    raw: np.ndarray


@dataclass
class ProblemRun:
    """A problem with its fine-tuned head and the validation / test views of it."""

    suite: Suite
    spec: ProblemSpec
    problem: SliceProblem
    head: MLPHead
    train_features: np.ndarray
    val: Split
    test: Split
    statistics: dict


def _head_key(suite: Suite, spec: ProblemSpec, weights: str) -> dict:
    return {"trunk_weights": weights, "spec": asdict(spec), "hidden": suite.head_hidden,
            "batch_size": suite.head_batch_size, "train": asdict(suite.head_train)}


def train_head(suite: Suite, problem: SliceProblem, features: np.ndarray, key: dict | None = None) -> MLPHead:
    """An MLPHead fine-tuned on the problem's manipulated training split (cached under ``key``)."""
    data = suite.dataset(problem.spec.data)
    torch.manual_seed(suite.head_train.seed)
    head = MLPHead(features.shape[1], data.n_classes, suite.head_hidden)
    loader = _loader(features[problem.train_index], problem.train_labels, suite.head_batch_size,
                     shuffle_seed=problem.spec.seed)
    train = lambda m: train_model(m, loader, suite.head_train, progress=False)  # noqa: E731
    if key is None:
        return train(head)
    head = cached_training(head, train, Cache("dcbench"), config=key, stage="heads")
    return head


def _split(head: MLPHead, features: np.ndarray, raw: np.ndarray, index: np.ndarray, labels: np.ndarray) -> Split:
    x = features[index]
    predictions: Predictions = predict(head, _loader(x, labels, 1024), progress=False)
    with torch.no_grad():
        activations = head.penultimate(torch.as_tensor(x)).numpy()
    return Split(predictions.targets, predictions.probabilities, predictions.correct, x, activations, raw[index])


def prepare_problem(suite: Suite, spec: ProblemSpec, features: Mapping[str, np.ndarray],
                    raw: Mapping[str, np.ndarray], head_state: Mapping[str, torch.Tensor] | None = None,
                    trunk_weights: str = "given") -> ProblemRun:
    """Builds the problem, fine-tunes (or loads ``head_state`` into) its head and computes
    the validation and test views."""
    data = suite.dataset(spec.data)
    problem = make_problem(data, spec)
    x = features[data.name]
    if head_state is not None:
        head = MLPHead(x.shape[1], data.n_classes, suite.head_hidden)
        head.load_state_dict(head_state)
        head.eval()
    else:
        head = train_head(suite, problem, x, _head_key(suite, spec, trunk_weights))
    val = _split(head, x, raw[data.name], problem.val_index, problem.val_labels)
    test = _split(head, x, raw[data.name], problem.test_index, problem.test_labels)
    statistics = slice_statistics(problem, Predictions(np.log(np.maximum(test.probs, 1e-30)), test.targets))
    statistics["val_accuracy"] = float(val.correct.mean())
    return ProblemRun(suite, spec, problem, head, x[problem.train_index], val, test, statistics)


def _fit_score(slicer, run: ProblemRun, view: str | None) -> np.ndarray:
    val_x = getattr(run.val, view) if view else None
    test_x = getattr(run.test, view) if view else None
    slicer.fit(val_x, run.val.targets, run.val.probs)
    return slicer.predict_proba(test_x, run.test.targets, run.test.probs)


def infembed_embeddings(run: ProblemRun, config: InfEmbedConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Validation and test influence embeddings of the problem's head; FactorHessian on a
    subset of the training split with the labels the head was trained on."""
    (val, test), info = influence_embeddings(
        run.head, config, (run.train_features, run.problem.train_labels),
        (run.val.features, run.val.targets), (run.test.features, run.test.targets))
    return val, test, info


def infembed_scores(run: ProblemRun, config: InfEmbedConfig,
                    embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    if embeddings is None:
        embeddings = infembed_embeddings(run, config)[:2]
    val, test = embeddings
    return embedding_slice_scores(config, val, run.val.targets, run.val.probs, test, run.test.targets, run.test.probs)


def method_scores(run: ProblemRun, config: InfEmbedConfig = TABLE1_INFEMBED) -> tuple[dict[str, np.ndarray], dict]:
    """Every Table 1 method's (N_test, 5) scores on one problem, and InfEmbed's Arnoldi record."""
    from dataclasses import replace

    val_emb, test_emb, info = infembed_embeddings(run, config)
    kmeans_config = config if config.selection != "rule" else replace(config, selection="accuracy")
    rule_config = replace(config, selection="rule")
    scores = {
        "InfEmbed": infembed_scores(run, kmeans_config, (val_emb, test_emb)),
        "InfEmbed-Rule": infembed_scores(run, rule_config, (val_emb, test_emb)),
        "Domino (trunk features)": _fit_score(DominoSlicer(n_slices=N_SLICES, seed=0), run, "features"),
        "Domino (PCA of raw inputs)": _fit_score(DominoSlicer(n_slices=N_SLICES, seed=0), run, "raw"),
        "Domino (head activations)": _fit_score(DominoSlicer(n_slices=N_SLICES, seed=0), run, "activations"),
    }
    spotlight = spotlight_slicer_class()
    if spotlight is not None:
        # Where 2% of the validation set is less than one example (the smallest suites), one example's worth.
        n_val = len(run.val.targets)
        size = SPOTLIGHT_SIZE if SPOTLIGHT_SIZE * n_val >= 1 else 1.001 / n_val
        scores["Spotlight (head activations)"] = _fit_score(
            spotlight(n_slices=N_SLICES, seed=0, spotlight_size=size, **SPOTLIGHT_OPTIONS), run, "activations")
    scores["Confusion matrix"] = _fit_score(ConfusionSlicer(n_slices=N_SLICES), run, None)
    scores["K-Means (head activations)"] = _fit_score(KMeansSlicer(n_slices=N_SLICES, seed=0), run, "activations")
    return scores, info


def evaluate(run: ProblemRun, scores: Mapping[str, np.ndarray], extra: Mapping | None = None) -> list[dict]:
    """One row per method: the problem's identity and statistics and the method's metrics."""
    truth = run.problem.test_slice.astype(np.int64)
    data = run.suite.dataset(run.spec.data)
    target = (f"class {run.spec.target}, {run.spec.attribute}=0" if run.spec.kind == "correlation"
              else data.group_name(run.spec.target))
    rows = []
    for method, score in scores.items():
        rows.append({"input_type": run.suite.input_type, "suite": run.suite.name, "kind": run.spec.kind,
                     "data": run.spec.data, "seed": run.spec.seed, "slice_id": run.spec.slice_id, "target": target,
                     "method": method, **slice_metrics(truth, score), **run.statistics, **(extra or {})})
    return rows


def run_problem(suite: Suite, spec: ProblemSpec, config: InfEmbedConfig = TABLE1_INFEMBED, *,
                features: Mapping[str, np.ndarray] | None = None, raw: Mapping[str, np.ndarray] | None = None,
                weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[dict]:
    """Every method's metrics on one problem (rows as :func:`evaluate`).

    ``weights``: optional ``{"trunk": state_dict, "head": state_dict}`` used instead of
    pretraining / fine-tuning (either may be omitted), e.g. frozen weights of a regression.
    """
    weights = dict(weights or {})
    unknown = set(weights) - {"trunk", "head"}
    if unknown:
        raise InputError(f"weights takes 'trunk' and 'head' state dicts; got {sorted(unknown)}")
    if features is None or "trunk" in weights:
        features = suite_features(suite, weights.get("trunk"))
    raw = suite_raw_embeddings(suite) if raw is None else raw
    trunk_weights = "given" if "trunk" in weights else state_dict_key(pretrained_trunk(suite.trunk).state_dict())
    run = prepare_problem(suite, spec, features, raw, weights.get("head"), trunk_weights)
    scores, info = method_scores(run, config)
    return evaluate(run, scores, info)


def problem_weights(suite: Suite, spec: ProblemSpec) -> dict[str, dict[str, torch.Tensor]]:
    """The trunk and head state dicts a normal run of ``spec`` trains (for frozen fixtures)."""
    trunk = pretrained_trunk(suite.trunk)
    run = prepare_problem(suite, spec, suite_features(suite), suite_raw_embeddings(suite),
                          trunk_weights=state_dict_key(trunk.state_dict()))
    return {"trunk": trunk.state_dict(), "head": run.head.state_dict()}


# ---------------------------------------------------------------- many problems
_WORKER_STATE: dict = {}


def variant_scores(run: ProblemRun, variants: Sequence[tuple[str, InfEmbedConfig]]) -> tuple[dict[str, np.ndarray],
                                                                                             dict[str, dict]]:
    """InfEmbed's scores under every named configuration. Configurations that differ only in
    D share one FactorHessian at the largest D (the top eigenpairs come sorted, so the first
    D columns are the D-dimensional embedding)."""
    from dataclasses import replace

    embeddings: dict[tuple, tuple[np.ndarray, np.ndarray, dict]] = {}
    widest: dict[tuple, int] = {}
    key = lambda c: (c.layers, c.arnoldi_dim, c.n_fit, c.scaled, c.seed, c.curvature)  # noqa: E731
    for _, config in variants:
        widest[key(config)] = max(widest.get(key(config), 0), config.embedding_dim)
    scores, infos = {}, {}
    for name, config in variants:
        k = key(config)
        if k not in embeddings:
            embeddings[k] = infembed_embeddings(run, replace(config, embedding_dim=widest[k]))
        val, test, info = embeddings[k]
        d = min(config.embedding_dim, val.shape[1])
        scores[name] = infembed_scores(run, config, (val[:, :d], test[:, :d]))
        infos[name] = {**info, "n_components": d}
    return scores, infos


def _job_key(suite: Suite, spec: ProblemSpec, config: InfEmbedConfig, trunk_weights: str,
             variants: Sequence[tuple[str, InfEmbedConfig]] | None) -> str:
    spotlight = SPOTLIGHT_OPTIONS if spotlight_slicer_class() is not None else None
    return config_key({"format": RUNS_FORMAT, "head": _head_key(suite, spec, trunk_weights),
                       "infembed": _config_record(config), "spotlight": spotlight,
                       "variants": [(n, _config_record(c)) for n, c in variants] if variants else None})


def _config_record(config: InfEmbedConfig) -> dict:
    """The configuration in the cache key; the curvature only when not the Hessian, so that
    runs cached before the field existed keep their keys."""
    record = asdict(config)
    if record["curvature"] == "hessian":
        del record["curvature"]
    return record


def _run_job(suite_name: str, spec: ProblemSpec, config: InfEmbedConfig, path: str,
             variants: Sequence[tuple[str, InfEmbedConfig]] | None = None) -> list[dict]:
    torch.set_num_threads(1)
    state = _WORKER_STATE[suite_name]
    try:
        run = prepare_problem(state["suite"], spec, state["features"], state["raw"], trunk_weights=state["weights"])
    except InputError as exc:  # a seed whose splits cannot hold the problem: recorded, not fatal
        rows = [{"input_type": state["suite"].input_type, "suite": suite_name, "kind": spec.kind, "data": spec.data,
                 "seed": spec.seed, "slice_id": spec.slice_id, "method": NOT_RUN, "not_run": str(exc)}]
        atomic_write_text(json.dumps(rows) + "\n", path)
        return rows
    scores, info = method_scores(run, config)
    rows = evaluate(run, scores, info)
    if variants:
        v_scores, v_infos = variant_scores(run, variants)
        rows = [{**r, "method": f"reference: {r['method']}"} for r in rows if r["method"] != "InfEmbed"]
        for name, score in v_scores.items():
            rows.extend(evaluate(run, {name: score}, v_infos[name]))
    atomic_write_text(json.dumps(rows, default=float) + "\n", path)
    return rows


def run_problems(jobs: Sequence[tuple[Suite, ProblemSpec]], config: InfEmbedConfig = TABLE1_INFEMBED,
                 workers: int = 1, progress: bool = True, desc: str = "mini-dcbench problems",
                 variants: Sequence[tuple[str, InfEmbedConfig]] | None = None, stats: dict | None = None) -> list[dict]:
    """Runs every (suite, spec) job; finished problems are stored under
    ``.cache/dcbench/runs`` and read back on the next call (a killed run resumes).
    ``workers`` > 1 runs problems in that many processes (fork). With ``variants``
    (name, configuration) pairs, rows are InfEmbed under each configuration plus the other
    methods as ``reference: <method>`` (the ablations). A problem whose splits cannot be built
    (e.g. too few slice members for a validation set) gives one row with method
    :data:`NOT_RUN` and the reason in ``not_run``. ``stats``, if given, receives ``cached``:
    how many problems were read back instead of run."""
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer; got {workers!r}")
    suites = {s.name: s for s, _ in jobs}
    for name, suite in suites.items():
        if name not in _WORKER_STATE or _WORKER_STATE[name]["suite"] is not suite:
            trunk = pretrained_trunk(suite.trunk, progress=progress)
            _WORKER_STATE[name] = {"suite": suite, "features": suite_features(suite),
                                   "raw": suite_raw_embeddings(suite), "weights": state_dict_key(trunk.state_dict())}
    runs = cache_dir("dcbench", "runs")
    results: dict[int, list[dict]] = {}
    todo = []
    for i, (suite, spec) in enumerate(jobs):
        path = runs / f"{_job_key(suite, spec, config, _WORKER_STATE[suite.name]['weights'], variants)}.json"
        if path.is_file():
            results[i] = json.loads(path.read_text())
        else:
            todo.append((i, suite.name, spec, str(path)))
    if stats is not None:
        stats["cached"] = len(results)
    bar = tqdm(total=len(jobs), initial=len(results), desc=desc, disable=not progress, smoothing=0.05)
    if workers == 1 or len(todo) <= 1:
        for i, name, spec, path in todo:
            results[i] = _run_job(name, spec, config, path, variants)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_run_job, name, spec, config, path, variants): i for i, name, spec, path in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return [row for i in range(len(jobs)) for row in results[i]]


def save_weights(weights: Mapping[str, Mapping[str, torch.Tensor]], path) -> None:
    """Writes ``{"trunk": ..., "head": ...}`` state dicts (load with torch.load(weights_only=True))."""
    atomic_torch_save({k: dict(v) for k, v in weights.items()}, path)
