"""Spurious signals (paper, section 4.4 and appendix G; Figures 4-5).

Protocol: one signal (hospital tag, stripe or blur; :mod:`harness.data.spurious`) is
injected into every *training* image of one class (the paper's "mid-puberty"); the test
set is untouched. A model is trained on the manipulated training set, InfEmbed-Rule
(accuracy <= A, size >= S) runs on the test set, and for the lowest-accuracy slice we
report the share of its labels that are the injected class and the shares of its top-50
opponents and top-50 proponents (training examples) that carry the signal. Paper: for
every signal the slice is mostly "mid-puberty" and about 80% of its opponents carry the
signal. A run without any signal (``none``) is the control; every signal and the control
are repeated over several seeds (model initialisation, batch order, Arnoldi and K-Means).

**Offline default = a stand-in.** The RSNA bone-age images are not available here, so
by default the same protocol runs on 5 classes of the shared Tiny-ImageNet subset (its
500 training and 50 validation photos per class, RGB, resized from 64 to 32 pixels so
that 4 signals x 3 seeds train in minutes on a shared CPU), a task the small CNN learns
well enough that the paper's A = 0.4 and S = 25 apply as written. With the RSNA data (``--boneage-train-csv`` ... in the Kaggle
layout) the paper's 5 age groups are used and "early/mid-puberty" is the injected class.

Model: the paper's appendix-G "small DNN" (conv-ReLU-BatchNorm-max-pool blocks with 5x5
stride-1 kernels, then two fully connected layers), trained here from scratch on
32 x 32 images so that one training run takes about a CPU minute; ``--model resnet50``
trains a torchvision ResNet-50 instead (the paper's model). The influence embeddings
differentiate the two fully connected layers (ResNet-50: ``fc``), on cached trunk
features.

Mechanism measurements per run: per-example training loss and gradient norm (of the
differentiated head) of the signal carriers against the other training examples, the
norms of their influence embeddings, and the shortcut rate: of the test images of the
*other* classes not predicted as the injected class, the share predicted as it once the
signal is pasted onto them (the control model gives the base rate).

Intervals: per run, a Wilson 95% interval over the counted examples (slice members, or
the k ranked training examples); across seeds, the mean with a Student-t 95% interval
over the seeds (the resampled unit is the whole training run).

With a test set smaller than the paper's 200 images S is scaled by n_test / 200. A = 0.4
is kept unless the model's accuracy on the untouched test images of the *other* classes
is below it; then every region would satisfy the rule, so A is lowered to half that
accuracy (reported as ``max_accuracy_used``).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from harness import FactorConfig, slice_opponents, slice_proponents
from harness.cache import content_key
from harness.data.boneage import AGE_GROUPS, MID_PUBERTY, load_boneage
from harness.data.spurious import INJECTIONS, figure_injections, inject_class
from harness.data.tiny_imagenet import tiny_imagenet
from harness.errors import InputError, exit_status
from harness.hessian import FunctionalLoss, select_parameters
from harness.io import atomic_write_text
from harness.models import compute_features
from harness.models.small import SmallCNN, split_small_cnn
from harness.models.vision import GreyResNet, split_grey_resnet
from harness.options import option
from harness.report.figures import draw_distributions
from harness.task import ClassificationTask
from harness.train import TrainConfig, predict
from experiments.pipeline import Part, Source, Study, Training, embed, feature_loader, results_dir, study_config, \
    study_parser, write_results

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
    "STAND-IN: the RSNA bone-age images are not available offline; these results use 5 classes of real photos "
    "(shared tiny-imagenet-subset: its train and val splits, at 32 x 32), one class playing 'mid-puberty'. They test "
    "the paper's finding on a task the model learns well, not its bone-age numbers."
)


@dataclass
class BoneAgeConfig:
    signals: str = option("none,tag,stripe,blur", "comma list of signals to inject ('none' = the clean control)")
    seeds: str = option("0,1,2", "comma list of seeds; each seeds the initialisation, batch order, Arnoldi start and "
                                 "K-Means of one run per signal")
    classes: str = option("goldfish,king penguin,monarch,teapot,pizza",
                          "stand-in: comma list of Tiny-ImageNet class names (words.txt)")
    injected: str = option("monarch", "stand-in: the class whose training images get the signal")
    train_per_class: int | None = option(None, "stand-in: a seeded subset of this many training images per class")
    model: str = option("small_cnn", "the paper's appendix-G small DNN, or the paper's ResNet-50",
                        choices=("small_cnn", "resnet50"))
    image_size: int = option(32, "pixels of the (square) images; small_cnn needs a multiple of 16")
    epochs: int = option(15, "training epochs")
    lr: float = option(1e-3, "learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    batch_size: int = option(32, "training batch size")
    max_accuracy: float = option(0.4, "A: InfEmbed-Rule's accuracy bound (lowered only when the other classes' "
                                      "test accuracy is below it)")
    min_size: int = option(25, "S: InfEmbed-Rule's minimum slice size for a 200-image test set (scaled below it)")
    branching: int = option(3, "InfEmbed-Rule's K-Means branching factor")
    max_depth: int = option(10, "InfEmbed-Rule's maximum recursion depth")
    arnoldi_dim: int = option(200, "P: Arnoldi iterations")
    embedding_dim: int = option(100, "D: embedding width (at most P)")
    n_opponents: int = option(50, "k: opponents and proponents read off the lowest-accuracy slice")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")


# --paper-scale (default with --device cuda): the paper's ResNet-50 on 299-pixel images.
PAPER_SCALE = dict(model="resnet50", image_size=299, batch_size=64)


@dataclass
class ImageData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    injected_class: int
    source: str
    key: str


def _names(text: str, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError(f"{what} must be a non-empty comma list; got {text!r}")
    return names


def _tiny_imagenet_split(split: str, names: list[str], size: int, root: str | None, progress: bool,
                         per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    folder = tiny_imagenet(split, per_class=per_class, root=root)
    unknown = [n for n in names if n not in folder.class_names]
    if unknown:
        raise InputError(f"classes {unknown} are not in {folder.source}; it has {list(folder.class_names)}")
    index = {folder.class_names.index(n): i for i, n in enumerate(names)}
    chosen = [(path, index[label]) for path, label in folder.samples if label in index]
    images = []
    for path, _ in tqdm(chosen, desc=f"{split} images", disable=not progress, leave=False):
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
        except OSError as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return pixels, torch.tensor([label for _, label in chosen])


def stand_in_data(config: BoneAgeConfig, root: str | None = None, progress: bool = True) -> ImageData:
    """``config.classes`` of the Tiny-ImageNet subset (train split, or ``config.train_per_class`` of
    each class, to train; val split to test); ``config.injected`` is the class that gets the signal."""
    names = _names(config.classes, "classes")
    if len(set(names)) != len(names) or len(names) < 2:
        raise InputError(f"classes must name at least 2 distinct classes; got {config.classes!r}")
    if config.injected not in names:
        raise InputError(f"injected must be one of classes {names}; got {config.injected!r}")
    x_train, y_train = _tiny_imagenet_split("train", names, config.image_size, root, progress,
                                            config.train_per_class)
    x_test, y_test = _tiny_imagenet_split("val", names, config.image_size, root, progress)
    return ImageData(
        x_train, y_train, x_test, y_test, names, names.index(config.injected),
        source="stand-in: tiny-imagenet-subset, 5 classes" if len(names) == 5 else
        f"stand-in: tiny-imagenet-subset, {len(names)} classes",
        key=content_key(names, x_train, y_train, x_test, y_test),
    )


def rsna_data(config: BoneAgeConfig, train_csv: str, train_images: str, test_csv: str, test_images: str,
              progress: bool = True) -> ImageData:
    """The RSNA bone-age data in its public layout (one CSV + image folder per split)."""
    x_train, y_train = load_boneage(train_csv, train_images, config.image_size, progress)
    x_test, y_test = load_boneage(test_csv, test_images, config.image_size, progress)
    return ImageData(
        x_train, y_train, x_test, y_test, list(AGE_GROUPS), MID_PUBERTY, source="RSNA Pediatric Bone Age",
        key=content_key(list(AGE_GROUPS), x_train, y_train, x_test, y_test),
    )


def _signals(config: BoneAgeConfig) -> list[str]:
    names = [s.strip() for s in config.signals.split(",") if s.strip()]
    unknown = [s for s in names if s != CONTROL and s not in INJECTIONS]
    if not names or unknown:
        raise InputError(f"signals must be a comma list of {CONTROL!r}, {', '.join(INJECTIONS)}; got {config.signals!r}")
    return names


def _seeds(config: BoneAgeConfig) -> list[int]:
    try:
        seeds = [int(s) for s in _names(config.seeds, "seeds")]
    except ValueError:
        raise InputError(f"seeds must be a comma list of integers; got {config.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be distinct; got {config.seeds!r}")
    return seeds


def _build(config: BoneAgeConfig, n_classes: int, channels: int, seed: int):
    """The seeded model, split into trunk and the differentiated head."""
    torch.manual_seed(seed)
    if config.model == "small_cnn":
        return split_small_cnn(SmallCNN(n_classes, config.image_size, channels=channels))
    if config.model == "resnet50":
        return split_grey_resnet(GreyResNet(n_classes), head_layers=("fc",))  # one channel is repeated to three
    raise InputError(f"model must be 'small_cnn' or 'resnet50'; got {config.model!r}")


def _distribution(labels: np.ndarray, names: list[str]) -> dict[str, float]:
    counts = np.bincount(labels, minlength=len(names)) / max(1, len(labels))
    return {names[c]: round(float(counts[c]), 4) for c in np.argsort(-counts, kind="stable") if counts[c] > 0}


def wilson(successes: int, n: int) -> list[float]:
    """The Wilson 95% interval of a binomial share (``[nan, nan]`` for n = 0)."""
    if n == 0:
        return [float("nan"), float("nan")]
    interval = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def _share(mask: np.ndarray) -> dict:
    """A share with its count and Wilson interval."""
    count, n = int(mask.sum()), int(mask.size)
    return {"share": round(count / n, 4) if n else None, "count": count, "n": n, "wilson95": wilson(count, n)}


def per_example_head_gradients(head: nn.Module, features: torch.Tensor, targets: torch.Tensor,
                               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy loss, L2 norm of its gradient over the head's parameters) per example,
    from the core's functional loss (the per-example gradients the embedder projects)."""
    loss = FunctionalLoss(head, ClassificationTask(), select_parameters(head, None))
    params = loss.params()
    losses, norms = [], []
    for start in range(0, len(targets), batch_size):
        batch = (features[start:start + batch_size], targets[start:start + batch_size])
        with torch.no_grad():
            losses.append(loss.losses(params, batch))
        norms.append(loss.per_example_grads(params, batch).norm(dim=1))
    return torch.cat(losses).numpy(), torch.cat(norms).numpy()


def _compare(values: np.ndarray, carriers: np.ndarray) -> dict:
    """Mean and median of a per-example quantity for the signal carriers and for the others."""
    return {group: {"mean": float(f"{values[mask].mean():.4g}"), "median": float(f"{np.median(values[mask]):.4g}")}
            for group, mask in (("injected_class", carriers), ("other_classes", ~carriers))}


def shortcut_rates(model: nn.Module, data: ImageData, device: str, progress: bool) -> dict[str, float | None]:
    """Per signal: of the test images of the *other* classes that the model does not predict as the
    injected class, the share it predicts as the injected class once the signal is pasted onto them."""
    others = data.test_labels != data.injected_class
    images, labels = data.test_images[others], data.test_labels[others]
    before = predict(model, feature_loader(images, labels, 256), device=device, progress=progress).predicted
    eligible = before != data.injected_class
    marked = torch.zeros_like(labels)
    rates = {}
    for name, signal in INJECTIONS.items():
        pasted = inject_class(images, marked, 0, signal)
        after = predict(model, feature_loader(pasted, labels, 256), device=device, progress=progress).predicted
        rates[name] = round(float((after[eligible] == data.injected_class).mean()), 4) if eligible.any() else None
    return rates


def run_signal(signal: str, seed: int, data: ImageData, config: BoneAgeConfig, progress: bool = True) -> dict:
    """Inject, train, embed, InfEmbed-Rule, opponents and proponents for one signal and seed
    (``none`` = clean control)."""
    n_classes = len(data.class_names)
    train_images = data.train_images if signal == CONTROL else inject_class(
        data.train_images, data.train_labels, data.injected_class, INJECTIONS[signal])
    split = _build(config, n_classes, data.train_images.shape[1], seed)
    train_key = content_key(data.key, signal)  # the manipulated training set follows the data and the signal
    study = Study(
        name=EXPERIMENT, model=split, class_names=data.class_names,
        sources={"train": Source(feature_loader(train_images, data.train_labels, 256), train_key),
                 "test": Source(feature_loader(data.test_images, data.test_labels, 256), data.key)},
        fit=Part("train"), pool=Part("train"), analysed=Part("test"),
        training=Training(TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                                      seed=seed, device=config.device),
                          loader=feature_loader(train_images, data.train_labels, config.batch_size, shuffle=True,
                                                seed=seed),
                          data_key=train_key, settings={"batch_size": config.batch_size}),
        factors=FactorConfig(arnoldi_dim=config.arnoldi_dim, embedding_dim=config.embedding_dim, seed=seed),
        batch_size=128, device=config.device,
    )
    started = time.time()
    embedded = embed(study, progress)
    seconds = round(time.time() - started, 1)
    test_pred, test_emb, train_emb = embedded.predictions, embedded.embeddings, embedded.pool_embeddings
    # The mechanism needs every training example's head inputs; the small trunk runs again in seconds.
    train_features, train_targets = compute_features(split.trunk, study.sources["train"].loader, split.model,
                                                     config.device, progress, "trunk features (train, mechanism)")
    head = copy.deepcopy(split.head).cpu()
    train_pred = predict(head, feature_loader(train_features, train_targets, 256), progress=progress)

    labels = data.test_labels.numpy()
    train_labels = data.train_labels.numpy()
    predicted = test_pred.predicted
    carriers = train_labels == data.injected_class  # with a signal, exactly these images carry it
    others = labels != data.injected_class
    other_accuracy = float(test_pred.correct[others].mean()) if others.any() else float("nan")
    max_accuracy = config.max_accuracy if not other_accuracy < config.max_accuracy else other_accuracy / 2
    min_size = max(2, round(config.min_size * min(1.0, len(labels) / PAPER_TEST_SIZE)))
    slices, _, frame = embedded.rule(max_accuracy, min_size, config.branching, config.max_depth, seed)
    losses, gradient_norms = per_example_head_gradients(head, train_features, train_targets)
    result = {
        "signal": signal,
        "seed": seed,
        "writes_results": embedded.writes_results,
        "pipeline_seconds": seconds,  # training, features, factors and embeddings (~0 when cached)
        "test_accuracy": round(test_pred.accuracy, 4),
        "test_accuracy_injected_class": round(float(test_pred.correct[~others].mean()), 4) if (~others).any() else None,
        "test_accuracy_other_classes": round(other_accuracy, 4),
        "train_accuracy": round(train_pred.accuracy, 4),
        "test_accuracy_per_class": {
            data.class_names[c]: round(float(test_pred.correct[labels == c].mean()), 4)
            for c in range(n_classes) if (labels == c).any()
        },
        "test_predicted_as_injected_class": round(float((predicted == data.injected_class).mean()), 4),
        "mechanism": {
            # Training examples the model fits with near-zero loss have small gradients, so short influence
            # embeddings and little influence on anything: this says whether the signal carriers can rank
            # among opponents or proponents at all.
            "train_loss": _compare(losses, carriers),
            "train_head_gradient_norm": _compare(gradient_norms, carriers),
            "train_embedding_norm": _compare(np.linalg.norm(train_emb, axis=1), carriers),
            "shortcut_rate": shortcut_rates(split.model, data, config.device, progress),
        },
        "max_accuracy_used": round(max_accuracy, 4),
        "min_size_used": min_size,
        "embedding_dim": int(test_emb.shape[1]),
        "n_slices": len(slices),
    }
    if frame is None:
        return {**result, "frame": None}
    frame.insert(0, "group", f"{signal} (seed {seed})")
    lowest = frame.iloc[0]
    members = np.asarray(lowest["members"])
    opponents, _ = slice_opponents(train_emb, test_emb[members], k=config.n_opponents)
    proponents, _ = slice_proponents(train_emb, test_emb[members], k=config.n_opponents)
    frame["opponents"] = [opponents.tolist()] + [[] for _ in range(len(frame) - 1)]
    # In the control nothing carries a signal: the same counts give the injected class's base rate.
    return {
        **result,
        "lowest_slice": {
            "size": int(lowest["size"]),
            "accuracy": round(float(lowest["accuracy"]), 4),
            "label_distribution": lowest["label_distribution"],
            "prediction_distribution": lowest["prediction_distribution"],
            "injected_class": _share(labels[members] == data.injected_class),
        },
        "opponents": {
            "k": int(len(opponents)),
            "label_distribution": _distribution(train_labels[opponents], data.class_names),
            "prediction_distribution": _distribution(train_pred.predicted[opponents], data.class_names),
            "injected_class": _share(carriers[opponents]),
        },
        "proponents": {
            "k": int(len(proponents)),
            "label_distribution": _distribution(train_labels[proponents], data.class_names),
            "injected_class": _share(carriers[proponents]),
        },
        "injected_class_share_in_train": round(float(carriers.mean()), 4),
        "injected_class_share_in_test": round(float((~others).mean()), 4),
        "frame": frame,
    }


def across_seeds(values: list[float | None]) -> dict:
    """Mean over the seeds with a Student-t 95% interval (the unit is one training run), and the range."""
    present = np.array([v for v in values if v is not None], dtype=float)
    out = {"n_seeds": int(present.size), "values": [None if v is None else round(float(v), 4) for v in values]}
    if present.size == 0:
        return out
    mean = float(present.mean())
    out.update(mean=round(mean, 4), min=round(float(present.min()), 4), max=round(float(present.max()), 4))
    if present.size >= 2:
        half = float(stats.t.ppf(0.975, present.size - 1) * present.std(ddof=1) / np.sqrt(present.size))
        out["t95"] = [round(mean - half, 4), round(mean + half, 4)]
    return out


def _per_seed_row(result: dict, source: str) -> dict:
    lowest, opponents, proponents = (result.get(k, {}) for k in ("lowest_slice", "opponents", "proponents"))
    mechanism = result["mechanism"]
    signal = result["signal"]
    row = {
        "data": source, "signal": signal, "seed": result["seed"], "test_accuracy": result["test_accuracy"],
        "test_accuracy_injected_class": result["test_accuracy_injected_class"],
        "test_accuracy_other_classes": result["test_accuracy_other_classes"],
        "max_accuracy_used": result["max_accuracy_used"], "min_size_used": result["min_size_used"],
        "n_slices": result["n_slices"], "lowest_slice_size": lowest.get("size"),
        "lowest_slice_accuracy": lowest.get("accuracy"),
    }
    for name, part in (("slice_injected_class", lowest), ("opponents_injected_class", opponents),
                       ("proponents_injected_class", proponents)):
        share = part.get("injected_class", {})
        row[f"{name}_share"] = share.get("share")
        low, high = share.get("wilson95", [None, None])
        row[f"{name}_wilson_low"], row[f"{name}_wilson_high"] = low, high
    for quantity in ("train_loss", "train_head_gradient_norm", "train_embedding_norm"):
        row[f"{quantity}_injected_mean"] = mechanism[quantity]["injected_class"]["mean"]
        row[f"{quantity}_others_mean"] = mechanism[quantity]["other_classes"]["mean"]
    for name, rate in mechanism["shortcut_rate"].items():
        row[f"shortcut_rate_{name}"] = rate  # the control model's rates are the base rates
    return row


def aggregate(rows: pd.DataFrame) -> dict:
    """Per signal, the across-seed summary of every per-seed number that the README quotes."""
    quantities = ["test_accuracy", "test_accuracy_injected_class", "test_accuracy_other_classes", "n_slices",
                  "lowest_slice_accuracy", "slice_injected_class_share", "opponents_injected_class_share",
                  "proponents_injected_class_share", "train_loss_injected_mean", "train_loss_others_mean",
                  "train_head_gradient_norm_injected_mean", "train_head_gradient_norm_others_mean",
                  "train_embedding_norm_injected_mean", "train_embedding_norm_others_mean"]
    quantities += [f"shortcut_rate_{name}" for name in INJECTIONS]
    out = {}
    for signal, group in rows.groupby("signal", sort=False):
        out[signal] = {q: across_seeds([None if pd.isna(v) else float(v) for v in group[q]]) for q in quantities}
    return out


def _mean_interval(numbers: dict, percent: bool = True) -> str:
    if "mean" not in numbers:
        return "-"
    show = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.3g}")
    interval = numbers.get("t95")
    if not interval:
        return show(numbers["mean"])
    return f"{show(numbers['mean'])} [{show(max(0.0, interval[0]))}, {show(min(1.0, interval[1]) if percent else interval[1])}]"


def findings_table(across: dict, k: int) -> str:
    """The README's table: per signal, the across-seed mean [t 95% interval] of each number
    (clipped to the possible range: every number is >= 0, shares <= 100%; the control's shares
    are those of the injected class)."""
    lines = ["| | " + " | ".join(across) + " |", "|---|" + "---|" * len(across)]
    rows = [
        ("test accuracy", "test_accuracy", True), ("its test accuracy on the injected class",
                                                   "test_accuracy_injected_class", True),
        ("slices found", "n_slices", False), ("lowest slice: accuracy", "lowest_slice_accuracy", True),
        ("lowest slice: share of the injected class", "slice_injected_class_share", True),
        (f"top-{k} opponents: share carrying the signal (control: of the injected class)",
         "opponents_injected_class_share", True),
        (f"top-{k} proponents: share carrying the signal (control: of the injected class)",
         "proponents_injected_class_share", True),
        ("training loss: carriers", "train_loss_injected_mean", False),
        ("training loss: other examples", "train_loss_others_mean", False),
        ("head-gradient norm: carriers", "train_head_gradient_norm_injected_mean", False),
        ("head-gradient norm: other examples", "train_head_gradient_norm_others_mean", False),
    ]
    for label, key, percent in rows:
        lines.append(f"| {label} | " + " | ".join(_mean_interval(numbers[key], percent) for numbers in across.values())
                     + " |")
    lines.append("| shortcut rate of the signal (control: base rate of tag / stripe / blur) | " + " | ".join(
        " / ".join(_mean_interval(numbers[f"shortcut_rate_{name}"]) for name in INJECTIONS) if signal == CONTROL
        else _mean_interval(numbers[f"shortcut_rate_{signal}"]) for signal, numbers in across.items()) + " |")
    return "\n".join(lines) + "\n"


def figure5(results: list[dict], path: Path, source: str, n_classes: int, injected: str) -> None:
    """Figure 5: per signal (first seed), labels (red) and predictions (blue) of the lowest-accuracy
    slice (left) and of its top opponents in the training data (right)."""
    shown, seen = [], set()
    for result in results:
        if result.get("lowest_slice") and result["signal"] not in seen:
            shown.append(result)
            seen.add(result["signal"])
    if not shown:
        return
    figure = Figure(figsize=(8.0, 2.2 * len(shown)))
    axes = figure.subplots(len(shown), 2, squeeze=False)
    for (left, right), result in zip(axes, shown):
        s, o = result["lowest_slice"], result["opponents"]
        name = f"{result['signal']} (seed {result['seed']})"
        draw_distributions(left, s["label_distribution"], s["prediction_distribution"], max_classes=n_classes)
        left.set_title(f"{name}: lowest-accuracy test slice, n={s['size']}, acc {s['accuracy']:.0%}", fontsize=8)
        draw_distributions(right, o["label_distribution"], o["prediction_distribution"], max_classes=n_classes)
        right.set_title(f"{name}: its top-{o['k']} opponents (training)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Figure 5 ({source}); injected class: {injected}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def run(config: BoneAgeConfig, out: str | None = None, rsna: dict | None = None, data_root: str | None = None,
        progress: bool = True) -> dict:
    started = time.time()
    signals, seeds = _signals(config), _seeds(config)
    data = rsna_data(config, **rsna, progress=progress) if rsna else stand_in_data(config, data_root, progress)
    results = [run_signal(signal, seed, data, config, progress)
               for seed in tqdm(seeds, desc="seeds", disable=not progress) for signal in signals]
    if not all([r.pop("writes_results") for r in results]):  # another rank of a torchrun job writes them
        return {}
    out_dir = results_dir(EXPERIMENT, out)
    frames = [r.pop("frame") for r in results]
    frames = [f for f in frames if f is not None]
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["group", "slice", "size", "accuracy", "label_distribution", "prediction_distribution"])
    injected = data.class_names[data.injected_class]
    sample = data.test_images[int(torch.nonzero(data.test_labels == data.injected_class)[0])]
    figure_injections(sample, title=f"Injected signals (paper, Figure 4) on a test image of {injected}").savefig(
        out_dir / "figure4_injections.png", dpi=100, bbox_inches="tight")
    figure5(results, out_dir / "figure5.png", data.source, len(data.class_names), injected)
    rows = pd.DataFrame([_per_seed_row(r, data.source) for r in results])
    rows.to_csv(out_dir / "per_seed.csv", index=False)
    across = aggregate(rows)
    atomic_write_text(f"Across {len(seeds)} seeds: mean [Student-t 95% interval over the seeds]; {data.source}; "
                      f"injected class: {injected}.\n\n" + findings_table(across, config.n_opponents), out_dir / "findings.md")
    summary = {
        "experiment": EXPERIMENT,
        "note": STAND_IN if not rsna else "RSNA Pediatric Bone Age data",
        "data_source": ({"kind": "offline stand-in", "description": STAND_IN} if not rsna
                        else {"kind": "canonical", "description": "RSNA Pediatric Bone Age data"}),
        "group_label": "Injected signal (seed)",
        "data": {"source": data.source, "n_train": int(len(data.train_labels)), "n_test": int(len(data.test_labels)),
                 "class_names": data.class_names, "injected_class": injected,
                 "train_class_counts": np.bincount(data.train_labels.numpy(), minlength=len(data.class_names)),
                 "test_class_counts": np.bincount(data.test_labels.numpy(), minlength=len(data.class_names))},
        "model": {"name": config.model, "pretrained": False, "trained_here": True},
        "config": asdict(config),
        "rule": (f"InfEmbed-Rule with S = {config.min_size} x min(1, n_test / {PAPER_TEST_SIZE}) and A = "
                 f"{config.max_accuracy}, lowered to half the model's test accuracy on the non-injected classes "
                 "only when that is below A; both per run below"),
        "intervals": ("per run: Wilson 95% over the counted examples (slice members; the k ranked training "
                      "examples); across seeds: mean and Student-t 95% over the seeds (unit: one training run)"),
        "signal_parameters": {name: asdict(signal) for name, signal in INJECTIONS.items()},
        "paper": PAPER,
        "across_seeds": across,
        "results": results,
    }
    return write_results(out_dir, slices, summary, started)


def build_parser():
    parser = study_parser(BoneAgeConfig, __doc__, "python -m experiments.boneage_spurious", PAPER_SCALE)
    parser.add_argument("--data-root", default=None,
                        help="Tiny-ImageNet subset folder for the stand-in (default: the shared copy)")
    for name in ("train-csv", "train-images", "test-csv", "test-images"):
        parser.add_argument(f"--boneage-{name}", default=None, help="RSNA bone-age data (all four, Kaggle layout)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = study_config(BoneAgeConfig, PAPER_SCALE, args)
    rsna_args = {k: getattr(args, f"boneage_{k}") for k in ("train_csv", "train_images", "test_csv", "test_images")}
    given = [v is not None for v in rsna_args.values()]
    if any(given) and not all(given):
        raise InputError("pass all four --boneage-train-csv/--boneage-train-images/--boneage-test-csv/--boneage-test-images")
    summary = run(config, args.out, rsna_args if all(given) else None, args.data_root, progress=not args.quiet)
    if summary:
        print(summary["note"])
        print(json.dumps({signal: {q: v.get("mean") for q, v in numbers.items()
                                   if q in ("test_accuracy", "slice_injected_class_share",
                                            "opponents_injected_class_share", "proponents_injected_class_share")}
                          for signal, numbers in summary["across_seeds"].items()}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.boneage_spurious", main))
