"""results/bench/README.md from the JSON files that benchmarks.run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from harness.io import atomic_write_text

METHOD_NAMES = {
    "ours": "ours (default: `InfluenceEmbedder(model, layers, P, D)`)",
    "ours_streamed": "ours, frozen_prefix=False, merge_fit_batches=False (loader streamed, whole model every pass)",
    "ours_block8": "ours, block_size=8 forced",
    "ours_ggn": "ours, curvature=\"ggn\"",
    "ours_best": "ours (best: trunk once + head + linearized HVPs)",
    "ours_closed_form": "ours (closed-form linear head)",
    "captum": "Captum ArnoldiInfluenceFunction",
    "kronfluence": "kronfluence EK-FAC (scores)",
}


def _seconds(stage: dict) -> str:
    if len(stage.get("runs", [])) > 1:
        return f"{stage['seconds']:.2f} ({stage['min_seconds']:.2f}-{stage['max_seconds']:.2f})"
    return f"{stage['seconds']:.2f}"


def _method_table(methods: dict, agreement: dict, sizes: dict) -> list[str]:
    captum = methods["captum"]
    lines = [
        "| method | b / projection | fit s, median (min-max) | fit example-HVPs/s | fit peak MB | transform s, median (min-max) "
        "| transform ex/s | transform peak MB | fit speed-up vs Captum | transform speed-up vs Captum | influence r vs Captum |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in methods.items():
        fit, transform = row["fit"], row["transform"]
        r = "1 (reference)" if method == "captum" else f"{agreement.get(f'{method} vs captum', {}).get('pearson', float('nan')):.5f}"
        choice = f"{row['block_size']} / {row['projection']}" if "block_size" in row else ""
        lines.append(
            f"| {METHOD_NAMES.get(method, method)} | {choice} | {_seconds(fit)} | {fit['per_second']:.0f} | {fit['peak_mb']:.0f} "
            f"| {_seconds(transform)} | {transform['per_second']:.1f} | {transform['peak_mb']:.0f} "
            f"| {captum['fit']['seconds'] / fit['seconds']:.2f}x | {captum['transform']['seconds'] / transform['seconds']:.2f}x | {r} |"
        )
    return lines


def _section(result: dict) -> list[str]:
    sizes = result["sizes"]
    env = result["environment"]
    lines = [
        f"## {result['workload']}: {result['description']}",
        "",
        f"{result['parameters']:,} parameters in theta; test accuracy {result['accuracy']:.3f}; "
        f"N' = {sizes['fit']} (Hessian), N = {sizes['transform']} (embedded), P = {sizes['arnoldi_dim']}, "
        f"D = {sizes['embedding_dim']}, batch {sizes['batch_size']}; device {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else f", {env['threads']} threads") + ".",
        "",
    ]
    lines += _method_table(result["methods"], result["agreement"], sizes)
    lines += ["", "| agreement of influence matrices (N x N) | Pearson r | scale |", "|---|---|---|"]
    for pair, value in result["agreement"].items():
        lines.append(f"| {pair} | {value['pearson']:.4f} | {value['scale']:.3f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for name, value in result["ratios"].items():
        lines.append(f"| {name} | {value:.2f} |")
    lines += ["", "| issue 13 target | measured | goal | met |", "|---|---|---|---|"]
    for row in result.get("targets", []):
        lines.append(f"| {row['target']} | {row['measured']:.4g} | {row['goal']} | {'yes' if row['met'] else 'no'} |")
    lines += [""]
    for method, where in (("ours", "the full model"), ("ours_best", "the head")):
        row = result["methods"][method]
        seconds = row.get("projection_seconds") or (result.get("ours_best_projection_seconds") if method == "ours_best" else None)
        if seconds:
            timed = "; ".join(f"{mode}: {'n/a' if s is None else f'{s:.2f} s'}" for mode, s in seconds.items())
            lines.append(f"{METHOD_NAMES[method]}, transform of {where} by each exact projection, once: {timed} "
                         f"(automatic choice: {row['projection']}).")
    prefix = result["methods"]["ours"].get("frozen_prefix")
    if prefix is not None:
        lines.append(f"Frozen prefix replayed by the default fit: {', '.join(prefix) if prefix else 'none'}.")
    scaling = result.get("scaling")
    if scaling:
        lines += [
            "",
            "Scaling of ours (best), trunk time excluded, one repetition: "
            + ", ".join(f"P={r['P']}: {r['seconds']:.2f} s" for r in scaling["fit_vs_P"])
            + " (fit); "
            + ", ".join(f"N={r['N']}: {r['seconds']:.2f} s" for r in scaling["transform_vs_N"])
            + " (transform).",
        ]
    if "linear_head" not in result:
        return lines + [""]
    head = result["linear_head"]
    lines += [
        "",
        f"theta = the last linear layer only (`{head['layer']}`, {head['parameters']:,} parameters):",
        "",
    ]
    lines += _method_table(head["methods"], head["agreement"], sizes)
    lines += [
        "",
        f"Closed form without the activation capture: fit {head['closed_form_without_capture']['fit_seconds']:.3f} s, "
        f"transform {head['closed_form_without_capture']['transform_seconds']:.3f} s. "
        f"Closed form vs the core: r = {head['agreement']['ours_closed_form vs ours']['pearson']:.6f}.",
        "",
    ]
    return lines


def write_report(out_dir: Path) -> Path:
    results = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("W*_*.json"))]
    env = results[0]["environment"] if results else {}
    lines = [
        "# Benchmark: influence embeddings vs Captum and kronfluence",
        "",
        "Generated by `make bench` (`python -m benchmarks.run`); do not edit by hand. One process per run, "
        "every method on the same model, data, P, D and seed; every stage timed several times (median, min-max). "
        "Read ratios rather than absolute seconds.",
        "",
        f"Machine: {env.get('cpu_count')} CPUs, load average (1, 5, 15 min) {_load(env.get('load_average_before'))} "
        f"before and {_load(results[-1]['environment'].get('load_average_after')) if results else '?'} after the run"
        + (" -- the machine was shared, so absolute times are inflated and noisier than on a quiet one."
           if env.get("load_average_before") and env["load_average_before"][0] > 1.5 * env.get("threads", 1) else "."),
        "",
        "* fit = FactorHessian (ours), the constructor (Captum, `arnoldi_dim = P + 1` because it discards its last "
        "Arnoldi vector), `fit_all_factors` (kronfluence). transform = embedding the N examples "
        "(`compute_intermediate_quantities` for Captum); for kronfluence, its N x N pairwise scores.",
        "* example-HVPs/s = N' x P / fit seconds; peak MB = peak memory above the stage's start (CPU: sampled RSS; "
        "CUDA: peak allocated). b = the Krylov block size, projection = the transform's exact path "
        "(both chosen automatically unless the row says otherwise).",
        "* Influence agreement: Pearson r over the upper triangle of the N x N influence matrices; ours use the "
        "Hessian of the mean loss, so they are divided by N' (scale = least-squares factor onto the reference, "
        "1 = same units). Our damping equals Captum's hessian_reg / N'. The two Arnoldi runs start from different "
        "random vectors.",
        "* ours (best): the frozen layers run once per example (trunk time included); each fit batch's primal pass is "
        "traced once (torch.func.linearize) and the P HVPs run only the tangent computation (trace time included). "
        "On W1 there is no trunk: the whole MLP is the head.",
        "* ours (default) runs the frozen modules before theta once per fit batch and replays their outputs in the P "
        "passes (`frozen_prefix`, checked exact on the first batch) and merges the fit batches into larger ones "
        "(`merge_fit_batches`); with both off the loader is streamed through the whole model every pass, as Captum "
        "does. Its transform contracts each selected layer's inputs and output gradients with the "
        "projection (`projection=\"layerwise\"`) where theta is made of Linear/Conv/LayerNorm/BatchNorm layers.",
        "* block_size=8 forced: the speed of 8 tangents per pass, and (r) what a block space of the same P costs in "
        "accuracy when P is only a few times D; the default uses blocks only for P >= 6 D "
        "(b <= P / (2 D) - 1, measured against explicit Hessians in tests/test_block_krylov.py).",
        "",
    ]
    for result in results:
        lines += _section(result)
    path = Path(out_dir) / "README.md"
    atomic_write_text("\n".join(lines), path)
    return path


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "?"
