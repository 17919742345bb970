"""InfEmbed on the COVID-19 chest X-ray collection (paper, appendix H; Table 4).

Data: torchxrayvision's ``COVID19_Dataset`` over the shared ``covid-chestxray`` folder
(or ``--covid-root``, a clone of ieee8023/covid-chestxray-dataset), frontal views, rows
without an image file removed; the target is the binary COVID-19 label; the other
disease labels of the dataset describe the clusters. Images are centre-cropped, resized
and scaled to [-1024, 1024] (torchxrayvision's normalisation). Train/test split by
patient (paper: a test set of 107 of 535 images).

Model: torchxrayvision's ``DenseNet`` class with a 2-way classifier. The paper fine-tunes
torchxrayvision's pretrained weights; those are downloaded at run time, which is not
possible here, so ``--weights densenet121-res224-all`` is used only when the file is
already in torchxrayvision's cache. Otherwise (the offline default) the model is
**trained here from scratch**, and to fit a CPU it is a reduced DenseNet: dense blocks of
(2, 2, 2, 16) layers (DenseNet-121: 6, 12, 24, 16) at 64 x 64 pixels. Block 4 keeps 16
layers, so the paper's layers exist under the paper's names. The summary says which
model was used. Cross-entropy over 2 logits stands in for the paper's 1-logit binary
cross-entropy (the same model family).

InfEmbed: K = 3, P = 250, D = 125 with gradients in the paper's layers ``classifier``,
``features.denseblock4.denselayer16.conv1`` and ``...conv2``; FactorHessian is fitted on
the training split and the test split is clustered. The trunk (everything before
``denselayer16``) runs once and its features are cached, so every gradient and
Hessian-vector product runs on the small head. Outputs: Table 4 (mean of every disease
label per cluster x {TN, FP, FN, TP}, NaN where a group is empty) as CSV and Markdown,
the accuracy and outcome counts per cluster, and each cluster's label/prediction shares
(``clusters.png``).
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
from torch import nn
from tqdm.auto import tqdm

from harness import kmeans_slices, summarize_slices
from harness.data.covid import require_torchxrayvision, load_covid19, patient_split
from harness.errors import InputError
from harness.io import atomic_write_text
from harness.models import compute_features
from harness.paths import cache_dir
from harness.report.figures import plot_slice_distributions
from harness.train import TrainConfig, cached_training, config_key, predict, train_model
from experiments.common import (
    cached_embedder,
    cached_embeddings,
    feature_loader,
    results_dir,
    state_key,
    write_results,
)

EXPERIMENT = "covid_xray"
TARGET = "COVID-19"
OUTCOMES = ("TN", "FP", "FN", "TP")
PAPER_LAYERS = ("classifier", "features.denseblock4.denselayer16.conv1", "features.denseblock4.denselayer16.conv2")
PAPER = {
    "data": "torchxrayvision COVID19_Dataset, 535 images, 342 COVID-19 positive; test set of 107",
    "model": "torchxrayvision pretrained model, fine-tuned (binary cross-entropy), 224 x 224",
    "test_accuracy": 0.766,
    "K": 3, "P": 250, "D": 125, "layers": list(PAPER_LAYERS),
    "clusters": "C1: accuracy 85%, most correct predictions, 5 FP and 9 FN; C2: 4 FP + 2 TN; C3: 6 FP + 1 FN",
    "finding": "false positives in all clusters tend to have pneumonia and tuberculosis but not COVID-19",
}
SMALL_BLOCKS = (2, 2, 2, 16)
DENSENET121_BLOCKS = (6, 12, 24, 16)


@dataclass
class CovidConfig:
    weights: str = "none"
    image_size: int = 64
    blocks: str = "2,2,2,16"
    epochs: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    test_fraction: float = 0.2
    n_clusters: int = 3
    arnoldi_dim: int = 250
    embedding_dim: int = 125
    subset: int | None = None
    seed: int = 0
    device: str = "cpu"


class DenseNetHead(nn.Module):
    """The last dense layer, the final norm and the classifier of a torchxrayvision DenseNet,
    under the model's own names (``features.denseblock4.denselayer16.conv1``, ...), fed the
    concatenated features of layers 1-15 of block 4. Shares its modules with the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        block = model.features.denseblock4
        self.last = f"denselayer{len(block)}"
        self.features = nn.Module()
        self.features.denseblock4 = nn.Module()
        self.features.denseblock4.add_module(self.last, getattr(block, self.last))
        self.features.norm5 = model.features.norm5
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = getattr(self.features.denseblock4, self.last)(features)  # returns cat([input, new features])
        x = torch.relu(self.features.norm5(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseNetTrunk(nn.Module):
    """Everything of a torchxrayvision DenseNet before the last dense layer of block 4."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for name, module in self.model.features.named_children():
            if name == "denseblock4":
                for layer in list(module.children())[:-1]:
                    x = layer(x)
                return x
            x = module(x)
        raise InputError("the model has no features.denseblock4")


def build_model(config: CovidConfig) -> tuple[nn.Module, bool]:
    """(model, pretrained): the DenseNet with a 2-way classifier."""
    xrv = require_torchxrayvision()
    torch.manual_seed(config.seed)
    if config.weights != "none":
        if config.weights not in xrv.models.model_urls:
            raise InputError(f"unknown torchxrayvision weights {config.weights!r}")
        cached = Path(xrv.utils.get_cache_dir()).expanduser() / Path(xrv.models.model_urls[config.weights]["weights_url"]).name
        if not cached.is_file():
            raise InputError(
                f"torchxrayvision weights {config.weights!r} are not in its cache ({cached}) and cannot be "
                "downloaded here; use --weights none to train from scratch"
            )
        model = xrv.models.DenseNet(weights=config.weights)
        model.classifier = nn.Linear(model.classifier.in_features, 2)
        model.op_threshs = None
        if hasattr(model, "input_resolution"):
            # Its forward checks the input's resolution and range, which vmap cannot trace.
            del model.input_resolution
        return model, True
    blocks = tuple(int(b) for b in config.blocks.split(","))
    if len(blocks) != 4 or min(blocks) < 1:
        raise InputError(f"blocks must be 4 positive layer counts, e.g. 2,2,2,16; got {config.blocks!r}")
    return xrv.models.DenseNet(weights=None, num_classes=2, block_config=blocks), False


def load_images(config: CovidConfig, root: str | None, progress: bool = True):
    """(images (N, 1, S, S) in [-1024, 1024], COVID-19 targets, all disease labels, pathology names, patient ids)."""
    xrv = require_torchxrayvision()
    from torchvision.transforms import Compose

    transform = Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(config.image_size, engine="skimage")])
    dataset = load_covid19(root, transform=transform)
    pathologies = list(dataset.pathologies)
    if TARGET not in pathologies:
        raise InputError(f"the dataset has no {TARGET!r} label; it has {pathologies}")
    chosen = np.arange(len(dataset))
    if config.subset is not None:
        if config.subset < 20:
            raise InputError(f"subset must be >= 20 images; got {config.subset}")
        chosen = np.sort(np.random.default_rng(config.seed).permutation(len(dataset))[: config.subset])
    images = torch.stack([torch.from_numpy(dataset[int(i)]["img"]).float()
                          for i in tqdm(chosen, desc="load X-rays", disable=not progress, leave=False)])
    labels = np.asarray(dataset.labels, dtype=np.float32)[chosen]
    targets = torch.as_tensor(labels[:, pathologies.index(TARGET)], dtype=torch.long)
    patients = dataset.csv["patientid"].astype(str).to_numpy()[chosen]
    return images, targets, labels, pathologies, patients


def outcome_names(targets: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """TN/FP/FN/TP of every example (positive = COVID-19)."""
    return np.asarray(OUTCOMES)[2 * np.asarray(targets, dtype=int) + np.asarray(predicted, dtype=int)]


def table4(labels: np.ndarray, pathologies: list[str], clusters: np.ndarray, outcomes: np.ndarray,
           n_clusters: int) -> pd.DataFrame:
    """Mean of every disease label per (outcome, cluster); NaN where no example falls in the group."""
    columns = pd.MultiIndex.from_product([OUTCOMES, [f"C{c + 1}" for c in range(n_clusters)]])
    table = pd.DataFrame(np.nan, index=pathologies, columns=columns)
    for outcome in OUTCOMES:
        for c in range(n_clusters):
            members = (outcomes == outcome) & (clusters == c)
            if members.any():
                table[(outcome, f"C{c + 1}")] = labels[members].mean(axis=0)
    return table


def run(config: CovidConfig, out: str | None = None, root: str | None = None, progress: bool = True) -> dict:
    started = time.time()
    images, targets, labels, pathologies, patients = load_images(config, root, progress)
    train, test = patient_split(patients, config.test_fraction, config.seed)
    model, pretrained = build_model(config)
    train_config = TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                               seed=config.seed, device=config.device)
    data_key = config_key({"n": len(targets), "size": config.image_size, "subset": config.subset,
                           "test": test.tolist(), "root": str(root)})
    train_loader = feature_loader(images[train], targets[train], config.batch_size, shuffle=True, seed=config.seed)
    model, _ = cached_training(
        model, lambda m: train_model(m, train_loader, train_config, progress=progress),
        cache_dir(EXPERIMENT, "models"),
        {"data": data_key, "weights": config.weights, "architecture": str(model), "train": asdict(train_config),
         "batch_size": config.batch_size},
    )
    model.to(config.device)
    train_eval = feature_loader(images[train], targets[train], 64)
    test_eval = feature_loader(images[test], targets[test], 64)
    prediction = predict(model, test_eval, device=config.device, progress=progress)

    trunk = DenseNetTrunk(model)
    head = DenseNetHead(model)
    train_features, train_targets = compute_features(trunk, train_eval, model, config.device, progress)
    test_features, test_targets = compute_features(trunk, test_eval, model, config.device, progress)
    key = {"weights": state_key(model), "data": data_key}
    n_params = sum(p.numel() for n, p in head.named_parameters() if n.startswith(PAPER_LAYERS))
    arnoldi_dim = min(config.arnoldi_dim, n_params)
    embedding_dim = min(config.embedding_dim, arnoldi_dim)
    embedder = cached_embedder(
        EXPERIMENT, head, PAPER_LAYERS, feature_loader(train_features, train_targets, 64), key,
        arnoldi_dim=arnoldi_dim, embedding_dim=embedding_dim, seed=config.seed, device=config.device,
        progress=progress,
    )
    embeddings = cached_embeddings(
        EXPERIMENT, embedder, feature_loader(test_features, test_targets, 64),
        {**key, "P": arnoldi_dim, "D": embedding_dim, "seed": config.seed, "split": "test"},
    )
    clusters, _ = kmeans_slices(embeddings, config.n_clusters, config.seed)

    y = targets[test].numpy()
    predicted = prediction.predicted
    outcomes = outcome_names(y, predicted)
    table = table4(labels[test], pathologies, clusters, outcomes, config.n_clusters)
    out_dir = results_dir(EXPERIMENT, out)
    flat = table.copy()
    flat.columns = [f"{o}_{c}" for o, c in table.columns]
    atomic_write_text(flat.round(4).to_csv(index_label="label"), out_dir / "table4.csv")
    atomic_write_text(flat.round(2).to_markdown() + "\n", out_dir / "table4.md")
    per_cluster = pd.DataFrame([
        {"cluster": f"C{c + 1}", "size": int((clusters == c).sum()),
         "accuracy": round(float(prediction.correct[clusters == c].mean()), 4),
         **{o: int(((clusters == c) & (outcomes == o)).sum()) for o in OUTCOMES}}
        for c in range(config.n_clusters)
    ])
    atomic_write_text(per_cluster.to_csv(index=False), out_dir / "clusters.csv")
    frame = summarize_slices(clusters, embeddings, y, predicted, class_names=["not COVID-19", TARGET])
    frame["slice"] = [f"C{s + 1}" for s in frame["slice"]]
    plot_slice_distributions(frame, out_dir / "clusters.png", max_classes=2,
                             title=f"InfEmbed (K = {config.n_clusters}) on the COVID-19 test X-rays: labels vs predictions")
    summary = {
        "experiment": EXPERIMENT,
        "data_source": {"kind": "canonical" if pretrained else "offline stand-in",
                        "description": f"COVID-19 chest X-ray collection ({root or 'offline copy in the shared data folder'}); "
                                       + ("pretrained torchxrayvision weights" if pretrained
                                          else "model trained here from scratch, no pretrained weights")},
        "data": {"n_images": int(len(targets)), "n_train": int(len(train)), "n_test": int(len(test)),
                 "covid_positive": int(targets.sum()), "test_covid_positive": int(y.sum()),
                 "pathologies": pathologies},
        "model": {
            "architecture": "torchxrayvision DenseNet-121" if pretrained or config.blocks == "6,12,24,16"
            else f"torchxrayvision DenseNet, dense blocks ({config.blocks}) (reduced DenseNet-121)",
            "pretrained": pretrained,
            "weights": config.weights if pretrained else "none: trained here from scratch",
            "image_size": config.image_size,
        },
        "config": asdict(config),
        "influence": {"layers": list(PAPER_LAYERS), "n_parameters": int(n_params), "P": arnoldi_dim,
                      "D": int(embeddings.shape[1]), "K": config.n_clusters, "hessian_fit": "training split"},
        "test_accuracy": round(prediction.accuracy, 4),
        "majority_class_accuracy": round(float(max(y.mean(), 1 - y.mean())), 4),
        "outcomes": {o: int((outcomes == o).sum()) for o in OUTCOMES},
        "clusters": per_cluster.to_dict(orient="records"),
        "paper": PAPER,
    }
    return write_results(out_dir, frame, summary, started)


def build_parser() -> argparse.ArgumentParser:
    defaults = CovidConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m experiments.covid_xray")
    parser.add_argument("--out", default=None, help="results folder (default: results/covid_xray)")
    parser.add_argument("--covid-root", default=None, help="clone of ieee8023/covid-chestxray-dataset (default: shared)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for f in fields(CovidConfig):
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, help=f"default {default}")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = CovidConfig(**{f.name: getattr(args, f.name) for f in fields(CovidConfig)})
    summary = run(config, args.out, args.covid_root, progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("model", "test_accuracy", "majority_class_accuracy", "outcomes",
                                              "clusters")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
