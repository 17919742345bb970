"""Slice-discovery problems from any labeled dataset, following dcbench's protocol.

dcbench (Eyuboglu et al., 2022) makes a model fail on a known sub-group ("slice") by
manipulating its *training* data, then asks a slice-discovery method to find that
sub-group among the test errors. This module does the same for any labeled data:

``rare``
    A sub-group (e.g. one fine class inside a coarse class) is down-sampled in training
    to ``rare_keep`` of its size. Ground-truth slice: the sub-group's test examples.
``correlation``
    A binary attribute that is *not* a function of the class (stroke thickness, X-ray
    sex or view, recording source) is made to agree with the label in training: inside
    the target class only ``1 - correlation`` of the examples have attribute 0, outside
    it only ``1 - correlation`` have attribute 1. Ground-truth slice: test examples of the
    target class with attribute 0 (the model learnt "attribute 0 -> not this class").
``noisy_label``
    Inside a sub-group, training labels are flipped with probability ``noise_rate`` to one
    other class (chosen per problem by its seed). Ground-truth slice: the sub-group's
    test examples.

Problems are not ceiling tests: the test set keeps every non-slice example of the test
pool and only enough slice members that the slice is ``slice_share`` of the test set
(dcbench's slices are a few percent of the test set), so many of the model's test errors
lie outside the slice. :func:`slice_statistics` reports the slice's share of the test
set and of the errors and the model's accuracy inside and outside it.

Typical use on your own data::

    data = LabeledData(inputs, labels, groups=fine_labels, attributes={"thick": thick})
    problem = make_problem(data, ProblemSpec("rare", target=3, seed=0))
    model = train_problem_model(problem, data, lambda: small_conv_net(1, 28, data.n_classes),
                                TrainConfig(epochs=5), model_name="conv28")

Where a dataset has no sub-group labels, :func:`merge_classes` merges fine classes into
coarse ones and the fine class becomes the sub-group, as dcbench does with the ImageNet
hierarchy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.errors import InputError
from harness.io import atomic_savez
from harness.paths import cache_dir
from harness.train import Predictions, TrainConfig, cached_training, train_model

KINDS = ("rare", "correlation", "noisy_label")


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class LabeledData:
    """A labeled dataset to build problems from.

    inputs : (N, ...) float32 model inputs.
    labels : (N,) class index in 0..C-1 (the task the model learns).
    groups : (N,) sub-group id per example (e.g. the fine class), or None.
    attributes : name -> (N,) 0/1 array, candidate spurious attributes.
    raw : (N, d) a fixed, label-free representation for task-agnostic baselines
          (default: the flattened inputs).
    """

    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    attributes: Mapping[str, np.ndarray] = field(default_factory=dict)
    name: str = "data"
    group_names: tuple[str, ...] | None = None

    def __post_init__(self):
        n = len(self.labels)
        if np.asarray(self.inputs).shape[0] != n:
            raise InputError(f"{self.name}: {np.asarray(self.inputs).shape[0]} inputs but {n} labels")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"{self.name}: labels must be a 1-D array of class indices >= 0")
        if self.groups is not None and np.asarray(self.groups).shape != (n,):
            raise InputError(f"{self.name}: groups must have shape ({n},)")
        for name, values in self.attributes.items():
            values = np.asarray(values)
            if values.shape != (n,) or not np.isin(values, (0, 1)).all():
                raise InputError(f"{self.name}: attribute {name!r} must be a 0/1 array of shape ({n},)")

    @property
    def n_classes(self) -> int:
        return int(np.asarray(self.labels).max()) + 1

    def raw_features(self) -> np.ndarray:
        return np.asarray(self.inputs, dtype=np.float32).reshape(len(self.labels), -1)

    def group_name(self, group: int) -> str:
        return self.group_names[group] if self.group_names is not None else str(group)


def merge_classes(fine_labels: np.ndarray, n_coarse: int, seed: int) -> np.ndarray:
    """Randomly partitions the fine classes into ``n_coarse`` coarse classes of near-equal
    numbers of fine classes; returns the coarse label of every example."""
    fine_labels = np.asarray(fine_labels)
    fine = np.unique(fine_labels)
    if not 2 <= n_coarse <= len(fine):
        raise InputError(f"n_coarse must be in [2, {len(fine)}] (the number of fine classes); got {n_coarse}")
    order = np.random.default_rng(seed).permutation(len(fine))
    coarse_of_fine = np.empty(len(fine), dtype=np.int64)
    coarse_of_fine[order] = np.arange(len(fine)) % n_coarse
    return coarse_of_fine[np.searchsorted(fine, fine_labels)]


def median_split(values: np.ndarray, within: np.ndarray) -> np.ndarray:
    """1 where ``values`` exceeds the median of its ``within`` group (e.g. its fine class),
    so the attribute is balanced inside every group and not a function of the class."""
    values, within = np.asarray(values, dtype=np.float64), np.asarray(within)
    out = np.zeros(len(values), dtype=np.int64)
    for g in np.unique(within):
        members = within == g
        out[members] = values[members] > np.median(values[members])
    return out


# ---------------------------------------------------------------- problems
@dataclass(frozen=True)
class ProblemSpec:
    """One manipulation.

    kind : "rare", "correlation" or "noisy_label".
    target : the sub-group id (rare, noisy_label) or the class index (correlation).
    attribute : the attribute name (correlation only).
    seed : seeds the train/test split, the sub-sampling and the label flips.
    slice_share : the ground-truth slice's share of the test set.
    train_fraction : share of the data in the training pool (the rest is the test pool).
    rare_keep, noise_rate, correlation : strength of each manipulation.
    max_test : caps the test set size (keeps slicers cheap on large test pools).
    """

    kind: str
    target: int
    seed: int
    attribute: str | None = None
    slice_share: float = 0.03
    train_fraction: float = 0.6
    rare_keep: float = 0.05
    noise_rate: float = 0.5
    correlation: float = 0.95
    max_test: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if (self.kind == "correlation") != (self.attribute is not None):
            raise InputError("a correlation problem needs an attribute, and only it takes one")
        for name in ("slice_share", "train_fraction", "rare_keep", "noise_rate", "correlation"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1]; got {value}")
        if not 0.0 < self.slice_share < 1.0 or not 0.0 < self.train_fraction < 1.0:
            raise InputError("slice_share and train_fraction must be strictly between 0 and 1")
        if self.max_test is not None and self.max_test < 2:
            raise InputError(f"max_test must be >= 2 or None; got {self.max_test}")


@dataclass
class SliceProblem:
    """A manipulated training set, a test set and its ground-truth slice.

    Indices point into the :class:`LabeledData` the problem was made from;
    ``train_labels`` are the (possibly flipped) labels the model is trained on.
    """

    spec: ProblemSpec
    data_name: str
    train_index: np.ndarray
    train_labels: np.ndarray
    test_index: np.ndarray
    test_labels: np.ndarray
    test_slice: np.ndarray
    description: str

    @property
    def key(self) -> dict:
        return {"data": self.data_name, **asdict(self.spec)}


def _slice_members(data: LabeledData, spec: ProblemSpec) -> np.ndarray:
    labels = np.asarray(data.labels)
    if spec.kind == "correlation":
        if spec.attribute not in data.attributes:
            raise InputError(f"{data.name} has no attribute {spec.attribute!r}; it has {sorted(data.attributes)}")
        if not 0 <= spec.target < data.n_classes:
            raise InputError(f"correlation target must be a class in [0, {data.n_classes}); got {spec.target}")
        return (labels == spec.target) & (np.asarray(data.attributes[spec.attribute]) == 0)
    if data.groups is None:
        raise InputError(f"{spec.kind} problems need sub-group labels: {data.name} has groups=None")
    members = np.asarray(data.groups) == spec.target
    if not members.any():
        raise InputError(f"{data.name} has no sub-group {spec.target}")
    return members


def make_problem(data: LabeledData, spec: ProblemSpec) -> SliceProblem:
    """Splits ``data`` into train/test pools, applies ``spec``'s manipulation to the
    training pool and builds a test set whose slice is ``spec.slice_share`` of it."""
    rng = np.random.default_rng(spec.seed)
    labels = np.asarray(data.labels)
    n = len(labels)
    in_slice = _slice_members(data, spec)
    order = rng.permutation(n)
    is_train = np.zeros(n, dtype=bool)
    is_train[order[: int(round(spec.train_fraction * n))]] = True

    keep = is_train.copy()
    if spec.kind == "rare":
        drop = np.flatnonzero(is_train & in_slice)
        rng.shuffle(drop)
        keep[drop[int(round(spec.rare_keep * len(drop))):]] = False
    elif spec.kind == "correlation":
        attribute = np.asarray(data.attributes[spec.attribute])
        in_class = labels == spec.target
        # Keep the minority combination at 1 - correlation of its class in training.
        for class_mask, minority_value in ((in_class, 0), (~in_class, 1)):
            majority = np.flatnonzero(is_train & class_mask & (attribute != minority_value))
            minority = np.flatnonzero(is_train & class_mask & (attribute == minority_value))
            wanted = int(round(len(majority) * (1 - spec.correlation) / max(spec.correlation, 1e-12)))
            rng.shuffle(minority)
            keep[minority[wanted:]] = False
    train_index = np.flatnonzero(keep)
    train_labels = labels[train_index].copy()
    flipped_to = None
    if spec.kind == "noisy_label":
        group_class = np.bincount(labels[in_slice]).argmax()
        others = [c for c in range(data.n_classes) if c != group_class]
        flipped_to = int(rng.choice(others))
        members = np.flatnonzero(in_slice[train_index])
        flip = members[rng.random(len(members)) < spec.noise_rate]
        train_labels[flip] = flipped_to

    pool = ~is_train
    slice_pool = np.flatnonzero(pool & in_slice)
    rest = np.flatnonzero(pool & ~in_slice)
    if spec.max_test is not None and len(rest) > spec.max_test * (1 - spec.slice_share):
        rest = np.sort(rng.choice(rest, size=int(round(spec.max_test * (1 - spec.slice_share))), replace=False))
    wanted = int(round(spec.slice_share / (1 - spec.slice_share) * len(rest)))
    if wanted > len(slice_pool):  # too few slice members: shrink the rest instead
        rest = rng.choice(rest, size=int(round(len(slice_pool) * (1 - spec.slice_share) / spec.slice_share)),
                          replace=False)
        wanted = len(slice_pool)
    if wanted < 1:
        raise InputError(f"{data.name}: problem {spec} leaves no slice member in the test set")
    chosen = rng.choice(slice_pool, size=wanted, replace=False)
    test_index = np.sort(np.concatenate([chosen, rest]))
    what = {
        "rare": f"sub-group {data.group_name(spec.target)} kept at {spec.rare_keep:.0%} in training",
        "correlation": f"class {spec.target} has {spec.attribute}=1 in {spec.correlation:.0%} of training examples "
        f"(other classes {spec.attribute}=0); slice = class {spec.target} with {spec.attribute}=0",
        "noisy_label": f"sub-group {data.group_name(spec.target)} relabelled to class {flipped_to} "
        f"with probability {spec.noise_rate:.0%} in training",
    }[spec.kind]
    return SliceProblem(
        spec=spec,
        data_name=data.name,
        train_index=train_index,
        train_labels=train_labels,
        test_index=test_index,
        test_labels=labels[test_index],
        test_slice=in_slice[test_index],
        description=f"{data.name} {spec.kind}: {what}",
    )


# ---------------------------------------------------------------- models
class SmallNet(nn.Module):
    """``features`` -> ``hidden`` (Linear + ReLU, the penultimate activations) -> ``classifier``."""

    def __init__(self, features: nn.Module, n_features: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.features = features
        self.hidden = nn.Linear(n_features, hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(self.features(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.penultimate(x))


def small_conv_net(channels: int, size: int, n_classes: int) -> SmallNet:
    """Two strided convolutions for (channels, size, size) images: a CPU-cheap CNN."""
    features = nn.Sequential(
        nn.Conv2d(channels, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten()
    )
    n_features = features(torch.zeros(1, channels, size, size)).shape[1]
    return SmallNet(features, n_features, n_classes)


def small_series_net(channels: int, length: int, n_classes: int) -> SmallNet:
    """Two strided 1-D convolutions and average pooling for (channels, length) series."""
    features = nn.Sequential(
        nn.Conv1d(channels, 8, 7, stride=2), nn.ReLU(), nn.Conv1d(8, 16, 5, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(8), nn.Flatten(),
    )
    n_features = features(torch.zeros(1, channels, length)).shape[1]
    return SmallNet(features, n_features, n_classes)


def problem_loader(data: LabeledData, index: np.ndarray, labels: np.ndarray, batch_size: int = 256,
                   shuffle_seed: int | None = None) -> DataLoader:
    """A loader of (inputs, labels) batches; shuffled (seeded) only when ``shuffle_seed`` is given."""
    dataset = TensorDataset(torch.as_tensor(np.asarray(data.inputs)[index], dtype=torch.float32),
                            torch.as_tensor(labels, dtype=torch.long))
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator)


def train_problem_model(
    problem: SliceProblem,
    data: LabeledData,
    make_model: Callable[[], nn.Module],
    config: TrainConfig,
    model_name: str,
    batch_size: int = 256,
    progress: bool = False,
) -> nn.Module:
    """Trains ``make_model()`` on the problem's manipulated training set with the harness's
    one training loop; the weights are cached under ``.cache/problems`` keyed by the
    problem, the model name and the training configuration."""
    torch.manual_seed(config.seed)
    model = make_model()
    loader = problem_loader(data, problem.train_index, problem.train_labels, batch_size=batch_size,
                            shuffle_seed=problem.spec.seed)
    key = {**problem.key, "model": model_name, "batch_size": batch_size, "train": asdict(config)}
    model, _ = cached_training(model, lambda m: train_model(m, loader, config, progress=progress),
                               cache_dir("problems"), key)
    return model


# ---------------------------------------------------------------- reporting
def slice_statistics(problem: SliceProblem, predictions: Predictions) -> dict:
    """The slice's share of the test set and of the errors; accuracy inside and outside it."""
    correct = predictions.correct
    in_slice = problem.test_slice
    if len(correct) != len(in_slice):
        raise InputError(f"{len(correct)} predictions for a test set of {len(in_slice)}")
    errors = ~correct
    return {
        "n_test": int(len(in_slice)),
        "n_slice": int(in_slice.sum()),
        "slice_share_of_test": float(in_slice.mean()),
        "slice_share_of_errors": float(errors[in_slice].sum() / max(errors.sum(), 1)),
        "accuracy_in_slice": float(correct[in_slice].mean()),
        "accuracy_outside_slice": float(correct[~in_slice].mean()),
        "accuracy": float(correct.mean()),
    }


# ---------------------------------------------------------------- the offline mini-dcbench
INPUT_TYPES = ("natural_images", "medical_images", "medical_time_series")


@dataclass
class Suite:
    """The data, model and training recipe of one input type of the mini-dcbench."""

    input_type: str
    data: LabeledData
    make_model: Callable[[], nn.Module]
    model_name: str
    train_config: TrainConfig
    source: str
    correlation_attribute: str
    defaults: dict = field(default_factory=dict)
    target_classes: tuple[int, ...] | None = None  # classes whose sub-groups may be rare/noisy targets
    batch_size: int = 256

    def eligible_targets(self, kind: str, min_members: int = 40) -> list[int]:
        """Sub-groups (rare, noisy_label) or classes (correlation) with enough examples."""
        labels = np.asarray(self.data.labels)
        if kind == "correlation":
            attribute = np.asarray(self.data.attributes[self.correlation_attribute])
            return [c for c in range(self.data.n_classes)
                    if min(((labels == c) & (attribute == v)).sum() for v in (0, 1)) >= min_members]
        groups = np.asarray(self.data.groups)
        out = []
        for g in np.unique(groups):
            members = groups == g
            group_class = np.bincount(labels[members]).argmax()
            if members.sum() >= min_members and (self.target_classes is None or group_class in self.target_classes):
                out.append(int(g))
        return out

    def specs(self, kind: str, n_problems: int, first_seed: int) -> list[ProblemSpec]:
        """``n_problems`` problems cycling over the eligible targets, seeds from ``first_seed``."""
        targets = self.eligible_targets(kind)
        if not targets:
            raise InputError(f"{self.data.name}: no eligible target for {kind} problems")
        attribute = self.correlation_attribute if kind == "correlation" else None
        return [ProblemSpec(kind, targets[i % len(targets)], first_seed + i, attribute=attribute, **self.defaults)
                for i in range(n_problems)]


def _mnist_suite(split: str) -> Suite:
    from harness.data.mnist import load_mnist, load_sklearn_digits, stroke_attributes
    from harness.paths import dataset_available

    have_mnist = dataset_available("mnist")
    images = load_mnist() if have_mnist else load_sklearn_digits()
    attributes = stroke_attributes(images.images)
    fine = images.labels
    # Reported and development problems use different coarse tasks, so their sub-groups
    # (a digit inside its coarse class) differ.
    coarse = merge_classes(fine, 5, seed=0 if split == "report" else 1)
    size = images.images.shape[-1]
    data = LabeledData(
        inputs=(images.images[:, None].astype(np.float32) / 255.0),
        labels=coarse,
        groups=fine,
        attributes={"thick": median_split(attributes["ink"], fine),
                    "right_slant": median_split(attributes["slant"], fine)},
        # The data name keys the model cache: the fallback digits must not share MNIST's models.
        name=f"{'mnist' if have_mnist else 'sklearn-digits'}-coarse{'' if split == 'report' else '-dev'}",
        group_names=tuple(f"digit {d}" for d in range(10)),
    )
    # The fallback's 1,797 digits get as many optimizer steps as MNIST's 10,000 images in 5 epochs.
    epochs = 5 if have_mnist else round(5 * 10_000 / len(fine))
    return Suite("natural_images", data, lambda: small_conv_net(1, size, 5), f"conv{size}",
                 TrainConfig(epochs=epochs, lr=3e-3, seed=0), images.source,
                 "thick" if split == "report" else "right_slant", defaults={"max_test": 1500})


def _covid_suite(split: str, size: int = 48) -> Suite:
    xrays = covid_xrays(size)
    covid = xrays["covid"]
    view = xrays["view"]
    female = xrays["female"]
    if split == "report":
        names = [f"{'COVID' if c else 'other'} {'PA' if v == 'PA' else 'AP'}" for c, v in zip(covid, view)]
    else:
        names = [f"{'COVID' if c else 'other'} {'F' if f else 'M'}" for c, f in zip(covid, female)]
    group_names, groups = np.unique(names, return_inverse=True)
    data = LabeledData(
        inputs=xrays["images"][:, None],
        labels=covid.astype(np.int64),
        groups=groups,
        attributes={"female": female.astype(np.int64), "view_pa": (view == "PA").astype(np.int64)},
        name=f"covid-xray{size}{'' if split == 'report' else '-dev'}",
        group_names=tuple(group_names),
    )
    # ~500 images: a larger test share and slice share keep >= ~12 slice members. The
    # small CNN mostly predicts the majority class (COVID), so down-sampling or relabelling a
    # COVID sub-group causes no error: rare / noisy targets are sub-groups of the other class.
    return Suite("medical_images", data, lambda: small_conv_net(1, size, 2), f"conv{size}",
                 TrainConfig(epochs=30, lr=3e-3, seed=0), "COVID-19 chest X-rays (shared data)",
                 "female" if split == "report" else "view_pa",
                 defaults={"train_fraction": 0.5, "slice_share": 0.05}, target_classes=(0,), batch_size=32)


def _ecg_suite(split: str, length: int = 96) -> Suite:
    from harness.data.timeseries import pooled_ecg

    pooled = pooled_ecg(length)
    fine_names, fine = np.unique(pooled.labels, return_inverse=True)
    counts = np.bincount(fine)
    keep = counts[fine] >= 50  # ECG5000's three tiny classes (31 series) cannot hold a slice
    fine_names = fine_names[counts >= 50]
    _, fine = np.unique(fine[keep], return_inverse=True)
    sources = pooled.sources[keep]
    coarse = merge_classes(fine, 4, seed=0 if split == "report" else 1)
    source_group = ("TwoLeadECG", "ECG200") if split == "report" else ("TwoLeadECG", "ECG5000")
    data = LabeledData(
        inputs=pooled.series[keep],
        labels=coarse,
        groups=fine,
        attributes={"source": np.isin(sources, source_group).astype(np.int64)},
        name=f"ecg-pooled{'' if split == 'report' else '-dev'}",
        group_names=tuple(str(n) for n in fine_names),
    )
    return Suite("medical_time_series", data, lambda: small_series_net(1, length, 4), f"series{length}",
                 TrainConfig(epochs=20, lr=3e-3, seed=0), pooled.description, "source")


def mini_dcbench_suite(input_type: str, split: str = "report") -> Suite:
    """The mini-dcbench data of one input type; ``split="dev"`` gives the development
    variant (different coarse task / sub-groups / attribute) used to choose settings."""
    from harness.paths import has_dataset

    if split not in ("report", "dev"):
        raise InputError(f"split must be 'report' or 'dev'; got {split!r}")
    if input_type == "natural_images":
        return _mnist_suite(split)
    if input_type == "medical_images":
        if not has_dataset("covid-chestxray"):
            raise InputError("medical images need the shared covid-chestxray folder (no PyPI fallback exists)")
        return _covid_suite(split)
    if input_type == "medical_time_series":
        if not has_dataset("timeseries"):
            raise InputError("medical time series need the shared timeseries folder (no PyPI fallback exists)")
        return _ecg_suite(split)
    raise InputError(f"input_type must be one of {INPUT_TYPES}; got {input_type!r}")


def covid_xrays(size: int) -> dict[str, np.ndarray]:
    """Frontal COVID-19 X-rays with known sex and view, grayscale, resized to size x size,
    in [0, 1]; cached under .cache/covid. Keys: images, covid, female, view."""
    import pandas as pd
    from PIL import Image

    from harness.data.covid import covid_root

    cache = cache_dir("covid") / f"xrays{size}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    folder = covid_root()
    meta = pd.read_csv(folder / "metadata.csv")
    meta = meta[meta["view"].isin(["PA", "AP", "AP Supine"]) & meta["sex"].isin(["M", "F"])]
    meta = meta[[(folder / "images" / f).is_file() for f in meta["filename"]]].reset_index(drop=True)
    images = np.stack([
        np.asarray(Image.open(folder / "images" / f).convert("L").resize((size, size), Image.BILINEAR),
                   dtype=np.float32) / 255.0
        for f in meta["filename"]
    ])
    out = {
        "images": images,
        "covid": meta["finding"].str.contains("COVID-19").to_numpy(),
        "female": (meta["sex"] == "F").to_numpy(),
        "view": meta["view"].to_numpy().astype(str),
    }
    atomic_savez(cache, **out)
    return out
