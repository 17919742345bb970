"""Slice-discovery problems from any labeled dataset, with dcbench's protocol.

dcbench (Eyuboglu et al., 2022) makes a model fail on a known sub-group ("slice") by
manipulating its *training* data, then asks a slice-discovery method, fitted on an
unmanipulated *validation* split, to find that sub-group among the errors of an
unmanipulated *test* split. :func:`make_problem` does the same for any
:class:`LabeledData`, with three disjoint splits per problem. Where examples share a
source (an X-ray patient), ``split_groups`` keeps every source inside one split.

``rare``
    A sub-group (a fine class inside its coarse class) is down-sampled in training to
    ``rare_keep`` of its size. Slice: the sub-group's examples.
``correlation``
    A binary attribute that varies inside every fine class (a measured property,
    median-split within the fine class) is made to agree with the label in training:
    inside the target class only ``1 - correlation`` of the examples have attribute 0,
    outside it only ``1 - correlation`` have attribute 1. Slice: examples of the target
    class with attribute 0.
``noisy_label``
    Inside a sub-group, training labels are flipped with probability ``noise_rate`` to one
    other class (chosen per problem by its seed). Slice: the sub-group's examples.

Validation and test sets keep the slice at ``slice_share`` of their size (dcbench's
slices are a few percent of the test set), so most errors lie outside the slice;
:func:`slice_statistics` reports how hard each problem is.

Typical use on your own data::

    data = LabeledData(inputs, labels, groups=fine_labels, attributes={"thick": thick},
                       split_groups=patient_ids)
    problem = make_problem(data, ProblemSpec("rare", target=3, seed=0))

Where a dataset has no sub-group labels, :func:`merge_classes` merges fine classes into
coarse ones and the fine class becomes the sub-group, as dcbench does with the ImageNet
hierarchy. :class:`harness.dcbench.suites.Suite` bundles data, models and training recipes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

from harness.errors import InputError
from harness.train import Predictions

KINDS = ("rare", "correlation", "noisy_label")
# A validation set must hold at least this many examples: slicers are fitted on it (Domino's
# mixture has 25 components).
MIN_VALIDATION = 25


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class LabeledData:
    """A labeled dataset to build problems from.

    inputs : (N, ...) float32 model inputs (images (N, C, H, W), series (N, C, L)).
    labels : (N,) class index in 0..C-1 (the task the model learns).
    groups : (N,) integer sub-group id per example (e.g. the fine class), or None.
    attributes : name -> (N,) 0/1 array, candidate spurious attributes.
    split_groups : (N,) source id per example (e.g. the patient): a problem's train,
        validation and test splits never share a source. None: every example is its own.
    ids : (N,) global example ids, unique (default 0..N-1); used to check that
        development, report and pretraining pools share no example.
    group_names : a name per sub-group id (reports; the development / report checks).
    """

    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    attributes: Mapping[str, np.ndarray] = field(default_factory=dict)
    name: str = "data"
    group_names: tuple[str, ...] | None = None
    split_groups: np.ndarray | None = None
    ids: np.ndarray | None = None

    def __post_init__(self):
        inputs = np.asarray(self.inputs)
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"{self.name}: labels must be a non-empty 1-D array of class indices >= 0")
        n = len(labels)
        if inputs.ndim < 2 or inputs.shape[0] != n:
            raise InputError(f"{self.name}: inputs must be (N, ...) with N = {n} labels; got shape {inputs.shape}")
        for name in ("groups", "split_groups", "ids"):
            values = getattr(self, name)
            if values is None:
                continue
            values = np.asarray(values)
            if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
                raise InputError(f"{self.name}: {name} must be a 1-D integer array of shape ({n},); got "
                                 f"shape {values.shape}, dtype {values.dtype}")
        if self.ids is not None and len(np.unique(self.ids)) != n:
            raise InputError(f"{self.name}: ids must be unique")
        if self.groups is not None and self.group_names is not None and np.asarray(self.groups).max() >= len(
                self.group_names):
            raise InputError(f"{self.name}: group_names has {len(self.group_names)} names but groups go up to "
                             f"{np.asarray(self.groups).max()}")
        for name, values in self.attributes.items():
            values = np.asarray(values)
            if values.shape != (n,) or not np.isin(values, (0, 1)).all():
                raise InputError(f"{self.name}: attribute {name!r} must be a 0/1 array of shape ({n},)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return int(np.asarray(self.labels).max()) + 1

    @property
    def example_ids(self) -> np.ndarray:
        return np.arange(len(self)) if self.ids is None else np.asarray(self.ids)

    def raw_features(self) -> np.ndarray:
        return np.asarray(self.inputs, dtype=np.float32).reshape(len(self), -1)

    def group_name(self, group: int) -> str:
        return self.group_names[group] if self.group_names is not None else str(group)

    def class_of_group(self, group: int) -> int:
        """The class most members of ``group`` belong to."""
        return int(np.bincount(np.asarray(self.labels)[np.asarray(self.groups) == group]).argmax())

    def subgroup_pairs(self) -> set[tuple[str, frozenset[str]]]:
        """(sub-group name, names of the sub-groups of its class) of every sub-group."""
        if self.groups is None:
            return set()
        groups = np.unique(self.groups)
        by_class: dict[int, set[str]] = {}
        for g in groups:
            by_class.setdefault(self.class_of_group(int(g)), set()).add(self.group_name(int(g)))
        return {(self.group_name(int(g)), frozenset(by_class[self.class_of_group(int(g))])) for g in groups}

    def subset(self, index: np.ndarray, name: str | None = None, labels: np.ndarray | None = None) -> "LabeledData":
        """The examples ``index`` (ids kept), optionally relabelled."""
        index = np.asarray(index)
        pick = lambda a: None if a is None else np.asarray(a)[index]  # noqa: E731
        return LabeledData(
            inputs=np.asarray(self.inputs)[index], labels=np.asarray(self.labels)[index] if labels is None else labels,
            groups=pick(self.groups), attributes={k: np.asarray(v)[index] for k, v in self.attributes.items()},
            name=name or self.name, group_names=self.group_names, split_groups=pick(self.split_groups),
            ids=self.example_ids[index])


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


def coarse_sets(fine_labels: np.ndarray, coarse_labels: np.ndarray) -> set[frozenset[int]]:
    """The set of fine classes of every coarse class."""
    fine_labels, coarse_labels = np.asarray(fine_labels), np.asarray(coarse_labels)
    return {frozenset(np.unique(fine_labels[coarse_labels == c]).tolist()) for c in np.unique(coarse_labels)}


def disjoint_merges(fine_labels: np.ndarray, n_coarse: int, n_merges: int, first_seed: int = 0,
                    avoid: set[frozenset[int]] = frozenset()) -> list[np.ndarray]:
    """``n_merges`` class merges (seeds from ``first_seed``) no two of which, and none of
    which with ``avoid``, share a coarse class (the same set of fine classes)."""
    taken, merges = set(avoid), []
    for seed in range(first_seed, first_seed + 10_000):
        coarse = merge_classes(fine_labels, n_coarse, seed)
        sets = coarse_sets(fine_labels, coarse)
        if sets & taken:
            continue
        taken |= sets
        merges.append(coarse)
        if len(merges) == n_merges:
            return merges
    raise InputError(f"found only {len(merges)} of {n_merges} class merges without a shared coarse class")


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
    seed : seeds the splits, the sub-sampling and the label flips.
    attribute : the attribute name (correlation only).
    data : the name of the :class:`LabeledData` it applies to (suites hold several).
    slice_share : the slice's share of the validation and test sets.
    split : shares of the examples (of the sources) in the train, validation and test splits.
    rare_keep, noise_rate, correlation : strength of each manipulation.
    max_eval : caps the validation and test set sizes (keeps slicers cheap).
    """

    kind: str
    target: int
    seed: int
    attribute: str | None = None
    data: str = "data"
    slice_share: float = 0.03
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)
    rare_keep: float = 0.05
    noise_rate: float = 0.5
    correlation: float = 0.95
    max_eval: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if (self.kind == "correlation") != (self.attribute is not None):
            raise InputError("a correlation problem needs an attribute, and only it takes one")
        for name in ("rare_keep", "noise_rate", "correlation"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1]; got {value}")
        if not 0.0 < self.slice_share < 1.0:
            raise InputError(f"slice_share must be strictly between 0 and 1; got {self.slice_share}")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-9:
            raise InputError(f"split must be three positive shares summing to 1; got {self.split}")
        if self.max_eval is not None and self.max_eval < 2:
            raise InputError(f"max_eval must be >= 2 or None; got {self.max_eval}")

    @property
    def slice_id(self) -> str:
        """Names the ground-truth slice: problems that differ only by seed share it."""
        what = f"class {self.target}, {self.attribute}=0" if self.kind == "correlation" else f"group {self.target}"
        return f"{self.data} | {self.kind} | {what}"


@dataclass
class SliceProblem:
    """A manipulated training split, clean validation and test splits and their slices.

    Indices point into the :class:`LabeledData` the problem was made from;
    ``train_labels`` are the (possibly flipped) labels the model is trained on.
    """

    spec: ProblemSpec
    data_name: str
    train_index: np.ndarray
    train_labels: np.ndarray
    val_index: np.ndarray
    val_labels: np.ndarray
    val_slice: np.ndarray
    test_index: np.ndarray
    test_labels: np.ndarray
    test_slice: np.ndarray
    description: str

    @property
    def key(self) -> dict:
        return {"data": self.data_name, **asdict(self.spec)}


def slice_members(data: LabeledData, spec: ProblemSpec) -> np.ndarray:
    """(N,) bool: the ground-truth slice of ``spec`` in ``data``."""
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


def split_by_source(data: LabeledData, shares: tuple[float, float, float], rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (train, val, test): sources (``split_groups``, else examples) shuffled
    and cut at the cumulative example shares, so no source crosses splits."""
    n = len(data)
    sources = np.arange(n) if data.split_groups is None else np.asarray(data.split_groups)
    unique, inverse, counts = np.unique(sources, return_inverse=True, return_counts=True)
    order = rng.permutation(len(unique))
    ordered_counts = counts[order]
    start = (np.cumsum(ordered_counts) - ordered_counts) / n  # share of examples before each source
    part_of_source = np.empty(len(unique), dtype=np.int64)
    part_of_source[order] = np.where(start < shares[0], 0, np.where(start < shares[0] + shares[1], 1, 2))
    part = part_of_source[inverse]
    return part == 0, part == 1, part == 2


def _evaluation_set(pool: np.ndarray, in_slice: np.ndarray, spec: ProblemSpec, rng: np.random.Generator,
                    what: str, data_name: str) -> np.ndarray:
    """Indices of a validation / test set drawn from ``pool`` with the slice at ``slice_share``."""
    slice_pool = np.flatnonzero(pool & in_slice)
    rest = np.flatnonzero(pool & ~in_slice)
    share = spec.slice_share
    if spec.max_eval is not None and len(rest) > spec.max_eval * (1 - share):
        rest = np.sort(rng.choice(rest, size=int(round(spec.max_eval * (1 - share))), replace=False))
    wanted = int(round(share / (1 - share) * len(rest)))
    if wanted > len(slice_pool):  # too few slice members: shrink the rest instead
        rest = np.sort(rng.choice(rest, size=min(len(rest), int(round(len(slice_pool) * (1 - share) / share))),
                                  replace=False))
        wanted = len(slice_pool)
    if wanted < 1:
        raise InputError(f"{data_name}: problem {spec.slice_id} (seed {spec.seed}) leaves no slice member in the "
                         f"{what} set")
    chosen = rng.choice(slice_pool, size=wanted, replace=False)
    if what == "validation" and wanted + len(rest) < MIN_VALIDATION:
        raise InputError(f"{data_name}: problem {spec.slice_id} (seed {spec.seed}) leaves a validation set of "
                         f"{wanted + len(rest)} examples (< {MIN_VALIDATION}): too few slice members in its split")
    return np.sort(np.concatenate([chosen, rest]))


def make_problem(data: LabeledData, spec: ProblemSpec) -> SliceProblem:
    """Splits ``data`` into train / validation / test (by source), applies ``spec``'s
    manipulation to the training split and draws validation and test sets whose slice is
    ``spec.slice_share`` of them."""
    rng = np.random.default_rng(spec.seed)
    labels = np.asarray(data.labels)
    in_slice = slice_members(data, spec)
    is_train, is_val, is_test = split_by_source(data, spec.split, rng)

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
        group_class = data.class_of_group(spec.target)
        others = [c for c in range(data.n_classes) if c != group_class]
        if not others:
            raise InputError(f"{data.name}: noisy_label problems need at least two classes")
        flipped_to = int(rng.choice(others))
        members = np.flatnonzero(in_slice[train_index])
        flip = members[rng.random(len(members)) < spec.noise_rate]
        train_labels[flip] = flipped_to
    if len(np.unique(train_labels)) < 2:
        raise InputError(f"{data.name}: problem {spec.slice_id} leaves fewer than two classes in training")

    val_index = _evaluation_set(is_val, in_slice, spec, rng, "validation", data.name)
    test_index = _evaluation_set(is_test, in_slice, spec, rng, "test", data.name)
    what = {
        "rare": f"sub-group {data.group_name(spec.target)} kept at {spec.rare_keep:.0%} in training",
        "correlation": f"class {spec.target} has {spec.attribute}=1 in {spec.correlation:.0%} of training examples "
        f"(other classes {spec.attribute}=0); slice = class {spec.target} with {spec.attribute}=0",
        "noisy_label": f"sub-group {data.group_name(spec.target)} relabelled to class {flipped_to} "
        f"with probability {spec.noise_rate:.0%} in training",
    }[spec.kind]
    return SliceProblem(
        spec=spec, data_name=data.name,
        train_index=train_index, train_labels=train_labels,
        val_index=val_index, val_labels=labels[val_index], val_slice=in_slice[val_index],
        test_index=test_index, test_labels=labels[test_index], test_slice=in_slice[test_index],
        description=f"{data.name} {spec.kind}: {what}",
    )


# ---------------------------------------------------------------- reporting
def slice_statistics(problem: SliceProblem, predictions: Predictions) -> dict:
    """On the test set: the slice's size, share of the test set and of the errors, the
    accuracy inside and outside it, the precision@10 ceiling (slices of < 10 members
    cannot reach 1) and ``degenerate`` (no error inside the slice: nothing to find)."""
    correct = predictions.correct
    in_slice = problem.test_slice
    if len(correct) != len(in_slice):
        raise InputError(f"{len(correct)} predictions for a test set of {len(in_slice)}")
    errors = ~correct
    n_slice = int(in_slice.sum())
    return {
        "n_test": int(len(in_slice)),
        "n_slice": n_slice,
        "slice_errors": int(errors[in_slice].sum()),
        "slice_share_of_test": float(in_slice.mean()),
        "slice_share_of_errors": float(errors[in_slice].sum() / max(errors.sum(), 1)),
        "accuracy_in_slice": float(correct[in_slice].mean()),
        "accuracy_outside_slice": float(correct[~in_slice].mean()),
        "accuracy": float(correct.mean()),
        "precision_at_10_ceiling": min(n_slice, 10) / 10,
        "degenerate": bool(errors[in_slice].sum() == 0),
    }
