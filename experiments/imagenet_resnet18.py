"""ImageNet case study (paper section 4.2, appendix E): InfEmbed-Rule (A = 0.4, S = 25) on
a ResNet-18, with influence embeddings of ``layer4`` + ``fc``, each slice explained by
its strongest opponents (Figures 1-2).

Offline default (``--source tiny``): a torchvision ResNet-18 (30 classes) trained here,
from scratch, once (the weights are cached), with the harness's training loop on all
15,000 images of the Tiny-ImageNet 30-class training split (64 px; random padded crops
and flips; SGD with a one-cycle learning rate) and analysed on its val split. Its val
accuracy after every epoch is recorded (the learning curve in summary.json). The rule
uses A as given (0.4); ``--scale-max-accuracy`` scales A by accuracy / 0.698 (the paper
model's accuracy) for a weaker model. The A used and the accuracy are reported.
FactorHessian is fitted on training images and opponents are searched in a
configurable pool of training images (``--opponents train``; ``val`` searches the
analysed images, as the paper did).

Canonical path (``--source imagenet --imagenet-val DIR``): torchvision's ImageNet
ResNet-18 weights (``--weights FILE`` or the torchvision cache; never downloaded) on an
ImageNet validation folder in ImageFolder layout; FactorHessian and opponents use
``--opponent-folder`` (default: the analysed images, as in the paper).

``--device cuda`` (or ``--paper-scale``) runs the paper-scale configuration (P = 500, D = 100, the whole
training split, more epochs); explicit options override either preset.

The frozen trunk (stem..layer3) runs once per image; its features are cached and the
embedder differentiates the head (layer4 + fc) on them. The cached stages and the
coverage metrics are :mod:`experiments.pipeline`'s; this module keeps the image sets,
the accuracy scaling of A and the figures.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from harness import FactorConfig
from harness.cache import Cache, content_key, stage_key
from harness.data.splits import per_class_subset
from harness.data.tiny_imagenet import ImageFolderSet, image_folder, tiny_imagenet
from harness.errors import InputError, exit_status
from harness.models.vision import imagenet_resnet, resnet, split_resnet
from harness.options import option
from harness.report.figures import plot_slice_distributions, plot_slice_examples
from harness.report import save_thumbnails
from harness.train import TrainConfig, predict
from experiments.pipeline import Part, Source, Study, Training, embed, errors_by_pair, results_dir, study_config, \
    study_parser, write_results

EXPERIMENT = "imagenet_resnet18"
PAPER_MODEL_ACCURACY = 0.698
PAPER = {
    "model": "torchvision ResNet-18, ImageNet weights (69.8% accuracy)", "analysed_examples": 50000,
    "max_accuracy": 0.4, "min_size": 25, "n_slices": 25, "slice_examples": 954, "slice_accuracy": 0.349,
    "arnoldi_dim": 500, "embedding_dim": 100, "layers": ["layer4", "fc"],
    "opponents": "searched in the analysed (validation) data itself",
}


@dataclass
class ImageNetConfig:
    source: str = option("tiny", "'tiny': a ResNet-18 trained here on the Tiny-ImageNet subset; 'imagenet': "
                                 "torchvision's ImageNet weights on --imagenet-val", choices=("tiny", "imagenet"))
    train_per_class: int | None = option(None, "training images per class ('none': all)")
    val_per_class: int | None = option(None, "analysed images per class ('none': all)")
    epochs: int = option(18, "training epochs")
    optimizer: str = option("sgd", "training optimizer ('sgd': momentum 0.9)", choices=("sgd", "adamw"))
    schedule: str = option("onecycle", "learning-rate schedule (see harness.train.TrainConfig)",
                           choices=("onecycle", "constant"))
    lr: float = option(0.1, "learning rate (the peak of the one-cycle schedule)")
    weight_decay: float = option(5e-4, "weight decay (L2 for SGD, decoupled for AdamW)")
    batch_size: int = option(128, "batch size of every pass")
    fit_per_class: int | None = option(5, "images per class FactorHessian is fitted on ('none': all)")
    opponents: str = option("train", "search opponents among training images, or among the analysed ones (the "
                                     "paper's choice)", choices=("train", "val"))
    opponent_pool_per_class: int | None = option(20, "training images per class in the opponent pool ('none': all)")
    arnoldi_dim: int = option(20, "P: Arnoldi iterations")
    embedding_dim: int = option(10, "D: embedding width")
    chunk_size: int = option(16, "examples per vmap chunk of per-example gradients")
    max_accuracy: float = option(0.4, "A: slices have accuracy <= A (as given unless --scale-max-accuracy)")
    scale_max_accuracy: bool = option(False, "scale A by the model's accuracy / 0.698 (the paper model's), for a "
                                             "model much weaker than the paper's")
    min_size: int = option(25, "S: slices have at least S images")
    branching: int = option(3, "B: K-Means clusters per split")
    max_depth: int = option(10, "deepest split of InfEmbed-Rule")
    n_nearest: int = option(4, "images nearest each slice centre to show")
    n_opponents: int = option(4, "opponents per slice")
    figure_slices: int = option(6, "slices shown in figure_slices.png")
    num_workers: int = option(0, "DataLoader workers for decoding images")
    seed: int = option(0, "seeds the subsets, the initialisation, training, the Arnoldi start and K-Means")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")


# --paper-scale (default with --device cuda): the paper's P and D, more images for FactorHessian and opponents;
# the model is trained with the default recipe.
PAPER_SCALE = dict(fit_per_class=50, opponent_pool_per_class=None, arnoldi_dim=500, embedding_dim=100, chunk_size=64,
                   num_workers=8)


def build_parser():
    parser = study_parser(ImageNetConfig, __doc__, "python -m experiments.imagenet_resnet18", PAPER_SCALE)
    parser.add_argument("--imagenet-val", default=None, help="ImageNet validation folder (ImageFolder layout)")
    parser.add_argument("--weights", default=None, help="ResNet-18 ImageNet state dict (default: torchvision cache)")
    parser.add_argument("--opponent-folder", default=None,
                        help="ImageFolder of training images for FactorHessian and opponents (canonical path)")
    return parser


def _images(config: ImageNetConfig, imagenet_val: str | None, weights: str | None, opponent_folder: str | None):
    """(model, class names, train set or None, analysed set, opponent pool set)."""
    if config.source == "tiny":
        train = tiny_imagenet("train", config.train_per_class, config.seed, augment=True)
        analysed = tiny_imagenet("val", config.val_per_class, config.seed)
        torch.manual_seed(config.seed)
        model = resnet("resnet18", len(analysed.class_names))
        return model, list(analysed.class_names), train, analysed
    if config.source == "imagenet":
        if imagenet_val is None:
            raise InputError("--source imagenet needs --imagenet-val DIR (an ImageNet validation folder)")
        model, names = imagenet_resnet("resnet18", weights)
        analysed = image_folder(imagenet_val, names, config.val_per_class, config.seed)
        train = image_folder(opponent_folder, names, config.opponent_pool_per_class, config.seed) \
            if opponent_folder else None
        return model, names, train, analysed
    raise InputError(f"source must be 'tiny' or 'imagenet'; got {config.source!r}")


def _source(images: ImageFolderSet, config: ImageNetConfig) -> Source:
    """The images as the trunk sees them (no augmentation), keyed by their files and geometry."""
    loader = DataLoader(images.without_augmentation(), batch_size=config.batch_size, num_workers=config.num_workers)
    return Source(loader, content_key([path for path, _ in images.samples], repr(images.geometry)))


def _learning_curve(analysed: ImageFolderSet, config: ImageNetConfig):
    """(curve, on_epoch): ``on_epoch`` appends the epoch, its mean training loss, the
    accuracy on the analysed images and the seconds since training began to ``curve``."""
    loader = DataLoader(analysed.without_augmentation(), batch_size=config.batch_size, num_workers=config.num_workers)
    curve: list[dict] = []
    started = time.time()

    def on_epoch(epoch: int, model: torch.nn.Module, mean_loss: float) -> None:
        accuracy = predict(model, loader, device=config.device, progress=False).accuracy
        curve.append({"epoch": epoch, "train_loss": round(mean_loss, 4), "val_accuracy": round(accuracy, 4),
                      "elapsed_s": round(time.time() - started, 1)})
    return curve, on_epoch


def _stored_curve(curve: list[dict], weights: str) -> list[dict] | None:
    """The learning curve of the trained weights: recorded now (and stored), or stored when
    they were trained; None if they were trained before curves were recorded."""
    inputs = {"weights": weights}
    cache = Cache(EXPERIMENT)
    if curve or cache.path("learning_curves", stage_key("learning_curves", inputs)).is_file():
        return cache.stage("learning_curves", lambda: curve, inputs=inputs).value
    return None


def run(config: ImageNetConfig, out: str | None = None, imagenet_val: str | None = None, weights: str | None = None,
        opponent_folder: str | None = None, progress: bool = True) -> dict:
    started = time.time()
    if config.opponents not in ("train", "val"):
        raise InputError(f"opponents must be 'train' or 'val'; got {config.opponents!r}")
    model, class_names, train, analysed = _images(config, imagenet_val, weights, opponent_folder)
    training, curve = None, []
    if config.source == "tiny":  # the offline default trains its model; the canonical path has ImageNet weights
        loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed))
        curve, on_epoch = _learning_curve(analysed, config)
        training = Training(TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                                        optimizer=config.optimizer, schedule=config.schedule, seed=config.seed,
                                        device=config.device), loader=loader,
                            data_key=content_key([path for path, _ in train.samples], repr(train.augment)),
                            settings={"batch_size": config.batch_size}, on_epoch=on_epoch)
    sources = {"analysed": _source(analysed, config)}
    if config.opponents == "val" or train is None:
        pool_set = analysed
        fit = Part("analysed", per_class_subset(analysed.labels, config.fit_per_class, config.seed))
        pool = Part("analysed")
    else:
        # Only the training images that fit the Hessian or may be opponents need features.
        fit_all = per_class_subset(train.labels, config.fit_per_class, config.seed)
        opp_all = per_class_subset(train.labels, config.opponent_pool_per_class, config.seed + 1)
        needed = np.union1d(fit_all, opp_all)
        pool_set = ImageFolderSet([train.samples[i] for i in needed], class_names, train.geometry, None, train.source)
        sources["pool"] = _source(pool_set, config)
        fit, pool = Part("pool", np.searchsorted(needed, fit_all)), Part("pool", np.searchsorted(needed, opp_all))
    opp_pos = np.arange(len(pool_set)) if pool.positions is None else pool.positions
    study = Study(
        name=EXPERIMENT, model=split_resnet(model, ("layer4", "fc")), sources=sources, analysed=Part("analysed"),
        fit=fit, pool=pool, class_names=class_names, training=training,
        factors=FactorConfig(arnoldi_dim=config.arnoldi_dim, embedding_dim=config.embedding_dim, seed=config.seed),
        batch_size=config.batch_size, chunk_size=config.chunk_size, device=config.device, n_nearest=config.n_nearest,
    )
    result = embed(study, progress)
    if not result.writes_results:  # another rank of a torchrun job writes them
        return {}
    predictions, labels, predicted = result.predictions, result.labels, result.predicted
    pool_labels = pool_set.labels

    # InfEmbed-Rule, opponents, table and figures.
    learning_curve = _stored_curve(curve, result.keys["weights"]) if training is not None else None
    max_accuracy = config.max_accuracy * predictions.accuracy / PAPER_MODEL_ACCURACY if config.scale_max_accuracy \
        else config.max_accuracy
    slices, tree, frame = result.rule(max_accuracy, config.min_size, config.branching, config.max_depth, config.seed)
    metrics = result.coverage(frame)
    out_dir = results_dir(EXPERIMENT, out)
    if frame is not None:
        opponents = result.opponents(frame, config.n_opponents)
        frame["opponents"] = [[int(opp_pos[i]) for i in o] for o, _ in opponents]  # positions in the pool set
        frame["opponent_scores"] = [s for _, s in opponents]
        frame["opponent_labels"] = [[class_names[pool_labels[i]] for i in o] for o in frame["opponents"]]
        frame["opponent_files"] = [[os.path.basename(pool_set.samples[i][0]) for i in o] for o in frame["opponents"]]
        frame["nearest_files"] = [[os.path.basename(analysed.samples[i][0]) for i in row] for row in frame["nearest"]]
        frame["nearest_labels"] = [[f"{class_names[labels[i]]} \u2192 {class_names[predicted[i]]}"
                                    for i in row] for row in frame["nearest"]]
        shown = frame.head(config.figure_slices)
        nearest_images = [[analysed.thumbnail(i) for i in row] for row in shown["nearest"]]
        opponent_images = [[pool_set.thumbnail(i) for i in row] for row in shown["opponents"]]
        frame["nearest_thumbnails"] = None
        frame["opponent_thumbnails"] = None
        for r, row in shown.iterrows():
            frame.at[r, "nearest_thumbnails"] = save_thumbnails(
                nearest_images[r], out_dir, [f"slice{row['slice']}_nearest{k}" for k in range(len(nearest_images[r]))])
            frame.at[r, "opponent_thumbnails"] = save_thumbnails(
                opponent_images[r], out_dir,
                [f"slice{row['slice']}_opponent{k}" for k in range(len(opponent_images[r]))])
        plot_slice_examples(
            shown, out_dir / "figure_slices.png",
            [[(img, cap) for img, cap in zip(imgs, row)] for imgs, row in zip(nearest_images, shown["nearest_labels"])],
            [[(img, cap) for img, cap in zip(imgs, row)]
             for imgs, row in zip(opponent_images, shown["opponent_labels"])],
            title="InfEmbed-Rule slices: label (red) / prediction (blue) distributions; the 4 images nearest the "
                  "slice centre (label \u2192 prediction); the 4 strongest opponents (label)",
        )
        plot_slice_distributions(frame, out_dir / "figure_distributions.png",
                                 title=f"{len(frame)} slices (labels red, predictions blue)")
    else:
        frame = pd.DataFrame(columns=["slice", "size", "accuracy", "n_errors", "label_distribution",
                                      "prediction_distribution", "members"])
    statuses = [node.status for node in tree.walk()]
    summary = {
        "title": "ImageNet-style: InfEmbed-Rule slices of a ResNet-18",
        "experiment": EXPERIMENT,
        "config": {**asdict(config), "layers": list(study.model.head_layers),
                   "effective_max_accuracy": round(max_accuracy, 4), "fit_examples": result.fit_size,
                   "opponent_pool_examples": int(len(result.pool_embeddings))},
        "data_source": {
            "kind": "offline stand-in" if config.source == "tiny" else "canonical",
            "name": "Tiny-ImageNet 30-class subset (../shared/data/tiny-imagenet-subset)" if config.source == "tiny"
            else f"ImageNet validation folder {imagenet_val}",
            "description": (
                f"{len(analysed)} analysed images; "
                + (f"ResNet-18 trained from scratch on {len(train)} training images (64 px); " if train is not None
                   and config.source == "tiny" else "")
                + f"FactorHessian on {result.fit_size} and opponents among {len(result.pool_embeddings)} "
                + ("training images" if pool_set is not analysed else "analysed images")
            ),
        },
        "training": None if training is None else {
            "recipe": f"{len(train)} images, {config.epochs} epochs, batch {config.batch_size}, {config.optimizer} "
                      f"lr {config.lr} ({config.schedule}), weight decay {config.weight_decay}, random 64 px crops "
                      "of the 8 px reflect-padded image and horizontal flips",
            "one_time_cost_s": learning_curve[-1]["elapsed_s"] if learning_curve else None,
            "learning_curve": learning_curve,
            "note": "val_accuracy after each epoch on the analysed (val) images; the epoch count is fixed "
                    "beforehand and the last epoch's weights are used (no selection on val); elapsed_s "
                    "includes these evaluations",
        },
        "metrics": {**metrics, "rule_tree": {s: statuses.count(s) for s in sorted(set(statuses))},
                    "embedding_components": int(result.embeddings.shape[1])},
        "error_pairs": dict(list(errors_by_pair(labels, predicted, class_names).items())[:20]),
        "paper": PAPER,
        "slice_tables": [{"file": "slices.csv", "title": f"InfEmbed-Rule slices (accuracy <= {max_accuracy:.1%}, "
                                                        f">= {config.min_size} examples)"}],
    }
    return write_results(out_dir, frame, summary, started)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = study_config(ImageNetConfig, PAPER_SCALE, args)
    summary = run(config, args.out, args.imagenet_val, args.weights, args.opponent_folder, progress=not args.quiet)
    if not summary:
        return summary
    m = summary["metrics"]
    cost = (summary["training"] or {}).get("one_time_cost_s")
    if cost is not None:
        print(f"trained once in {cost / 60:.1f} min (cached)")
    print(f"ImageNet-style ({summary['data_source']['kind']}): accuracy {m['test_accuracy']:.3f}, rule A = "
          f"{summary['config']['effective_max_accuracy']:.3f}, S = {config.min_size}: {m['n_slices']} slices, "
          f"{m['slice_examples']} examples, slice accuracy {m['slice_accuracy']} (paper: 25 slices, 954 examples, 34.9%)")
    return summary


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.imagenet_resnet18", main))
