"""Suites: the data, model and training recipes of one dataset of the mini-dcbench.

A :class:`Suite` is public: build one for your own data (any ``input_type`` name) and
run it with :func:`harness.dcbench.runner.run_problems`::

    suite = Suite(
        input_type="my_images", name="mine", source="my labelled images",
        report=(LabeledData(x_report, coarse, groups=fine, attributes={"bright": bright}, name="mine"),),
        dev=(LabeledData(x_dev, coarse_dev, groups=fine_dev, attributes={"bright": b_dev}, name="mine-dev"),),
        trunk=TrunkRecipe("conv32", lambda: image_trunk(3), LabeledData(x_pool, fine_pool, name="mine-pool"),
                          TrainConfig(epochs=10, lr=3e-3)),
        correlation_attributes=("bright",),
    )

Per input type a trunk is pretrained once on ``trunk.data`` (a pool that no problem uses),
every problem fine-tunes an :class:`~harness.models.small.MLPHead` on the cached trunk
features. ``report`` datasets give the reported problems, ``dev`` datasets the
development problems settings are chosen on; :meth:`Suite.check_pools` (run on
construction) refuses pools that share an example or a (sub-group, coarse class) pair.

:func:`shipped_suites` builds the mini-dcbench's own suites from the shared data
(``../shared/data``) and, without it, from what scikit-learn ships.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from harness.dcbench.protocol import (
    KINDS,
    LabeledData,
    ProblemSpec,
    coarse_sets,
    disjoint_merges,
    median_split,
)
from harness.errors import InputError
from harness.io import atomic_savez
from harness.models.small import image_trunk, series_trunk
from harness.paths import cache_dir, data_dir, dataset_available
from harness.train import TrainConfig

INPUT_TYPES = ("natural_images", "medical_images", "medical_time_series")
SPLITS = ("report", "dev")


@dataclass
class TrunkRecipe:
    """How a trunk is built and pretrained.

    name : names the architecture in cache keys (``make`` must always build the same one).
    make : builds the untrained trunk, inputs (N, ...) -> features (N, F).
    data : the pretraining pool; its labels are the pretraining targets.
    train : the pretraining recipe (harness.train's one training loop).
    """

    name: str
    make: Callable[[], nn.Module]
    data: LabeledData
    train: TrainConfig
    batch_size: int = 128

    @property
    def key(self) -> dict:
        digest = hashlib.sha256(np.ascontiguousarray(self.data.example_ids).tobytes()
                                + np.ascontiguousarray(self.data.labels, dtype=np.int64).tobytes()).hexdigest()[:12]
        return {"trunk": self.name, "data": self.data.name, "ids": digest, "n": len(self.data),
                "train": {k: v for k, v in vars(self.train).items()}, "batch_size": self.batch_size}


@dataclass
class Suite:
    """One dataset of the mini-dcbench: problems' data, trunk and head recipes.

    input_type : the Table 1 row block it reports under (any name).
    name, source : short name and a human description of the data.
    report, dev : datasets of the reported and of the development problems.
    trunk : the pretrained feature extractor.
    head_train, head_hidden, head_batch_size : the per-problem head's recipe.
    correlation_attributes : attributes correlation problems use (every dataset has them).
    target_classes : classes whose sub-groups may be rare / noisy targets (None: all).
    defaults : ProblemSpec fields for every problem (slice_share, split, ...).
    min_members : a slice needs this many examples in a dataset to be a target.
    """

    input_type: str
    name: str
    source: str
    report: tuple[LabeledData, ...]
    trunk: TrunkRecipe
    dev: tuple[LabeledData, ...] = ()
    head_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=2e-3, weight_decay=1e-4))
    head_hidden: int = 128
    head_batch_size: int = 128
    correlation_attributes: tuple[str, ...] = ()
    target_classes: tuple[int, ...] | None = None
    defaults: dict = field(default_factory=dict)
    min_members: int = 20

    def __post_init__(self):
        if not isinstance(self.input_type, str) or not self.input_type:
            raise InputError(f"input_type must be a non-empty string; got {self.input_type!r}")
        self.report, self.dev = tuple(self.report), tuple(self.dev)
        if not self.report:
            raise InputError(f"suite {self.name}: report must hold at least one LabeledData")
        datasets = self.report + self.dev
        if not all(isinstance(d, LabeledData) for d in datasets + (self.trunk.data,)):
            raise InputError(f"suite {self.name}: report, dev and trunk.data must be LabeledData")
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise InputError(f"suite {self.name}: dataset names must be unique; got {names}")
        for data in datasets:
            missing = [a for a in self.correlation_attributes if a not in data.attributes]
            if missing:
                raise InputError(f"suite {self.name}: dataset {data.name} has no correlation attribute {missing}; "
                                 f"it has {sorted(data.attributes)}")
        try:
            ProblemSpec("rare", 0, 0, **self.defaults)
        except TypeError as exc:
            raise InputError(f"suite {self.name}: defaults must be ProblemSpec fields: {exc}") from exc
        self.n_features = self._check_trunk()
        self.check_pools()

    def _check_trunk(self) -> int:
        """The trunk's feature width, from a forward pass on two examples of every pool."""
        torch.manual_seed(0)
        trunk = self.trunk.make()
        widths = set()
        for data in (self.trunk.data,) + self.report + self.dev:
            sample = torch.as_tensor(np.asarray(data.inputs[:2], dtype=np.float32))
            try:
                with torch.no_grad():
                    out = trunk.eval()(sample)
            except Exception as exc:  # shape mismatches surface as several exception types
                raise InputError(f"suite {self.name}: the trunk {self.trunk.name!r} cannot read inputs of shape "
                                 f"{tuple(np.asarray(data.inputs).shape[1:])} ({data.name}; e.g. series need a "
                                 f"channel axis, (N, C, L)): {exc}") from exc
            if out.ndim != 2 or out.shape[0] != len(sample):
                raise InputError(f"suite {self.name}: the trunk must return (N, F) features; got {tuple(out.shape)}")
            widths.add(int(out.shape[1]))
        if len(widths) != 1:
            raise InputError(f"suite {self.name}: the trunk gives features of different widths {sorted(widths)}")
        return widths.pop()

    def check_pools(self) -> None:
        """Raises unless the pretraining, report and development pools share no example and
        report and development problems share no (sub-group, coarse class) pair."""
        pools = {"pretraining": set(self.trunk.data.example_ids.tolist()),
                 "report": {int(i) for d in self.report for i in d.example_ids},
                 "dev": {int(i) for d in self.dev for i in d.example_ids}}
        for a, b in (("pretraining", "report"), ("pretraining", "dev"), ("report", "dev")):
            shared = pools[a] & pools[b]
            if shared:
                raise InputError(f"suite {self.name}: the {a} and {b} pools share {len(shared)} examples")
        report_pairs = set().union(*(d.subgroup_pairs() for d in self.report))
        dev_pairs = set().union(*(d.subgroup_pairs() for d in self.dev)) if self.dev else set()
        shared_pairs = report_pairs & dev_pairs
        if shared_pairs:
            example = sorted(shared_pairs, key=str)[0]
            raise InputError(f"suite {self.name}: report and dev problems share {len(shared_pairs)} (sub-group, "
                             f"coarse class) pairs, e.g. {example[0]} in {sorted(example[1])}")

    def datasets(self, split: str) -> tuple[LabeledData, ...]:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}; got {split!r}")
        return self.report if split == "report" else self.dev

    def dataset(self, name: str) -> LabeledData:
        for data in self.report + self.dev:
            if data.name == name:
                return data
        raise InputError(f"suite {self.name} has no dataset {name!r}")

    def slices(self, kind: str, split: str = "report") -> list[tuple[str, int, str | None]]:
        """The distinct ground-truth slices of ``kind``: (dataset name, target, attribute)."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}; got {kind!r}")
        out = []
        for data in self.datasets(split):
            labels = np.asarray(data.labels)
            if kind == "correlation":
                for attribute in self.correlation_attributes:
                    values = np.asarray(data.attributes[attribute])
                    out += [(data.name, c, attribute) for c in range(data.n_classes)
                            if min(((labels == c) & (values == v)).sum() for v in (0, 1)) >= self.min_members]
                continue
            if data.groups is None:
                raise InputError(f"suite {self.name}: {kind} problems need sub-group labels, but dataset "
                                 f"{data.name} has groups=None")
            groups = np.asarray(data.groups)
            for g in np.unique(groups):
                g = int(g)
                members = groups == g
                group_class = data.class_of_group(g)
                whole_class = members.sum() == (labels == group_class).sum()
                if (members.sum() >= self.min_members and not whole_class
                        and (self.target_classes is None or group_class in self.target_classes)):
                    out.append((data.name, g, None))
        return out

    def specs(self, kind: str, n_problems: int, first_seed: int = 0, split: str = "report") -> list[ProblemSpec]:
        """``n_problems`` problems cycling over the distinct slices, seeds from ``first_seed``."""
        if not isinstance(n_problems, (int, np.integer)) or n_problems < 1:
            raise InputError(f"n_problems must be a positive integer; got {n_problems!r}")
        slices = self.slices(kind, split)
        if not slices:
            why = ("no correlation attribute given (correlation_attributes=())" if kind == "correlation"
                   and not self.correlation_attributes else f"no slice has >= {self.min_members} examples")
            raise InputError(f"suite {self.name}: no eligible {kind} slice in the {split} datasets: {why}")
        return [ProblemSpec(kind, target, first_seed + i, attribute=attribute, data=name, **self.defaults)
                for i, (name, target, attribute) in ((i, slices[i % len(slices)]) for i in range(n_problems))]


# ---------------------------------------------------------------- the shipped suites
def _pools(strata: np.ndarray, shares: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Disjoint stratified index pools with the given shares of every stratum."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in shares]
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for pool, part in zip(out, np.split(members, cuts)):
            pool.extend(part.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in out]


def _merged_datasets(name: str, inputs: np.ndarray, fine: np.ndarray, attributes: dict, index: np.ndarray,
                     merges: list[np.ndarray], group_names: tuple[str, ...]) -> tuple[LabeledData, ...]:
    return tuple(
        LabeledData(inputs=inputs[index], labels=coarse, groups=fine[index],
                    attributes={k: v[index] for k, v in attributes.items()}, name=f"{name}-{j}",
                    group_names=group_names, ids=index)
        for j, coarse in enumerate(merges))


def _class_merge_suite(input_type: str, name: str, source: str, inputs: np.ndarray, fine: np.ndarray,
                       attributes: dict, group_names: tuple[str, ...], n_coarse: int, trunk_name: str,
                       make_trunk: Callable[[], nn.Module], trunk_train: TrainConfig, n_report_merges: int = 2,
                       shares: tuple[float, float, float] = (0.3, 0.5, 0.2), pretrain_labels: np.ndarray | None = None,
                       **suite_options) -> Suite:
    """Pretraining / report / dev pools (stratified by fine class); report problems on
    ``n_report_merges`` class merges, dev problems on one more, no two sharing a coarse class.
    The trunk is pretrained on ``pretrain_labels`` (default: the fine classes)."""
    trunk_pool, report_pool, dev_pool = _pools(fine, shares, seed=0)
    pretrain_labels = fine if pretrain_labels is None else pretrain_labels
    report_merges = disjoint_merges(fine[report_pool], n_coarse, n_report_merges, first_seed=0)
    taken = set().union(*(coarse_sets(fine[report_pool], m) for m in report_merges))
    dev_merges = disjoint_merges(fine[dev_pool], n_coarse, 1, first_seed=1000, avoid=taken)
    trunk = TrunkRecipe(trunk_name, make_trunk, LabeledData(inputs[trunk_pool], pretrain_labels[trunk_pool],
                                                            name=f"{name}-pretrain", ids=trunk_pool), trunk_train)
    return Suite(input_type, name, source,
                 report=_merged_datasets(name, inputs, fine, attributes, report_pool, report_merges, group_names),
                 dev=_merged_datasets(f"{name}-dev", inputs, fine, attributes, dev_pool, dev_merges, group_names),
                 trunk=trunk, **suite_options)


def digits_suite() -> Suite:
    """MNIST's test set (shared data) or, without it, scikit-learn's 8x8 digits: 10 digits
    merged into 5 coarse classes; sub-group = digit; attributes: stroke thickness and slant,
    median-split inside each digit."""
    from harness.data.mnist import load_mnist, load_sklearn_digits, stroke_attributes

    shipped = not dataset_available("mnist")
    images = load_sklearn_digits() if shipped else load_mnist()
    strokes = stroke_attributes(images.images)
    fine = images.labels
    attributes = {"thick": median_split(strokes["ink"], fine), "right_slant": median_split(strokes["slant"], fine)}
    inputs = (images.images[:, None].astype(np.float32) / 255.0 - 0.13) / 0.3
    return _class_merge_suite(
        "natural_images", "digits" if shipped else "mnist", images.source, inputs, fine, attributes,
        tuple(f"digit {d}" for d in range(10)), 5, f"conv{images.images.shape[-1]}-1ch",
        lambda: image_trunk(1), TrainConfig(epochs=8, lr=3e-3, seed=0),
        correlation_attributes=("thick", "right_slant"),
        defaults={"slice_share": 0.05 if shipped else 0.03, "max_eval": 1500})


# Confusable groups of the shared Tiny-ImageNet subset (by WordNet id); every other class
# is a coarse class of its own.
TINY_IMAGENET_GROUPS = {
    "frogs": ("n01641577", "n01644900"),
    "dogs": ("n02085620", "n02094433", "n02099601", "n02099712", "n02106662"),
    "cats": ("n02123045", "n02123394", "n02124075"),
    "cars": ("n02814533", "n03100240", "n03670208", "n03977966", "n04285008"),
    "garments": ("n02669723", "n02963159", "n03404251", "n03980874", "n04532106"),
}
IMAGE_SIZE = 32
_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _normalise_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, ImageNet mean / std."""
    x = (images.astype(np.float32) / 255.0 - _MEAN.astype(np.float32)) / _STD.astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _tiny_arrays() -> dict[str, np.ndarray]:
    from harness.data.tiny_imagenet import tiny_imagenet_arrays

    path = cache_dir("dcbench", "data") / f"tiny-imagenet{IMAGE_SIZE}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = tiny_imagenet_arrays(IMAGE_SIZE)
    atomic_savez(path, **arrays)
    return arrays


def _tiny_trunk_recipe() -> tuple[TrunkRecipe, dict, np.ndarray, np.ndarray]:
    arrays = _tiny_arrays()
    fine = arrays["labels"]
    trunk_pool, report_pool, dev_pool = _pools(fine, (250 / 550, 200 / 550, 100 / 550), seed=0)
    inputs = _normalise_rgb(arrays["images"])
    recipe = TrunkRecipe(f"conv{IMAGE_SIZE}-3ch", lambda: image_trunk(3, (32, 64, 128, 128)),
                         LabeledData(inputs[trunk_pool], fine[trunk_pool], name="tiny-imagenet-pretrain",
                                     ids=trunk_pool), TrainConfig(epochs=10, lr=3e-3, seed=0))
    return recipe, {**arrays, "inputs": inputs}, report_pool, dev_pool


def tiny_imagenet_suite() -> Suite:
    """The shared 30-class Tiny-ImageNet subset at 32 px: coarse class = confusable group
    (frogs, dogs, cats, cars, garments) or a distinct class alone; sub-group = fine class;
    attributes: brightness and colourfulness, median-split inside each fine class. The
    development task merges the 30 classes at random into 10 (no coarse class shared)."""
    from harness.data.tiny_imagenet import tiny_imagenet_class_names

    recipe, arrays, report_pool, dev_pool = _tiny_trunk_recipe()
    wnids, _ = tiny_imagenet_class_names()
    fine, images, inputs = arrays["labels"], arrays["images"], arrays["inputs"]
    group_of = {w: g for g, members in TINY_IMAGENET_GROUPS.items() for w in members}
    coarse_names = list(TINY_IMAGENET_GROUPS) + [w for w in wnids if w not in group_of]
    coarse_of_fine = np.array([coarse_names.index(group_of.get(w, w)) for w in wnids])
    pixels = images.astype(np.float32) / 255.0
    colour = pixels.max(axis=-1) - pixels.min(axis=-1)
    attributes = {"bright": median_split(pixels.mean(axis=(1, 2, 3)), fine),
                  "colourful": median_split(colour.mean(axis=(1, 2)), fine)}
    names = tuple(str(n) for n in arrays["class_names"])
    report = _merged_datasets("tiny-imagenet", inputs, fine, attributes, report_pool,
                              [coarse_of_fine[fine[report_pool]]], names)
    dev_merge = disjoint_merges(fine[dev_pool], 10, 1, first_seed=1000,
                                avoid=coarse_sets(fine[report_pool], coarse_of_fine[fine[report_pool]]))
    dev = _merged_datasets("tiny-imagenet-dev", inputs, fine, attributes, dev_pool, dev_merge, names)
    return Suite("natural_images", "tiny-imagenet", "Tiny-ImageNet 30-class subset, 32 px (shared data)",
                 report=report, dev=dev, trunk=recipe, correlation_attributes=("bright", "colourful"),
                 defaults={"max_eval": 1500})


def xray_suite() -> Suite:
    """Frontal COVID-19 X-rays with known sex (shared data), 32 px, through the Tiny-ImageNet
    trunk (pretrained on natural images, as dcbench's X-ray models are ImageNet-pretrained).
    COVID vs other; sub-group = label x view (PA / AP / AP supine); attributes: sex and
    brightness (median split inside each sub-group); splits by patient. Too few images for a
    development pool: settings come from the other suites' development problems."""
    import pandas as pd

    from harness.data.covid import covid_root, load_grayscale

    recipe, _, _, _ = _tiny_trunk_recipe()
    folder = covid_root()
    meta = pd.read_csv(folder / "metadata.csv")
    meta = meta[meta["view"].isin(["PA", "AP", "AP Supine"]) & meta["sex"].isin(["M", "F"])]
    meta = meta[[(folder / "images" / f).is_file() for f in meta["filename"]]].reset_index(drop=True)
    path = cache_dir("dcbench", "data") / f"covid-xray{IMAGE_SIZE}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            gray = stored["images"]
    else:
        gray = load_grayscale([str(folder / "images" / f) for f in meta["filename"]], IMAGE_SIZE, progress=False).numpy()
        atomic_savez(path, images=gray)
    if len(gray) != len(meta):
        raise InputError(f"cached X-rays at {path} do not match the metadata ({len(gray)} vs {len(meta)}): delete it")
    covid = meta["finding"].str.contains("COVID-19").to_numpy().astype(np.int64)
    view = meta["view"].to_numpy().astype(str)
    names = [f"{'COVID' if c else 'other'} {v}" for c, v in zip(covid, view)]
    group_names, groups = np.unique(names, return_inverse=True)
    rgb = np.repeat((gray[:, 0, :, :, None] * 255).astype(np.uint8), 3, axis=-1)
    _, patients = np.unique(meta["patientid"].astype(str), return_inverse=True)
    attributes = {"female": (meta["sex"] == "F").to_numpy().astype(np.int64),
                  "bright": median_split(gray.mean(axis=(1, 2, 3)), groups)}
    # Ids after the Tiny-ImageNet ones: the pretraining pool holds no X-ray.
    data = LabeledData(_normalise_rgb(rgb), covid, groups=groups.astype(np.int64), attributes=attributes,
                       name="covid-xray", group_names=tuple(group_names), split_groups=patients.astype(np.int64),
                       ids=np.arange(len(covid)) + 1_000_000)
    return Suite("medical_images", "covid-xray", f"COVID-19 chest X-rays, {len(covid)} frontal images of "
                 f"{patients.max() + 1} patients, {IMAGE_SIZE} px (shared data)", report=(data,), trunk=recipe,
                 correlation_attributes=("female", "bright"), head_train=TrainConfig(epochs=100, lr=2e-3, weight_decay=1e-4),
                 defaults={"slice_share": 0.1, "split": (0.5, 0.25, 0.25)}, min_members=20)


def ecg_suite(length: int = 96) -> Suite:
    """Pooled single-lead ECG beats (shared data): 8 (dataset, class) fine classes merged into
    4; sub-group = fine class; attributes: peak time and skewness, median-split inside each
    fine class (the recording source is a function of the fine class, so it cannot be one).
    The trunk is pretrained to tell the recording source (a pretext task: pretrained on the
    fine classes themselves, heads are right on 99% of the beats outside the slice, a
    ceiling test)."""
    from scipy.stats import skew

    from harness.data.timeseries import pooled_ecg

    pooled = pooled_ecg(length)
    fine_names, fine = np.unique(pooled.labels, return_inverse=True)
    counts = np.bincount(fine)
    keep = counts[fine] >= 50  # ECG5000's three tiny classes (31 series) cannot hold a slice
    fine_names = fine_names[counts >= 50]
    _, fine = np.unique(fine[keep], return_inverse=True)
    series = pooled.series[keep]
    _, sources = np.unique(pooled.sources[keep], return_inverse=True)
    attributes = {"late_peak": median_split(series[:, 0].argmax(axis=1), fine),
                  "skewed": median_split(skew(series[:, 0], axis=1), fine)}
    return _class_merge_suite(
        "medical_time_series", "ecg", pooled.description, series, fine.astype(np.int64), attributes,
        tuple(str(n) for n in fine_names), 4, f"conv1d-{length}", lambda: series_trunk(1),
        TrainConfig(epochs=15, lr=3e-3, seed=0), pretrain_labels=sources.astype(np.int64),
        correlation_attributes=("late_peak", "skewed"), head_train=TrainConfig(epochs=50, lr=2e-3, weight_decay=1e-4),
        defaults={"slice_share": 0.05})


def quantile_groups(values: np.ndarray, within: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 of every value among the values of its ``within`` group (quantiles)."""
    values, within = np.asarray(values, dtype=np.float64), np.asarray(within)
    out = np.zeros(len(values), dtype=np.int64)
    for g in np.unique(within):
        members = np.flatnonzero(within == g)
        ranks = np.argsort(np.argsort(values[members], kind="stable"), kind="stable")
        out[members] = ranks * n_bins // len(members)
    return out


def eeg_suite() -> Suite:
    """The shared EEG set (UEA FingerMovements: 416 trials, 28 channels x 50 samples, left vs
    right finger movement; dcbench's time series are EEG too). It has no sub-group labels, so
    a sub-group is a tercile of the trial's total signal power inside its class (6 sub-groups)
    and the attributes are measured properties median-split inside each sub-group: the share
    of the power in the trial's second half, and the spectral centroid. Channels are
    standardised over the whole set (per-trial normalisation would hide the power). Too few
    trials for a development pool: settings come from the other suites' development problems."""
    from harness.data.timeseries import load_ucr

    parts = [load_ucr("FingerMovements", split) for split in ("TRAIN", "TEST")]
    series = np.concatenate([x for x, _ in parts])
    _, labels = np.unique(np.concatenate([y for _, y in parts]), return_inverse=True)
    labels = labels.astype(np.int64)
    power = np.log(series.var(axis=2).mean(axis=1))
    groups = labels * 3 + quantile_groups(power, labels, 3)
    half = series.shape[2] // 2
    late = (series[:, :, half:] ** 2).sum(axis=(1, 2)) / (series ** 2).sum(axis=(1, 2))
    spectrum = np.abs(np.fft.rfft(series - series.mean(axis=2, keepdims=True), axis=2)).mean(axis=1)
    centroid = (spectrum * np.arange(spectrum.shape[1])).sum(axis=1) / spectrum.sum(axis=1)
    attributes = {"late_power": median_split(late, groups), "high_frequency": median_split(centroid, groups)}
    x = ((series - series.mean(axis=(0, 2), keepdims=True)) / series.std(axis=(0, 2), keepdims=True)).astype(np.float32)
    trunk_pool, report_pool = _pools(groups, (0.3, 0.7), seed=0)
    names = tuple(f"{side} movement, power tercile {t + 1}" for side in ("left", "right") for t in range(3))
    data = LabeledData(x[report_pool], labels[report_pool], groups=groups[report_pool],
                       attributes={k: v[report_pool] for k, v in attributes.items()}, name="eeg",
                       group_names=names, ids=report_pool)
    trunk = TrunkRecipe("conv1d-28ch", lambda: series_trunk(28), LabeledData(x[trunk_pool], labels[trunk_pool],
                        name="eeg-pretrain", ids=trunk_pool), TrainConfig(epochs=30, lr=3e-3, seed=0))
    return Suite("medical_time_series", "eeg", "EEG, UEA FingerMovements (416 trials, 28 channels; shared data)",
                 report=(data,), trunk=trunk, correlation_attributes=("late_power", "high_frequency"),
                 head_train=TrainConfig(epochs=100, lr=2e-3, weight_decay=1e-4),
                 defaults={"slice_share": 0.1}, min_members=20)


SUITES: dict[str, tuple[Callable[[], Suite], tuple[str, ...], str]] = {
    # name: (builder, shared datasets it needs (() = runs on what the packages ship), input type)
    "digits": (digits_suite, (), "natural_images"),
    "tiny-imagenet": (tiny_imagenet_suite, ("tiny-imagenet-subset",), "natural_images"),
    "covid-xray": (xray_suite, ("covid-chestxray", "tiny-imagenet-subset"), "medical_images"),
    "ecg": (ecg_suite, ("timeseries",), "medical_time_series"),
    "eeg": (eeg_suite, ("timeseries",), "medical_time_series"),
}


def shipped_suites(names: tuple[str, ...] | None = None) -> tuple[list[Suite], dict[str, str]]:
    """The mini-dcbench's suites whose data is present, and {suite: why it cannot run} for the others."""
    names = tuple(SUITES) if names is None else names
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise InputError(f"unknown suites {unknown}; choose from {list(SUITES)}")
    suites, skipped = [], {}
    for name in names:
        build, needs, _ = SUITES[name]
        missing = [d for d in needs if not dataset_available(d)]
        if missing:
            skipped[name] = (f"no {missing[0]!r} folder in the data folder {data_dir()}; no PyPI package ships it "
                             "(`make data` fetches it)")
            continue
        suites.append(build())
    return suites, skipped
