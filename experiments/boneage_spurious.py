"""Spurious signals in bone-age X-rays (paper, section 4.4 and appendix G; Figures 4-5).

Protocol: one signal (hospital tag, stripe or blur; :mod:`harness.data.spurious`) is
injected into every *training* image of one class (the paper's "mid-puberty"); the test
set is untouched. A model is trained on the manipulated training set, InfEmbed-Rule
(accuracy <= A, size >= S) runs on the test set, and for the lowest-accuracy slice we
report the share of its labels that are the injected class and the share of its top-50
opponents (training examples) that carry the signal. Paper: for every signal the slice
is mostly "mid-puberty" and about 80% of its opponents carry the signal.

**Offline default = a stand-in.** The RSNA bone-age images are not available here, so
by default the same protocol runs on the real chest X-rays of the shared
``covid-chestxray`` folder, grouped into 5 equal-sized age groups from ``metadata.csv``;
the middle group plays "mid-puberty". Patients never span the train/test split. With
the RSNA data (``--boneage-train-csv`` ... in the Kaggle layout) the paper's 5 age groups
are used instead.

Model: the paper's appendix-G "small DNN" (conv-ReLU-BatchNorm-max-pool blocks with 5x5
stride-1 kernels, then two fully connected layers), trained here from scratch on
64 x 64 images so that all signals fit in a few CPU minutes; ``--model resnet50`` trains
a torchvision ResNet-50 instead (the paper's model). The influence embeddings
differentiate the two fully connected layers (ResNet-50: ``fc``), on cached trunk
features.

The paper's test set has 200 images and S = 25; with a smaller test set S is scaled by
n_test / 200 (reported). A = 0.4 is kept unless the model's accuracy on the untouched
test set of the *other* classes is below it; then every region would satisfy the rule,
so A is lowered to half that accuracy (reported as ``max_accuracy_used``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from harness import rule_slices, slice_opponents, slice_proponents, summarize_slices
from harness.data.boneage import AGE_GROUPS, MID_PUBERTY, load_boneage
from harness.data.covid import age_group_table, load_grayscale, patient_split
from harness.data.spurious import INJECTIONS, figure_injections, inject_class
from harness.errors import InputError
from harness.models import compute_features
from harness.models.small import SmallCNN
from harness.models.vision import GreyResNet, split_resnet
from harness.paths import cache_dir
from harness.report.figures import draw_distributions
from harness.train import TrainConfig, cached_training, config_key, predict, train_model
from experiments.common import (
    cached_embedder,
    cached_embeddings,
    feature_loader,
    results_dir,
    state_key,
    write_results,
)

EXPERIMENT = "boneage_spurious"
CONTROL = "none"
PAPER_TEST_SIZE = 200
PAPER = {
    "data": "RSNA Pediatric Bone Age (12,282 train / 200 test images, 299 x 299), 5 age groups",
    "model": "ResNet-50 trained on the manipulated training set",
    "max_accuracy": 0.4,
    "min_size": 25,
    "slices_returned_per_signal": 2,
    "lowest_slice_labels": "mostly 'mid-puberty' for every signal (Figure 5, read off the plot)",
    "opponents_with_signal": "about 0.8 of the top-50 opponents, for every signal",
}
STAND_IN = (
    "STAND-IN: the RSNA bone-age images are not available offline; these results use real chest X-rays "
    "(shared covid-chestxray folder) grouped into 5 age groups from metadata.csv, the middle group playing "
    "'mid-puberty'. They test the protocol, not the paper's bone-age numbers."
)


@dataclass
class BoneAgeConfig:
    signals: str = "none,tag,stripe,blur"
    model: str = "small_cnn"
    image_size: int = 64
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    test_fraction: float = 0.25
    max_accuracy: float = 0.4
    min_size: int = 25
    branching: int = 3
    max_depth: int = 10
    arnoldi_dim: int = 200
    embedding_dim: int = 100
    n_opponents: int = 50
    subset: int | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class XrayData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    injected_class: int
    source: str
    key: str


def stand_in_data(config: BoneAgeConfig, root: str | None = None, progress: bool = True) -> XrayData:
    """Chest X-rays in 5 age groups, split by patient; the middle group is the injected class."""
    table, names = age_group_table(root)
    if config.subset is not None:
        if config.subset < 20:
            raise InputError(f"subset must be >= 20 images; got {config.subset}")
        keep = np.random.default_rng(config.seed).permutation(len(table))[: config.subset]
        table = table.iloc[np.sort(keep)].reset_index(drop=True)
    images = load_grayscale(table["path"].tolist(), config.image_size, progress=progress)
    labels = torch.tensor(table["label"].to_numpy())
    train, test = patient_split(table["patientid"].to_numpy(), config.test_fraction, config.seed)
    return XrayData(
        images[train], labels[train], images[test], labels[test], names, len(names) // 2,
        source="stand-in: covid-chestxray age groups",
        key=config_key({"paths": table["path"].tolist(), "size": config.image_size, "split": test.tolist()}),
    )


def rsna_data(config: BoneAgeConfig, train_csv: str, train_images: str, test_csv: str, test_images: str,
              progress: bool = True) -> XrayData:
    """The RSNA bone-age data in its public layout (one CSV + image folder per split)."""
    x_train, y_train = load_boneage(train_csv, train_images, config.image_size, progress)
    x_test, y_test = load_boneage(test_csv, test_images, config.image_size, progress)
    return XrayData(
        x_train, y_train, x_test, y_test, list(AGE_GROUPS), MID_PUBERTY, source="RSNA Pediatric Bone Age",
        key=config_key({"csv": [str(Path(train_csv).resolve()), str(Path(test_csv).resolve())],
                        "size": config.image_size}),
    )


def _signals(config: BoneAgeConfig) -> list[str]:
    names = [s.strip() for s in config.signals.split(",") if s.strip()]
    unknown = [s for s in names if s != CONTROL and s not in INJECTIONS]
    if not names or unknown:
        raise InputError(f"signals must be a comma list of {CONTROL!r}, {', '.join(INJECTIONS)}; got {config.signals!r}")
    return names


def _build(config: BoneAgeConfig, n_classes: int) -> tuple[nn.Module, nn.Module, nn.Module, list[str]]:
    """(model, trunk, head, head layer names) with a seeded initialisation."""
    torch.manual_seed(config.seed)
    if config.model == "small_cnn":
        model = SmallCNN(n_classes, config.image_size)
        return model, model.trunk, model.head, ["fc1", "fc2"]
    if config.model == "resnet50":
        model = GreyResNet(n_classes)
        split = split_resnet(model.net, head_layers=("fc",))
        return model, lambda x: split.trunk(x.expand(-1, 3, -1, -1)), split.head, list(split.head_layers)
    raise InputError(f"model must be 'small_cnn' or 'resnet50'; got {config.model!r}")


def _distribution(labels: np.ndarray, names: list[str]) -> dict[str, float]:
    counts = np.bincount(labels, minlength=len(names)) / max(1, len(labels))
    return {names[c]: round(float(counts[c]), 4) for c in np.argsort(-counts, kind="stable") if counts[c] > 0}


def run_signal(signal: str, data: XrayData, config: BoneAgeConfig, progress: bool = True) -> dict:
    """Inject, train, embed, InfEmbed-Rule and opponents for one signal (``none`` = clean control)."""
    n_classes = len(data.class_names)
    train_images = data.train_images if signal == CONTROL else inject_class(
        data.train_images, data.train_labels, data.injected_class, INJECTIONS[signal])
    model, trunk, head, head_layers = _build(config, n_classes)
    train_config = TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                               seed=config.seed, device=config.device)
    train_loader = feature_loader(train_images, data.train_labels, config.batch_size, shuffle=True, seed=config.seed)
    model, _ = cached_training(
        model, lambda m: train_model(m, train_loader, train_config, progress=progress),
        cache_dir(EXPERIMENT, "models"),
        {"data": data.key, "signal": signal, "model": config.model, "architecture": str(model),
         "train": asdict(train_config),
         "batch_size": config.batch_size, "injected": data.injected_class},
    )
    model.to(config.device)
    test_loader = feature_loader(data.test_images, data.test_labels, 256)
    train_eval_loader = feature_loader(train_images, data.train_labels, 256)
    test_pred = predict(model, test_loader, device=config.device, progress=progress)
    train_pred = predict(model, train_eval_loader, device=config.device, progress=progress)

    train_features, train_targets = compute_features(trunk, train_eval_loader, model, config.device, progress)
    test_features, test_targets = compute_features(trunk, test_loader, model, config.device, progress)
    key = {"weights": state_key(model), "data": data.key, "signal": signal}
    embedder = cached_embedder(
        EXPERIMENT, head, head_layers, feature_loader(train_features, train_targets, 128), key,
        arnoldi_dim=config.arnoldi_dim, embedding_dim=config.embedding_dim, seed=config.seed,
        device=config.device, progress=progress,
    )
    factors = {**key, "P": config.arnoldi_dim, "D": config.embedding_dim, "seed": config.seed}
    train_emb = cached_embeddings(EXPERIMENT, embedder, feature_loader(train_features, train_targets, 128),
                                  {**factors, "split": "train"})
    test_emb = cached_embeddings(EXPERIMENT, embedder, feature_loader(test_features, test_targets, 128),
                                 {**factors, "split": "test"})

    labels = data.test_labels.numpy()
    predicted = test_pred.predicted
    injected_train = data.train_labels.numpy() == data.injected_class
    others = labels != data.injected_class
    other_accuracy = float(test_pred.correct[others].mean()) if others.any() else float("nan")
    max_accuracy = config.max_accuracy if not other_accuracy < config.max_accuracy else other_accuracy / 2
    min_size = max(2, round(config.min_size * min(1.0, len(labels) / PAPER_TEST_SIZE)))
    slices, _ = rule_slices(test_emb, test_pred.correct, max_accuracy, min_size, config.branching,
                            config.max_depth, config.seed)
    result = {
        "signal": signal,
        "test_accuracy": round(test_pred.accuracy, 4),
        "test_accuracy_injected_class": round(float(test_pred.correct[~others].mean()), 4) if (~others).any() else None,
        "test_accuracy_other_classes": round(other_accuracy, 4),
        "train_accuracy": round(train_pred.accuracy, 4),
        "test_accuracy_per_class": {
            data.class_names[c]: round(float(test_pred.correct[labels == c].mean()), 4)
            for c in range(n_classes) if (labels == c).any()
        },
        "test_predicted_as_injected_class": round(float((predicted == data.injected_class).mean()), 4),
        # Examples the model fits with near-zero loss have short influence embeddings and so little influence
        # on anything: this says whether the signal carriers can rank among opponents or proponents at all.
        "train_embedding_norm": {
            "injected_class": round(float(np.linalg.norm(train_emb[injected_train], axis=1).mean()), 6),
            "other_classes": round(float(np.linalg.norm(train_emb[~injected_train], axis=1).mean()), 6),
        },
        "max_accuracy_used": round(max_accuracy, 4),
        "min_size_used": min_size,
        "embedding_dim": int(test_emb.shape[1]),
        "n_slices": len(slices),
    }
    if not slices:
        return {**result, "frame": None}
    frame = summarize_slices(slices, test_emb, labels, predicted, class_names=data.class_names)
    frame.insert(0, "group", signal)
    lowest = frame.iloc[0]
    members = np.asarray(lowest["members"])
    opponents, _ = slice_opponents(train_emb, test_emb[members], k=config.n_opponents)
    train_labels = data.train_labels.numpy()
    injected_name = data.class_names[data.injected_class]
    opponent_share = float((train_labels[opponents] == data.injected_class).mean())
    proponents, _ = slice_proponents(train_emb, test_emb[members], k=config.n_opponents)
    frame["opponents"] = [opponents.tolist()] + [[] for _ in range(len(frame) - 1)]
    return {
        **result,
        "lowest_slice": {
            "size": int(lowest["size"]),
            "accuracy": round(float(lowest["accuracy"]), 4),
            "label_distribution": lowest["label_distribution"],
            "prediction_distribution": lowest["prediction_distribution"],
            "injected_class_share": round(float((labels[members] == data.injected_class).mean()), 4),
        },
        "opponents": {
            "k": int(len(opponents)),
            "label_distribution": _distribution(train_labels[opponents], data.class_names),
            "prediction_distribution": _distribution(train_pred.predicted[opponents], data.class_names),
            # Every training image of the injected class carries the signal, and only those do.
            "share_with_signal" if signal != CONTROL else "share_of_injected_class_no_signal": round(opponent_share, 4),
            "injected_class_share_in_train": round(float((train_labels == data.injected_class).mean()), 4),
        },
        # Not in the paper: the other end of the same ranking, to show where the signal carriers sit.
        "proponents": {
            "k": int(len(proponents)),
            "label_distribution": _distribution(train_labels[proponents], data.class_names),
            "share_of_injected_class": round(float((train_labels[proponents] == data.injected_class).mean()), 4),
        },
        "injected_class": injected_name,
        "frame": frame,
    }


def figure5(results: list[dict], path: Path, source: str, n_classes: int) -> None:
    """Figure 5: per signal, labels (red) and predictions (blue) of the lowest-accuracy slice
    (left) and of its top opponents in the training data (right)."""
    shown = [r for r in results if r.get("lowest_slice")]
    if not shown:
        return
    figure = Figure(figsize=(8.0, 2.2 * len(shown)))
    axes = figure.subplots(len(shown), 2, squeeze=False)
    for (left, right), result in zip(axes, shown):
        s, o = result["lowest_slice"], result["opponents"]
        draw_distributions(left, s["label_distribution"], s["prediction_distribution"], max_classes=n_classes)
        left.set_title(f"{result['signal']}: lowest-accuracy test slice, n={s['size']}, acc {s['accuracy']:.0%}",
                       fontsize=8)
        draw_distributions(right, o["label_distribution"], o["prediction_distribution"], max_classes=n_classes)
        right.set_title(f"{result['signal']}: its top-{o['k']} opponents (training)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Figure 5 ({source}); injected class: {shown[0]['injected_class']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def run(config: BoneAgeConfig, out: str | None = None, rsna: dict | None = None, covid_root: str | None = None,
        progress: bool = True) -> dict:
    started = time.time()
    signals = _signals(config)
    torch.manual_seed(config.seed)
    data = rsna_data(config, **rsna, progress=progress) if rsna else stand_in_data(config, covid_root, progress)
    results = [run_signal(signal, data, config, progress) for signal in signals]

    out_dir = results_dir(EXPERIMENT, out)
    frames = [r.pop("frame") for r in results]
    frames = [f for f in frames if f is not None]
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["group", "slice", "size", "accuracy", "label_distribution", "prediction_distribution"])
    sample = data.test_images[0]
    figure_injections(sample, title="Injected signals (paper, Figure 4) on a test X-ray").savefig(
        out_dir / "figure4_injections.png", dpi=100, bbox_inches="tight")
    figure5(results, out_dir / "figure5.png", data.source, len(data.class_names))
    pd.DataFrame([
        {"data": data.source, "signal": r["signal"], "test_accuracy": r["test_accuracy"],
         "test_accuracy_injected_class": r["test_accuracy_injected_class"], "n_slices": r["n_slices"],
         "lowest_slice_size": r.get("lowest_slice", {}).get("size"),
         "lowest_slice_accuracy": r.get("lowest_slice", {}).get("accuracy"),
         "injected_class_share_in_slice": r.get("lowest_slice", {}).get("injected_class_share"),
         "opponents_with_signal": r.get("opponents", {}).get("share_with_signal"),
         "proponents_of_injected_class": r.get("proponents", {}).get("share_of_injected_class")}
        for r in results
    ]).to_csv(out_dir / "findings.csv", index=False)
    summary = {
        "experiment": EXPERIMENT,
        "note": STAND_IN if not rsna else "RSNA Pediatric Bone Age data",
        "data_source": ({"kind": "offline stand-in", "description": STAND_IN} if not rsna
                        else {"kind": "canonical", "description": "RSNA Pediatric Bone Age data"}),
        "group_label": "Injected signal",
        "data": {"source": data.source, "n_train": int(len(data.train_labels)), "n_test": int(len(data.test_labels)),
                 "class_names": data.class_names, "injected_class": data.class_names[data.injected_class],
                 "train_class_counts": np.bincount(data.train_labels.numpy(), minlength=len(data.class_names)),
                 "test_class_counts": np.bincount(data.test_labels.numpy(), minlength=len(data.class_names))},
        "model": {"name": config.model, "pretrained": False, "trained_here": True},
        "config": asdict(config),
        "rule": (f"InfEmbed-Rule with S = {config.min_size} x min(1, n_test / {PAPER_TEST_SIZE}) and A = "
                 f"{config.max_accuracy}, lowered to half the model's test accuracy on the non-injected classes "
                 "when that is below A (else the whole test set would already be a slice); both per signal below"),
        "signal_parameters": {name: asdict(signal) for name, signal in INJECTIONS.items()},
        "paper": PAPER,
        "results": results,
    }
    return write_results(out_dir, slices, summary, started)


def build_parser() -> argparse.ArgumentParser:
    defaults = BoneAgeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m experiments.boneage_spurious")
    parser.add_argument("--out", default=None, help="results folder (default: results/boneage_spurious)")
    parser.add_argument("--covid-root", default=None, help="COVID chest X-ray folder (default: the shared copy)")
    for name in ("train-csv", "train-images", "test-csv", "test-images"):
        parser.add_argument(f"--boneage-{name}", default=None, help="RSNA bone-age data (all four, Kaggle layout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for f in fields(BoneAgeConfig):
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, help=f"default {default}")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = BoneAgeConfig(**{f.name: getattr(args, f.name) for f in fields(BoneAgeConfig)})
    rsna_args = {k: getattr(args, f"boneage_{k}") for k in ("train_csv", "train_images", "test_csv", "test_images")}
    given = [v is not None for v in rsna_args.values()]
    if any(given) and not all(given):
        raise InputError("pass all four --boneage-train-csv/--boneage-train-images/--boneage-test-csv/--boneage-test-images")
    summary = run(config, args.out, rsna_args if all(given) else None, args.covid_root, progress=not args.quiet)
    print(summary["note"])
    print(json.dumps({r["signal"]: {k: r.get(k) for k in ("test_accuracy", "test_accuracy_injected_class", "n_slices")}
                      | {"slice_injected_share": r.get("lowest_slice", {}).get("injected_class_share"),
                         "opponents_with_signal": r.get("opponents", {}).get("share_with_signal"),
         "proponents_of_injected_class": r.get("proponents", {}).get("share_of_injected_class")}
                      for r in summary["results"]}, indent=1))
    return summary


if __name__ == "__main__":
    main()
