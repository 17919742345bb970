"""The real dcbench (Eyuboglu et al., 2022): slice-discovery problems through the ``dcbench`` package.

A dcbench slice-discovery problem is a trained model plus artifacts: ``val_predictions``
and ``test_predictions`` (columns ``id``, ``target``, ``probs``), ``activations`` (``id``,
``act``: the model's penultimate activations), ``clip`` (``id``, ``emb``: CLIP image
embeddings), ``test_slices`` (``id``, ``slices``: ground-truth membership) and ``model``.
:func:`run_dcbench_problem` loads one, runs

- **InfEmbed** on the trained model: per-example gradients of the model's last linear
  layer, computed from the cached activations by an ``nn.Linear`` head that holds that
  layer's weights (FactorHessian fitted on the validation split), clustered by
  :class:`~harness.baselines.KMeansSlicer`;
- **Domino** on the CLIP embeddings (as in the paper) and on the activations;
- **K-Means** on the activations and the **confusion-matrix** baseline;

fits every method on the validation split, scores the test split, and evaluates with
:mod:`harness.dcbench.metrics` (dcbench's own definitions).

Where the data comes from: dcbench's config (``DCBENCH_CONFIG`` names its YAML; its
``local_dir`` is where artifacts live, default ``~/.dcbench``). An artifact already in
``local_dir`` is used as is (a local mirror). A missing one is downloaded from the public
bucket, or from ``remote_url`` / ``INFEMBED_DCBENCH_URL`` (any HTTP server with the
bucket's layout). Downloads go to a temporary name and are moved in place only when
complete, so a failed download leaves nothing half-written. Needs the reference stack
(see :mod:`harness.compat`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from harness.baselines import ConfusionSlicer, DominoSlicer, KMeansSlicer
from harness.compat import import_dcbench, load_dcbench_model_file, load_dcbench_panel, load_dcbench_yaml
from harness.dcbench.methods import DCBENCH_INFEMBED, InfEmbedConfig, embedding_slice_scores
from harness.dcbench.metrics import slice_metrics
from harness.embed import InfluenceEmbedder
from harness.errors import InputError

REMOTE_URL_ENV = "INFEMBED_DCBENCH_URL"
TASK_ID = "slice_discovery"
PROBLEMS_PATH = f"{TASK_ID}/problems.yaml"
ARTIFACT_NAMES = ("val_predictions", "test_predictions", "test_slices", "activations", "clip", "model")
METHODS = ("infembed", "domino_clip", "domino_activations", "kmeans_activations", "confusion")
DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


class DcbenchUnavailable(InputError):
    """A dcbench file is neither in the local mirror nor downloadable (offline, wrong URL)."""


# ---------------------------------------------------------------- where files live
@contextlib.contextmanager
def _dcbench_config(local_dir: str | os.PathLike | None) -> Iterator[Any]:
    """dcbench's global config with ``local_dir`` swapped in for the duration (restored after)."""
    dcbench = import_dcbench()
    config = dcbench.config
    saved = config.local_dir
    if local_dir is not None:
        config.local_dir = str(Path(local_dir).resolve())
    try:
        yield config
    finally:
        config.local_dir = saved


def _remote_base(remote_url: str | None, config) -> str:
    return (remote_url or os.environ.get(REMOTE_URL_ENV) or config.public_remote_url).rstrip("/")


def _download(url: str, destination: Path, extract: bool, progress: bool) -> None:
    """Fetches ``url`` to ``destination`` (a .tar.gz is unpacked into it); atomic: on any
    failure nothing is left at ``destination`` nor next to it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    unpacked = None
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
            except (urllib.error.URLError, OSError) as exc:
                raise DcbenchUnavailable(
                    f"cannot download {url}: {exc}. Offline? Point DCBENCH_CONFIG at a config whose local_dir "
                    f"holds a mirror of the dcbench files, or set {REMOTE_URL_ENV} to a server that has them."
                ) from exc
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}",
                          disable=not progress, leave=False) as bar:
                    while chunk := response.read(_CHUNK):
                        handle.write(chunk)
                        bar.update(len(chunk))
        if extract:
            unpacked = tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".unpack")
            try:
                with tarfile.open(partial, "r:gz") as archive:
                    archive.extractall(unpacked, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise DcbenchUnavailable(f"{url} is not a readable .tar.gz archive: {exc}") from exc
            os.replace(unpacked, destination)
            unpacked = None
        else:
            os.replace(partial, destination)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)


def _ensure_artifact(artifact, remote_base: str, progress: bool) -> None:
    if artifact.is_downloaded:
        return
    suffix = ".tar.gz" if artifact.isdir else ""
    _download(f"{remote_base}/{artifact.path}{suffix}", Path(artifact.local_path), artifact.isdir, progress)


def _problems(config, remote_base: str, progress: bool) -> dict[str, Any]:
    local = Path(config.local_dir) / PROBLEMS_PATH
    if not local.is_file():
        _download(f"{remote_base}/{PROBLEMS_PATH}", local, extract=False, progress=progress)
    with open(local) as handle:
        containers = load_dcbench_yaml(handle)
    return {container.id: container for container in containers}


def list_problems(*, remote_url: str | None = None, local_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """The slice-discovery problems of dcbench (or of a mirror): one row per problem id with its attributes."""
    with _dcbench_config(local_dir) as config:
        problems = _problems(config, _remote_base(remote_url, config), progress)
    return pd.DataFrame.from_dict({k: dict(v.attributes) for k, v in problems.items()}, orient="index")


# ---------------------------------------------------------------- loading
@dataclass
class DcbenchProblem:
    """One problem's artifacts as arrays, rows aligned by example id.

    ``val_*`` / ``test_*``: ids (N,), targets (N,), probs (N, C), activations (N, A),
    clip (N, E); ``test_slices`` (N_test, G) 0/1; ``model`` the trained classifier (eval
    mode) and ``head`` an ``nn.Linear`` copy of its last linear layer.
    """

    problem_id: str
    attributes: dict
    val_ids: np.ndarray
    val_targets: np.ndarray
    val_probs: np.ndarray
    val_activations: np.ndarray
    val_clip: np.ndarray
    test_ids: np.ndarray
    test_targets: np.ndarray
    test_probs: np.ndarray
    test_activations: np.ndarray
    test_clip: np.ndarray
    test_slices: np.ndarray
    model: nn.Module
    head: nn.Linear = field(repr=False)

    @property
    def n_pred_slices(self) -> int:
        return int(self.attributes.get("n_pred_slices", 5))


def _column(panel, name: str, artifact: str) -> np.ndarray:
    if name not in panel.columns:
        raise InputError(f"dcbench artifact {artifact!r} has no column {name!r} (columns: {list(panel.columns)})")
    data = panel[name].data
    if torch.is_tensor(data):
        return data.detach().cpu().numpy()
    if isinstance(data, (pd.Series, pd.Index)):
        return data.to_numpy()
    return np.asarray(data)


def _align(ids: np.ndarray, source_ids: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    index = pd.Index(source_ids)
    if not index.is_unique:
        raise InputError(f"dcbench artifact {what!r} has duplicate ids")
    positions = index.get_indexer(ids)
    if (positions < 0).any():
        missing = ids[positions < 0][:3]
        raise InputError(f"dcbench artifact {what!r} lacks {int((positions < 0).sum())} of the ids, e.g. {list(missing)}")
    return values[positions]


def _load_model(artifact) -> nn.Module:
    """dcbench's ModelArtifact.load, minus its two failures today: torch >= 2.6 loads only
    weights by default (the artifact pickles its class), and the class re-downloads ImageNet
    weights when built (``pretrained``), which the saved state dict overwrites anyway."""
    try:
        saved = load_dcbench_model_file(artifact.local_path)
        config = dict(saved["config"])
        if "pretrained" in config:
            config["pretrained"] = False
        model = saved["class"](config)
        model.load_state_dict(saved["state_dict"])
    except Exception as exc:  # a corrupt or foreign file fails in many ways
        raise InputError(f"{artifact.local_path} is not a readable dcbench model artifact: {exc}") from exc
    return model.eval()


def final_linear_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (registration order): the classifier layer of dcbench's ResNets/DenseNets."""
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise InputError(f"{type(model).__name__} has no nn.Linear layer to take per-example gradients of")
    layer = linear[-1]
    head = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    head.load_state_dict(layer.state_dict())
    return head.eval()


def _pooled(activations: np.ndarray, width: int, what: str) -> np.ndarray:
    """(N, width) activations; (N, width, H, W) maps are average-pooled as the backbones do before the classifier."""
    if activations.ndim > 2 and activations.shape[1] == width:
        activations = activations.reshape(activations.shape[0], width, -1).mean(axis=2)
    if activations.ndim != 2 or activations.shape[1] != width:
        raise InputError(
            f"{what} activations have shape {activations.shape[1:]} but the model's last linear layer takes "
            f"{width} inputs: the activations artifact is not the classifier's input"
        )
    return activations.astype(np.float32)


def load_problem(problem_id: str, *, remote_url: str | None = None, local_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> DcbenchProblem:
    """Loads (downloading what is missing) one slice-discovery problem through the ``dcbench`` package."""
    with _dcbench_config(local_dir) as config:
        base = _remote_base(remote_url, config)
        problems = _problems(config, base, progress)
        if problem_id not in problems:
            raise InputError(f"no dcbench slice-discovery problem {problem_id!r} ({len(problems)} problems listed)")
        problem = problems[problem_id]
        missing = [name for name in ARTIFACT_NAMES if name not in problem.artifacts]
        if missing:
            raise InputError(f"dcbench problem {problem_id!r} lacks the artifacts {missing}")
        for name in tqdm(ARTIFACT_NAMES, desc="dcbench artifacts", disable=not progress, leave=False):
            _ensure_artifact(problem.artifacts[name], base, progress)
        panels = {name: load_dcbench_panel(problem.artifacts[name]) for name in ARTIFACT_NAMES if name != "model"}
        model = _load_model(problem.artifacts["model"])

    head = final_linear_layer(model)
    split = {}
    for part in ("val", "test"):
        predictions = panels[f"{part}_predictions"]
        ids = _column(predictions, "id", f"{part}_predictions").astype(str)
        probs = _column(predictions, "probs", f"{part}_predictions").astype(np.float64)
        activations = _align(ids, _column(panels["activations"], "id", "activations").astype(str),
                             _column(panels["activations"], "act", "activations"), "activations")
        clip = _align(ids, _column(panels["clip"], "id", "clip").astype(str),
                      _column(panels["clip"], "emb", "clip"), "clip")
        split[part] = dict(
            ids=ids,
            targets=_column(predictions, "target", f"{part}_predictions").astype(np.int64),
            probs=probs,
            activations=_pooled(activations, head.in_features, part),
            clip=clip.reshape(len(ids), -1).astype(np.float64),
        )
    slices = _align(split["test"]["ids"], _column(panels["test_slices"], "id", "test_slices").astype(str),
                    _column(panels["test_slices"], "slices", "test_slices"), "test_slices")
    return DcbenchProblem(
        problem_id=problem_id,
        attributes=dict(problem.attributes),
        **{f"{part}_{key}": value for part in split for key, value in split[part].items()},
        test_slices=slices.reshape(len(split["test"]["ids"]), -1).astype(np.int64),
        model=model,
        head=head,
    )


# ---------------------------------------------------------------- methods
def head_agreement(problem: DcbenchProblem) -> float:
    """Share of test examples whose argmax of ``head(activations)`` equals the artifact's
    predicted class: 1.0 when the activations are the classifier's input, as assumed."""
    with torch.no_grad():
        logits = problem.head(torch.as_tensor(problem.test_activations))
    return float((logits.argmax(1).numpy() == problem.test_probs.argmax(1)).mean())


def influence_embeddings(problem: DcbenchProblem, *, arnoldi_dim: int = 500, embedding_dim: int = 100,
                         seed: int = 0, batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """InfEmbed's embeddings (val, test) w.r.t. the last linear layer; FactorHessian on the validation split.

    ``arnoldi_dim`` and ``embedding_dim`` are capped at the layer's parameter count.
    """
    n_params = sum(p.numel() for p in problem.head.parameters())
    arnoldi_dim = min(arnoldi_dim, n_params)
    embedding_dim = min(embedding_dim, arnoldi_dim)

    def loader(activations: np.ndarray, targets: np.ndarray) -> DataLoader:
        data = TensorDataset(torch.as_tensor(activations), torch.as_tensor(targets))
        return DataLoader(data, batch_size=batch_size, shuffle=False)

    embedder = InfluenceEmbedder(problem.head, arnoldi_dim=arnoldi_dim, embedding_dim=embedding_dim, seed=seed,
                                 progress=progress)
    val_loader = loader(problem.val_activations, problem.val_targets)
    embedder.fit(val_loader)
    return embedder.transform(val_loader), embedder.transform(loader(problem.test_activations, problem.test_targets))


def run_dcbench_problem(
    problem_id: str,
    *,
    methods: Sequence[str] = METHODS,
    n_slices: int | None = None,
    infembed: InfEmbedConfig | None = None,
    seed: int = 0,
    remote_url: str | None = None,
    local_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Runs the methods on one dcbench problem; returns ``{method: metrics}``.

    Metrics per method (see :func:`harness.dcbench.metrics.slice_metrics`):
    ``precision_at_10``, ``precision_at_25``, ``auroc`` (dcbench's ``evaluate``),
    ``best_precision_at_10``, ``best_precision_at_25`` (the Domino paper's variant).
    ``n_slices`` defaults to the problem's ``n_pred_slices``. Methods: ``infembed``
    (last-layer influence embeddings + K-Means), ``domino_clip``, ``domino_activations``,
    ``kmeans_activations``, ``confusion``. Each is fitted on the validation split and
    scores the test split. The entry ``"_problem"`` holds the problem's attributes and
    :func:`head_agreement`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods must be a non-empty subset of {METHODS}; got {list(methods)}")
    problem = load_problem(problem_id, remote_url=remote_url, local_dir=local_dir, progress=progress)
    n_slices = problem.n_pred_slices if n_slices is None else n_slices
    config = infembed or DCBENCH_INFEMBED

    def evaluate(slicer, val_embeddings, test_embeddings) -> dict[str, float]:
        slicer.fit(val_embeddings, problem.val_targets, problem.val_probs)
        scores = slicer.predict_proba(test_embeddings, problem.test_targets, problem.test_probs)
        return slice_metrics(problem.test_slices, scores)

    results: dict[str, dict[str, Any]] = {}
    for method in tqdm(methods, desc=f"dcbench {problem_id}", disable=not progress, leave=False):
        if method == "infembed":
            val_emb, test_emb = influence_embeddings(problem, arnoldi_dim=config.arnoldi_dim,
                                                     embedding_dim=config.embedding_dim, seed=seed, progress=progress)
            scores = embedding_slice_scores(config, val_emb, problem.val_targets, problem.val_probs, test_emb,
                                            problem.test_targets, problem.test_probs, n_slices)
            results[method] = slice_metrics(problem.test_slices, scores)
        elif method == "domino_clip":
            results[method] = evaluate(DominoSlicer(n_slices, seed=seed, progress=progress),
                                       problem.val_clip, problem.test_clip)
        elif method == "domino_activations":
            results[method] = evaluate(DominoSlicer(n_slices, seed=seed, progress=progress),
                                       problem.val_activations, problem.test_activations)
        elif method == "kmeans_activations":
            results[method] = evaluate(KMeansSlicer(n_slices, seed=seed), problem.val_activations,
                                       problem.test_activations)
        else:
            results[method] = evaluate(ConfusionSlicer(n_slices), None, None)
    results["_problem"] = {**problem.attributes, "head_agreement": head_agreement(problem)}
    return results


# ---------------------------------------------------------------- writing problems
def write_problem(
    problem_id: str,
    local_dir: str | os.PathLike,
    *,
    val: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    test_slices: np.ndarray,
    activations: Mapping[str, np.ndarray],
    clip: Mapping[str, np.ndarray],
    model: nn.Module,
    attributes: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a slice-discovery problem in dcbench's on-disk format, through dcbench's own API.

    ``val`` / ``test``: ``{"id", "target", "probs"}``; ``activations``: ``{"id", "act"}``;
    ``clip``: ``{"id", "emb"}``; ``test_slices`` (N_test, G) aligned with ``test["id"]``;
    ``model`` a ``dcbench.common.modeling.Model``. The problem is appended to
    ``local_dir/slice_discovery/problems.yaml``. Returns ``local_dir``, usable as a local
    mirror (``local_dir=`` or ``DCBENCH_CONFIG``) or, after :func:`export_remote_layout`,
    from an HTTP server.
    """
    import meerkat as mk  # importable once import_dcbench() ran

    with _dcbench_config(local_dir) as config:
        dcbench = import_dcbench()
        if not isinstance(model, dcbench.common.modeling.Model):
            raise InputError("model must be a dcbench.common.modeling.Model (e.g. VisionClassifier)")

        def panel(columns: Mapping[str, Any]) -> Any:
            # dcbench stores predicted probabilities as a tensor column (its baselines call .numpy() on it).
            return mk.DataPanel(
                {k: torch.as_tensor(np.asarray(v)) if k == "probs" else np.asarray(v) for k, v in columns.items()}
            )

        artifacts = {
            "val_predictions": panel(val),
            "test_predictions": panel(test),
            "test_slices": panel({"id": test["id"], "slices": test_slices}),
            "activations": panel(activations),
            "clip": panel(clip),
            "model": model,
        }
        problem = dcbench.SliceDiscoveryProblem.from_artifacts(
            artifacts=artifacts, attributes=dict(attributes or {}), container_id=problem_id
        )
        path = Path(config.local_dir) / PROBLEMS_PATH
        existing = []
        if path.is_file():
            with open(path) as handle:
                existing = [p for p in load_dcbench_yaml(handle) if p.id != problem_id]
        dcbench.slice_discovery_task.write_problems(existing + [problem])
    return Path(local_dir)


def export_remote_layout(local_dir: str | os.PathLike, remote_dir: str | os.PathLike) -> Path:
    """Copies a local dcbench folder into the public bucket's layout (DataPanel folders as
    ``.mk.tar.gz``), ready to be served over HTTP."""
    local_dir, remote_dir = Path(local_dir), Path(remote_dir)
    for source in sorted(local_dir.rglob("*")):
        relative = source.relative_to(local_dir)
        if any(part.endswith(".mk") for part in relative.parts[:-1]):
            continue  # inside a DataPanel folder: packed with it
        target = remote_dir / relative
        if source.is_dir() and source.name.endswith(".mk"):
            target.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(f"{target}.tar.gz", "w:gz") as archive:
                archive.add(source, arcname=".")
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return remote_dir
