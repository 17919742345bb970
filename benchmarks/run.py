"""`make bench`: our InfluenceEmbedder against Captum's ArnoldiInfluenceFunction and
kronfluence's EK-FAC, side by side in one process, on W1-W3 (see workloads.py).

    python -m benchmarks.run [--workloads W1 W2 W3] [--device cpu|cuda] [--repeats 3]
                             [--sections main scaling linear_head] [--out results/bench]

For every workload, with the same model, data, P, D and seed, each stage timed
``--repeats`` times (median, min-max):

* ours (default): ``InfluenceEmbedder(model, layers, P, D)`` on the full model, as a user
  calls it (automatic block size, frozen prefix and projection; every exact projection
  also timed once); ours with ``frozen_prefix=False, merge_fit_batches=False`` (the loader's
  batches streamed in every pass through the whole model, as Captum does); ours with
  ``block_size=8`` forced (the
  block speed and what it costs in accuracy at this P / D); ours with ``curvature="ggn"``;
  ours (best): the frozen trunk run once, traced (linearized) HVPs on the head, the
  automatic projection; Captum (the constructor runs its Arnoldi;
  ``compute_intermediate_quantities`` embeds); kronfluence (fit_all_factors; pairwise scores);
* agreement of the N x N influence matrices with Captum's (ours with the mean Hessian
  divided by N', the documented scale) and, on W1, with the explicit-Hessian influence;
* the embedding pass over a plain forward+backward over the same layers and batches;
* the targets of issue 13, each measured value against its target;
* scaling of the best path with N and with P (one repetition each).

Captum is run with ``arnoldi_dim = P + 1`` because it discards its last Arnoldi vector:
both methods then factor the Hessian in a P-dimensional Krylov space. Our damping is
Captum's ``hessian_reg`` / N' (the same shift in mean-Hessian units).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from benchmarks.measure import Stage, agreement, combined, measure, measure_repeated
from benchmarks.report import write_report
from benchmarks.workloads import SIZES, WORKLOADS, Workload
from harness import InfluenceEmbedder, InputError
from harness.batching import move_to
from harness.fastpaths import (
    LinearHeadEmbedder,
    FastInfluenceEmbedder,
    capture_inputs,
    fixed_batches,
    tensor_batches,
)
from harness.hessian import FunctionalLoss, select_parameters
from harness.io import atomic_write_text
from harness.paths import REPO_ROOT, cache_dir

CAPTUM_HESSIAN_REG = 1e-3
# Captum stops its Arnoldi when a new direction's norm is below this *absolute* value; its
# default (0.1) ends it after a few steps on well-fit models, so use a tolerance that never
# stops it before P (ours stops only at a relative 1e-6).
CAPTUM_ARNOLDI_TOL = 1e-8
SEED = 0
# kronfluence's EK-FAC eigendecomposes one covariance per tracked layer (4608 x 4608 for
# layer4's convolutions): minutes on one CPU thread whatever N' is, too long for the CPU run.
KRONFLUENCE_SKIPPED = {"cpu": {"W2"}}
SECTIONS = ("main", "scaling", "linear_head")


def _stage_row(stage: Stage, n_units: int) -> dict[str, Any]:
    runs = stage.runs or (stage.seconds,)
    return {
        "seconds": stage.seconds, "min_seconds": min(runs), "max_seconds": max(runs), "runs": list(runs),
        "per_second": n_units / stage.seconds, "peak_mb": stage.peak_mb,
    }


# ---------------------------------------------------------------- ours
def _ours(wl: Workload, model: nn.Module, layers, task, fit_loader, transform_loader, device, damping,
          repeats: int = 1, time_projections: bool = False, **options: Any) -> dict:
    embedder = InfluenceEmbedder(
        model, layers, wl.sizes.arnoldi_dim, wl.sizes.embedding_dim, SEED, task=task, damping=damping, progress=False,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unconverged trailing pairs are measured, not hidden: see r
        fit = measure_repeated(lambda: embedder.fit(fit_loader), device, repeats)
    transform = measure_repeated(lambda: embedder.transform(transform_loader), device, repeats)
    out = {
        "embedder": embedder, "fit": fit, "transform": transform, "embeddings": transform.result,
        "block_size": embedder.block_size_, "projection": embedder.projection_mode_,
        "frozen_prefix": embedder.frozen_prefix_,
    }
    if time_projections:
        out["projection_seconds"] = _projection_seconds(embedder, transform_loader, device)
    return out


def _projection_seconds(embedder: InfluenceEmbedder, loader, device) -> dict[str, float | None]:
    """Every exact projection timed once on the same fitted embedder (None: does not apply)."""
    seconds: dict[str, float | None] = {}
    for mode in ("layerwise", "forward", "gradients"):
        embedder.projection_mode = mode
        try:
            seconds[mode] = measure(lambda: embedder.transform(loader), device).seconds
        except InputError:
            seconds[mode] = None
    embedder.projection_mode = "auto"
    return seconds


@torch.no_grad()
def _trunk_features(wl: Workload, loader: DataLoader, device: torch.device) -> TensorDataset:
    """The frozen trunk run once: a dataset of head batches (features, *rest of the batch)."""
    columns: list[list[torch.Tensor]] = []
    for raw in loader:
        raw = move_to(tuple(raw), device)
        head_batch = wl.head_batch(wl.trunk(raw), raw)
        if not columns:
            columns = [[] for _ in head_batch]
        for column, value in zip(columns, head_batch):
            column.append(value)
    return TensorDataset(*(torch.cat(c) for c in columns))


def _ours_best(wl: Workload, fit_loader, transform_loader, device, damping, repeats: int) -> dict:
    """Frozen trunk computed once, then FastInfluenceEmbedder on the selected layers: each
    fit batch's primal pass is traced once (linearized HVPs), the projection is automatic.
    Both projections are also timed once, to document the automatic choice."""
    embedder = FastInfluenceEmbedder(
        wl.head, None, wl.sizes.arnoldi_dim, wl.sizes.embedding_dim, SEED, task=wl.head_task, damping=damping,
        progress=False,
    )
    batch = wl.sizes.batch_size
    if wl.head is not wl.model:
        fit_features = measure_repeated(lambda: _trunk_features(wl, fit_loader, device), device, repeats)
        transform_features = measure_repeated(lambda: _trunk_features(wl, transform_loader, device), device, repeats)
    else:
        fit_features = Stage(0.0, 0.0, TensorDataset(*wl.fit_set[: wl.sizes.fit]))
        transform_features = Stage(0.0, 0.0, TensorDataset(*wl.transform_set[: wl.sizes.transform]))
    fit_head_batches = fixed_batches(fit_features.result, batch, device)
    head_loader = tensor_batches(transform_features.result, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit = measure_repeated(lambda: embedder.fit(fit_head_batches), device, repeats)
    transform = measure_repeated(lambda: embedder.transform(head_loader), device, repeats)
    chosen = embedder.projection_mode_
    projections = _projection_seconds(embedder, head_loader, device)
    return {
        "projection_seconds": projections,
        "projection": chosen,
        "block_size": embedder.block_size_,
        "embedder": embedder,
        "fit": combined(fit_features, fit),
        "transform": combined(transform_features, transform),
        "head_fit": fit,
        "head_transform": transform,
        "embeddings": transform.result,
        "fit_head_batches": fit_head_batches,
        "head_loader": head_loader,
    }


# ---------------------------------------------------------------- peers
def _captum(wl: Workload, model, layers, fit_loader, transform_loader, device, repeats: int = 1) -> dict:
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    checkpoint = cache_dir("bench", "captum") / f"{wl.name}.pt"
    torch.save(model.state_dict(), checkpoint)

    def fit() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ArnoldiInfluenceFunction(
                model, fit_loader, str(checkpoint), layers=layers,
                loss_fn=nn.CrossEntropyLoss(reduction="none"), hessian_dataset=fit_loader,
                projection_dim=wl.sizes.embedding_dim, seed=SEED, arnoldi_dim=wl.sizes.arnoldi_dim + 1,
                arnoldi_tol=CAPTUM_ARNOLDI_TOL, hessian_reg=CAPTUM_HESSIAN_REG,
            )

    fitted = measure_repeated(fit, device, repeats)
    transform = measure_repeated(lambda: fitted.result.compute_intermediate_quantities(transform_loader), device, repeats)
    return {"fit": fitted, "transform": transform, "embeddings": transform.result.numpy()}


def _kronfluence(wl: Workload, fit_set, transform_set, device, repeats: int = 1) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task as KronTask

    text = len(transform_set[0]) == 3
    modules = list(wl.kronfluence_modules)

    class CrossEntropyTask(KronTask):
        def _logits(self, batch, model):
            return model(batch[0], batch[1]) if text else model(batch[0])

        def compute_train_loss(self, batch, model, sample=False):
            logits = self._logits(batch, model)
            if sample:  # true Fisher: labels drawn from the model (seeded below)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            else:
                labels = batch[-1]
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return nn.functional.cross_entropy(self._logits(batch, model), batch[-1], reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

    task = CrossEntropyTask()
    model = prepare_model(copy.deepcopy(wl.model), task)  # wraps modules in place: work on a copy
    analyzer = Analyzer(
        analysis_name=f"bench_{wl.name}", model=model, task=task, cpu=device.type == "cpu",
        disable_tqdm=True, output_dir=str(cache_dir("bench", "kronfluence")),
    )
    batch = wl.sizes.batch_size
    torch.manual_seed(SEED)
    fit = measure_repeated(
        lambda: analyzer.fit_all_factors(
            "ekfac", fit_set, per_device_batch_size=batch, factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        ),
        device,
        repeats,
    )

    def scores() -> np.ndarray:
        analyzer.compute_pairwise_scores(
            "pairwise", "ekfac", transform_set, transform_set, per_device_query_batch_size=batch,
            per_device_train_batch_size=batch, overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"].float().cpu().numpy()

    transform = measure_repeated(scores, device, repeats)
    return {"fit": fit, "transform": transform, "scores": transform.result}


# ---------------------------------------------------------------- references
def _exact_influence(wl: Workload, fit_set, transform_set, damping: float) -> dict[str, np.ndarray]:
    """Explicit mean-loss Hessian over the fit set (float64): influence with its top-D
    eigenpairs (what the embeddings approximate) and with its full pseudo-inverse, in
    summed-loss units (divided by N') like Captum's."""
    from torch.func import functional_call, hessian

    model = copy.deepcopy(wl.model).double().cpu()
    selection = select_parameters(model, wl.layers)
    x_fit, y_fit = (t.double() if t.is_floating_point() else t for t in fit_set[:])
    x_test, y_test = (t.double() if t.is_floating_point() else t for t in transform_set[:])
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = selection.flatten({n: params[n] for n in selection.names})

    def mean_loss(vector: torch.Tensor) -> torch.Tensor:
        state = {**params, **selection.unflatten(vector)}
        return nn.functional.cross_entropy(functional_call(model, state, (x_fit,)), y_fit)

    matrix = hessian(mean_loss)(flat).numpy()
    loss = FunctionalLoss(model, wl.task, selection)
    grads = loss.per_example_grads(loss.params(), (x_test, y_test)).numpy()
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    top = slice(0, wl.sizes.embedding_dim)
    projected = grads @ vectors
    n_fit = len(y_fit)
    top_d = (projected[:, top] / (values[top] + damping)) @ projected[:, top].T / n_fit
    positive = values > 1e-5 * values[0]
    full = (projected[:, positive] / (values[positive] + damping)) @ projected[:, positive].T / n_fit
    return {"exact_top_d": top_d, "exact_pinv": full, "positive_eigenvalues": int(positive.sum())}


def _plain_forward_backward(model: nn.Module, task, loader: DataLoader, device: torch.device, repeats: int = 3) -> Stage:
    """A training step without the optimiser: forward + mean-loss backward per batch."""

    def run() -> None:
        for raw in loader:
            batch = move_to(task.model_batch(tuple(raw)), device)
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).mean().backward()
        model.zero_grad(set_to_none=True)

    with torch.enable_grad():
        model.eval()
        return measure_repeated(run, device, repeats)


# ---------------------------------------------------------------- one workload
def _warm_up(wl: Workload, device: torch.device) -> None:
    """One tiny fit + transform per method on one batch, so lazy imports and first-call
    set-up (functorch, Captum, kernels) are not charged to the timed stages."""
    one_batch = wl.loader(wl.fit_set, wl.sizes.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        InfluenceEmbedder(wl.model, wl.layers, 2, 1, task=wl.task, progress=False).fit(one_batch).transform(one_batch)
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        checkpoint = cache_dir("bench", "captum") / f"{wl.name}.pt"
        torch.save(wl.model.state_dict(), checkpoint)
        ArnoldiInfluenceFunction(
            wl.model, one_batch, str(checkpoint), layers=wl.layers, loss_fn=nn.CrossEntropyLoss(reduction="none"),
            projection_dim=1, arnoldi_dim=3, arnoldi_tol=CAPTUM_ARNOLDI_TOL, hessian_reg=CAPTUM_HESSIAN_REG,
        ).compute_intermediate_quantities(one_batch)


# ours: the default as a user calls it, then variants that isolate one choice each
OURS_VARIANTS = {
    "ours": {"time_projections": True},
    "ours_streamed": {"frozen_prefix": False, "merge_fit_batches": False},
    "ours_block8": {"block_size": 8},
    "ours_ggn": {"curvature": "ggn"},
}


def run_workload(name: str, device: torch.device, with_kronfluence: bool, repeats: int, sections: set[str],
                 variants: list[str] | None = None) -> dict:
    wl = WORKLOADS[name](SIZES[device.type][name], str(device))
    sizes = wl.sizes
    fit_loader = wl.loader(wl.fit_set, sizes.fit)
    transform_loader = wl.loader(wl.transform_set, sizes.transform)
    damping = CAPTUM_HESSIAN_REG / sizes.fit
    n_fit_passes = sizes.fit * sizes.arnoldi_dim
    out: dict[str, Any] = {
        "workload": name,
        "description": wl.description,
        "parameters": wl.n_parameters,
        "accuracy": wl.accuracy,
        "sizes": vars(sizes),
        "repeats": repeats,
        "methods": {},
        "agreement": {},
    }
    methods = out["methods"]
    _warm_up(wl, device)
    chosen = {m: o for m, o in OURS_VARIANTS.items() if variants is None or m in variants}
    progress = tqdm(total=len(chosen) + 4, desc=f"{name} stages", leave=False)

    results: dict[str, dict] = {}
    for method, options in chosen.items():
        results[method] = _ours(
            wl, wl.model, wl.layers, wl.task, fit_loader, transform_loader, device, damping, repeats, **options
        )
        progress.update()
    captum = results["captum"] = _captum(wl, wl.model, wl.layers, fit_loader, transform_loader, device, repeats)
    progress.update()
    results["ours_best"] = _ours_best(wl, fit_loader, transform_loader, device, damping, repeats)
    progress.update()
    if with_kronfluence and name not in KRONFLUENCE_SKIPPED.get(device.type, set()):
        results["kronfluence"] = _kronfluence(
            wl, _first(wl.fit_set, sizes.fit), _first(wl.transform_set, sizes.transform), device, repeats
        )
    progress.update()

    for method, result in results.items():
        methods[method] = {
            "fit": _stage_row(result["fit"], n_fit_passes),
            "transform": _stage_row(result["transform"], sizes.transform),
        }
        for key in ("block_size", "projection", "frozen_prefix", "projection_seconds"):
            if key in result:
                methods[method][key] = result[key]
    captum_influence = captum["embeddings"] @ captum["embeddings"].T
    influences = {
        m: r["embeddings"] @ r["embeddings"].T / sizes.fit for m, r in results.items() if m != "captum" and "embeddings" in r
    }
    influences["captum"] = captum_influence
    if "kronfluence" in results:
        influences["kronfluence"] = results["kronfluence"]["scores"]
    for method, matrix in influences.items():
        if method != "captum":
            out["agreement"][f"{method} vs captum"] = agreement(matrix, captum_influence)
    out["agreement"]["ours_best vs ours"] = agreement(influences["ours_best"], influences["ours"])
    if name == "W1":
        exact = _exact_influence(wl, _first(wl.fit_set, sizes.fit), _first(wl.transform_set, sizes.transform), damping)
        out["exact_positive_eigenvalues"] = exact["positive_eigenvalues"]
        for reference in ("exact_top_d", "exact_pinv"):
            for method, matrix in influences.items():
                out["agreement"][f"{method} vs {reference}"] = agreement(matrix, exact[reference])

    # how close the embedding pass is to a plain training step over the same layers and batches
    plain_full = _plain_forward_backward(wl.model, wl.task, transform_loader, device, repeats)
    best = results["ours_best"]
    plain_head = _plain_forward_backward(wl.head, wl.head_task, best["head_loader"], device, repeats)
    out["plain_forward_backward"] = {"full_model_seconds": plain_full.seconds, "head_seconds": plain_head.seconds}
    out["ratios"] = {
        "ours (default) transform / plain fwd_bwd (full model)": results["ours"]["transform"].seconds / plain_full.seconds,
        "ours (best) head embedding (trunk excluded) / plain head fwd_bwd": best["head_transform"].seconds / plain_head.seconds,
        "captum transform / plain fwd_bwd (full model): the ceiling of any transform speed-up that runs the model":
            captum["transform"].seconds / plain_full.seconds,
    }
    # fit cost per example-HVP in units of a plain forward+backward per example (measured on the transform
    # batches): what one Hessian-vector product costs each method, trunk included (full) or not (head)
    per_example_full = plain_full.seconds / sizes.transform
    per_example_head = plain_head.seconds / sizes.transform
    for method in ("ours", "ours_streamed", "captum"):
        if method in results:
            out["ratios"][f"{method} fit per example-HVP / plain fwd_bwd per example (full model)"] = (
                results[method]["fit"].seconds / n_fit_passes / per_example_full)
    out["ratios"]["ours (default) fit per example-HVP / plain head fwd_bwd per example"] = (
        results["ours"]["fit"].seconds / n_fit_passes / per_example_head)
    out["ours_best_projection_seconds"] = best["projection_seconds"]
    for method in results:
        if method != "captum":
            for stage in ("fit", "transform"):
                out["ratios"][f"captum / {method} {stage} time"] = captum[stage].seconds / results[method][stage].seconds
    out["targets"] = _targets(out, results)
    progress.update()

    if "scaling" in sections:
        out["scaling"] = _scaling(wl, best, device, damping)
    if "linear_head" in sections:
        out["linear_head"] = _linear_head(wl, fit_loader, transform_loader, device, damping)
    progress.update()
    progress.close()
    return out


def _targets(out: dict, results: dict) -> list[dict[str, Any]]:
    """Issue 13's targets, each with the value this run measured."""
    ratio = out["ratios"]
    r = {m: out["agreement"][f"{m} vs captum"]["pearson"] for m in ("ours", "ours_best")}
    captum_peak = max(results["captum"]["fit"].peak_mb, results["captum"]["transform"].peak_mb)
    rows = [
        ("default fit speed-up vs Captum", ratio["captum / ours fit time"], ">=", 4.0),
        ("default transform speed-up vs Captum", ratio["captum / ours transform time"], ">=", 8.0),
        ("best fit speed-up vs Captum", ratio["captum / ours_best fit time"], ">=", 8.0),
        ("best transform speed-up vs Captum", ratio["captum / ours_best transform time"], ">=", 15.0),
        ("default embedding pass / plain fwd+bwd", ratio["ours (default) transform / plain fwd_bwd (full model)"], "<=", 2.0),
        ("best embedding pass (head) / plain head fwd+bwd",
         ratio["ours (best) head embedding (trunk excluded) / plain head fwd_bwd"], "<=", 2.0),
        ("default influence r vs Captum", r["ours"], ">=", 0.999),
        ("best influence r vs Captum", r["ours_best"], ">=", 0.999),
        ("default peak MB / Captum's", max(results["ours"]["fit"].peak_mb, results["ours"]["transform"].peak_mb)
         / max(captum_peak, 1e-9), "<=", 1.0),
    ]
    return [
        {"target": name, "measured": value, "goal": f"{op} {goal:g}", "met": bool(value >= goal if op == ">=" else value <= goal)}
        for name, value, op, goal in rows
    ]


def _first(dataset: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*dataset[:n])


def _scaling(wl: Workload, best: dict, device, damping) -> dict:
    """Fit time vs P and transform time vs N of the best path (trunk time excluded)."""
    sizes = wl.sizes
    rows = {"fit_vs_P": [], "transform_vs_N": []}
    for fraction in (4, 2, 1):
        p = max(sizes.embedding_dim, sizes.arnoldi_dim // fraction)
        embedder = FastInfluenceEmbedder(
            wl.head, None, p, sizes.embedding_dim, SEED, task=wl.head_task, damping=damping, progress=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stage = measure(lambda: embedder.fit(best["fit_head_batches"]), device)
        rows["fit_vs_P"].append({"P": p, "seconds": stage.seconds, "peak_mb": stage.peak_mb})
    for fraction in (4, 2, 1):
        n = sizes.transform // fraction
        loader = tensor_batches(_first(best["head_loader"].dataset, n), sizes.batch_size)
        stage = measure(lambda: embedder.transform(loader), device)
        rows["transform_vs_N"].append({"N": n, "seconds": stage.seconds, "peak_mb": stage.peak_mb})
    return rows


def _linear_head(wl: Workload, fit_loader, transform_loader, device, damping) -> dict:
    """theta = the last nn.Linear only: the core on the full model, the closed-form
    LinearHeadEmbedder on captured head inputs, and Captum with layers=[head]."""
    sizes = wl.sizes
    head_name = wl.layers[-1]
    saved = {n: p.requires_grad for n, p in wl.model.named_parameters()}
    for n, p in wl.model.named_parameters():
        p.requires_grad_(n.startswith(f"{head_name}."))
    try:
        ours = _ours(wl, wl.model, [head_name], wl.task, fit_loader, transform_loader, device, damping)
        captum = _captum(wl, wl.model, [head_name], fit_loader, transform_loader, device)
        head = dict(wl.model.named_modules())[head_name]
        closed = LinearHeadEmbedder(
            head, sizes.arnoldi_dim, sizes.embedding_dim, SEED, damping=damping, progress=False
        )

        def cached(loader):
            return tensor_batches(
                capture_inputs(wl.model, head_name, loader, wl.task, device, progress=False), sizes.batch_size
            )

        fit_inputs = measure(lambda: cached(fit_loader), device)
        fit = measure(lambda: closed.fit(fit_inputs.result), device)
        transform_inputs = measure(lambda: cached(transform_loader), device)
        transform = measure(lambda: closed.transform(transform_inputs.result), device)
    finally:
        for n, p in wl.model.named_parameters():
            p.requires_grad_(saved[n])
    closed_fit = Stage(fit_inputs.seconds + fit.seconds, max(fit_inputs.peak_mb, fit.peak_mb))
    closed_transform = Stage(transform_inputs.seconds + transform.seconds, max(transform_inputs.peak_mb, transform.peak_mb))
    n_fit_passes = sizes.fit * sizes.arnoldi_dim
    captum_influence = captum["embeddings"] @ captum["embeddings"].T
    closed_influence = transform.result @ transform.result.T / sizes.fit
    ours_influence = ours["embeddings"] @ ours["embeddings"].T / sizes.fit
    return {
        "layer": head_name,
        "parameters": sum(p.numel() for p in dict(wl.model.named_modules())[head_name].parameters()),
        "methods": {
            name: {"fit": _stage_row(f, n_fit_passes), "transform": _stage_row(t, sizes.transform)}
            for name, (f, t) in {
                "ours": (ours["fit"], ours["transform"]),
                "ours_closed_form": (closed_fit, closed_transform),
                "captum": (captum["fit"], captum["transform"]),
            }.items()
        },
        "closed_form_without_capture": {"fit_seconds": fit.seconds, "transform_seconds": transform.seconds},
        "agreement": {
            "ours_closed_form vs captum": agreement(closed_influence, captum_influence),
            "ours vs captum": agreement(ours_influence, captum_influence),
            "ours_closed_form vs ours": agreement(closed_influence, ours_influence),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--device", default="cpu", help="'cpu' (small sizes) or 'cuda' (paper sizes)")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench"), help="folder for the JSON and README")
    parser.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence peer")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for torch (default 1: on a shared machine, more threads than free cores "
        "make small kernels many times slower for every method)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of every stage (median, min-max)")
    parser.add_argument(
        "--variants", nargs="+", default=list(OURS_VARIANTS), choices=list(OURS_VARIANTS),
        help="which configurations of ours to run (\"ours\", the default, is always run)",
    )
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
        help="main (always run), scaling (fit vs P, transform vs N), linear_head (theta = the last layer)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    with_kronfluence = not args.no_kronfluence
    if with_kronfluence:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            print("kronfluence is not installed: skipping that peer (pip install kronfluence)")
            with_kronfluence = False
    out_dir = Path(args.out)
    environment = {
        "device": str(device),
        "load_average_before": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    for name in args.workloads:
        result = run_workload(name, device, with_kronfluence, args.repeats, set(args.sections),
                              sorted(set(args.variants) | {"ours"}, key=list(OURS_VARIANTS).index))
        result["environment"] = {**environment, "load_average_after": os.getloadavg()}
        atomic_write_text(json.dumps(result, indent=2) + "\n", out_dir / f"{name}_{device.type}.json")
        print(f"{name}: done")
    write_report(out_dir)


if __name__ == "__main__":
    main()
