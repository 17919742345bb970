"""Glue shared by the case-study experiments: loaders over cached trunk features, cached
influence factors and embeddings, opponents per slice, and the results folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, slice_opponents
from harness.io import atomic_torch_save, atomic_write_text
from harness.paths import REPO_ROOT, cache_dir
from harness.report import save_slice_table
from harness.train import config_key


def add_config_options(parser: argparse.ArgumentParser, defaults: Any, paper_scale: dict[str, Any]) -> None:
    """One ``--option`` per field of the config dataclass ``defaults``; unset options stay None
    so :func:`resolve_config` can tell them from the presets."""
    for f in fields(defaults):
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=f"default {default}")
        else:
            parser.add_argument(flag, type=type(default) if default is not None else int, default=None,
                                help=f"default {default} (on cuda: {paper_scale.get(f.name, default)})")


def resolve_config(defaults: Any, paper_scale: dict[str, Any], args: argparse.Namespace) -> Any:
    """The offline defaults, or with ``--device cuda`` the paper-scale preset, then every
    option given explicitly."""
    config = defaults
    if (args.device or defaults.device).startswith("cuda"):
        config = replace(config, **paper_scale)
    return replace(config, **{f.name: getattr(args, f.name) for f in fields(defaults) if getattr(args, f.name) is not None})


def feature_loader(features: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool = False,
                   seed: int = 0) -> DataLoader:
    """(features, targets) batches; shuffling is seeded so training is repeatable."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(features, targets), batch_size=batch_size, shuffle=shuffle, generator=generator)


def state_key(module: torch.nn.Module) -> str:
    """A hash of a module's weights: caches of factors and embeddings follow the weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_embedder(experiment: str, head: torch.nn.Module, layers: Sequence[str], fit_loader: DataLoader,
                    key: dict[str, Any], *, arnoldi_dim: int, embedding_dim: int, seed: int, device: str,
                    chunk_size: int | None = None, progress: bool = True) -> InfluenceEmbedder:
    """An InfluenceEmbedder on ``head``, fitted on ``fit_loader`` or loaded from the factors
    cached under ``key`` (which must identify the weights and the fit data)."""
    settings = dict(arnoldi_dim=arnoldi_dim, embedding_dim=embedding_dim, seed=seed)
    path = cache_dir(experiment, "factors") / f"{config_key({**key, **settings, 'layers': list(layers)})}.pt"
    if path.is_file():
        return InfluenceEmbedder.load(path, head, device=device, chunk_size=chunk_size, progress=progress)
    embedder = InfluenceEmbedder(head, layers=list(layers), device=device, chunk_size=chunk_size, progress=progress,
                                 **settings)
    embedder.fit(fit_loader)
    embedder.save(path)
    return embedder


def cached_embeddings(experiment: str, embedder: InfluenceEmbedder, loader: DataLoader, key: dict[str, Any]) -> np.ndarray:
    """``embedder.transform(loader)``, cached under ``key`` (weights, factors and data)."""
    path = cache_dir(experiment, "embeddings") / f"{config_key(key)}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True).numpy()
    embeddings = embedder.transform(loader)
    atomic_torch_save(torch.from_numpy(embeddings), path)
    return embeddings


def opponents_per_slice(pool_embeddings: np.ndarray, embeddings: np.ndarray, members: Sequence[Sequence[int]],
                        k: int) -> list[tuple[list[int], list[float]]]:
    """For every slice, the ``k`` pool examples most harmful to its total loss and their influence."""
    out = []
    for indices in members:
        found, scores = slice_opponents(pool_embeddings, embeddings[np.asarray(indices)], k=k)
        out.append((found.tolist(), [round(float(s), 6) for s in scores]))
    return out


def errors_by_pair(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Share of all errors per (label -> prediction) pair, largest first."""
    wrong = labels != predictions
    if not wrong.any():
        return {}
    pairs = pd.Series([f"{class_names[a]} -> {class_names[b]}" for a, b in zip(labels[wrong], predictions[wrong])])
    return {name: round(float(share), 4) for name, share in pairs.value_counts(normalize=True).items()}


def results_dir(experiment: str, out: str | None) -> Path:
    path = Path(out) if out is not None else REPO_ROOT / "results" / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(out_dir: Path, slices: pd.DataFrame, summary: dict[str, Any], started: float) -> dict[str, Any]:
    """``slices.csv`` (the HTML report's slice-table contract) and ``summary.json``."""
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
