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
cross-entropy (the same model family). ``--paper-scale`` (default with ``--device cuda``)
trains the full DenseNet-121 at 224 pixels. The model and its trunk/head split live in
:mod:`harness.models.densenet`.

InfEmbed: K = 3, P = 250, D = 125 with gradients in the paper's layers ``classifier``,
``features.denseblock4.denselayer16.conv1`` and ``...conv2``; FactorHessian is fitted on
the training split and the test split is clustered. The trunk (everything before
``denselayer16``) runs once and its features are cached, so every gradient and
Hessian-vector product runs on the small head; the stages are
:func:`experiments.pipeline.embed`'s. This module keeps what is the study's own: its
data, Table 4 and the figure. Outputs: Table 4 (mean of every disease
label per cluster x {TN, FP, FN, TP}, NaN where a group is empty) as CSV and Markdown,
the accuracy and outcome counts per cluster, and each cluster's label/prediction shares
(``clusters.png``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from harness import FactorConfig
from harness.cache import content_key
from harness.data.covid import load_covid19, patient_split, require_torchxrayvision
from harness.errors import InputError, exit_status
from harness.io import atomic_write_text
from harness.models.densenet import split_densenet, xray_densenet
from harness.options import option
from harness.report.figures import plot_slice_distributions
from harness.train import TrainConfig
from experiments.pipeline import Part, Source, Study, Training, embed, feature_loader, results_dir, study_config, \
    study_parser, write_results

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


@dataclass
class CovidConfig:
    weights: str = option("none", "torchxrayvision weights to fine-tune (e.g. densenet121-res224-all; only if already "
                                  "in its cache), or 'none' to train a DenseNet from scratch")
    image_size: int = option(64, "pixels of the (square) X-rays")
    blocks: str = option("2,2,2,16", "layers of the 4 dense blocks when training from scratch (DenseNet-121: "
                                     "6,12,24,16)")
    epochs: int = option(15, "training epochs")
    lr: float = option(1e-3, "learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    batch_size: int = option(32, "training batch size")
    test_fraction: float = option(0.2, "share of patients in the test split")
    n_clusters: int = option(3, "K: K-Means clusters of the test X-rays")
    arnoldi_dim: int = option(250, "P: Arnoldi iterations (capped at the number of parameters in the layers)")
    embedding_dim: int = option(125, "D: embedding width (at most P)")
    subset: int | None = option(None, "use a seeded random subset of this many X-rays (at least 20)")
    seed: int = option(0, "seeds the subset, the split, the initialisation, training, the Arnoldi start and K-Means")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")


# --paper-scale (default with --device cuda): the paper's DenseNet-121 at 224 pixels.
PAPER_SCALE = dict(image_size=224, blocks="6,12,24,16")


def build_model(config: CovidConfig) -> tuple[torch.nn.Module, bool]:
    """(model, pretrained): the seeded DenseNet with a 2-way classifier."""
    torch.manual_seed(config.seed)
    if config.weights != "none":
        return xray_densenet(config.weights), True
    try:
        blocks = tuple(int(b) for b in config.blocks.split(","))
    except ValueError:
        raise InputError(f"blocks must be 4 positive layer counts, e.g. 2,2,2,16; got {config.blocks!r}") from None
    return xray_densenet("none", blocks), False


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
    split = split_densenet(model, PAPER_LAYERS)
    n_params = sum(p.numel() for n, p in split.head.named_parameters() if n.startswith(PAPER_LAYERS))
    arnoldi_dim = min(config.arnoldi_dim, n_params)
    data = {name: (images[rows], targets[rows]) for name, rows in (("train", train), ("test", test))}
    study = Study(
        name=EXPERIMENT, model=split, class_names=["not COVID-19", TARGET],
        sources={name: Source(feature_loader(x, y, 64), content_key(x, y)) for name, (x, y) in data.items()},
        fit=Part("train"), analysed=Part("test"),
        training=Training(TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                                      seed=config.seed, device=config.device),
                          loader=feature_loader(*data["train"], config.batch_size, shuffle=True, seed=config.seed),
                          data_key=content_key(*data["train"]), settings={"batch_size": config.batch_size}),
        factors=FactorConfig(arnoldi_dim=arnoldi_dim, embedding_dim=min(config.embedding_dim, arnoldi_dim),
                             seed=config.seed),
        batch_size=64, device=config.device,
    )
    result = embed(study, progress)
    embeddings, prediction = result.embeddings, result.predictions
    if not result.writes_results:  # another rank of a torchrun job writes them
        return {}
    clusters, frame = result.kmeans(config.n_clusters, config.seed)

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


def build_parser():
    parser = study_parser(CovidConfig, __doc__, "python -m experiments.covid_xray", PAPER_SCALE)
    parser.add_argument("--covid-root", default=None, help="clone of ieee8023/covid-chestxray-dataset (default: shared)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    summary = run(study_config(CovidConfig, PAPER_SCALE, args), args.out, args.covid_root, progress=not args.quiet)
    if summary:
        print(json.dumps({k: summary[k] for k in ("model", "test_accuracy", "majority_class_accuracy", "outcomes",
                                                  "clusters")}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.covid_xray", main))
