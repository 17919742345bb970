"""The Spotlight (d'Eon, d'Eon, Wright & Leyton-Brown, FAccT 2022): slice discovery by
searching embedding space for a high-loss neighbourhood.

A spotlight is a spherical Gaussian kernel with centre m and precision p; example i gets
the weight w_i = exp(-p ||x_i - m||^2 / 2). Each spotlight maximises the kernel-weighted
mean loss

    sum_i w_i loss_i / sum_i w_i

subject to holding at least ``spotlight_size * N`` examples' worth of weight (W = sum_i w_i).
The constraint is a quadratic barrier, subtracted from the objective while
W < min_weight + b_t:

    barrier_scale * (W - min_weight - b_t)^2 / b_t^2

whose width b_t shrinks geometrically from N - min_weight to 5% of min_weight over the
``num_steps`` steps, so the spotlight may narrow gradually. m starts at the origin and
log p at log(initial_precision); both are optimised by Adam. The learning rate is
multiplied by ``lr_decay`` whenever the minimised objective has not improved (torch's
ReduceLROnPlateau rule, relative threshold 1e-4) for more than ``lr_patience`` steps, and
the plateau's best value is then forgotten. Later spotlights look at down-weighted losses: after each spotlight every loss is
multiplied by 1 - w_i / max_j w_j, so a region already found cannot be found again.

Defaults are those of the reference implementation in domino 0.1.5 (used for the dcbench
runs): 2% spotlight size, 1000 Adam steps at learning rate 1e-3, patience 20, factor 0.5,
barrier scale 1, initial precision 1e-4. (The authors' own ImageNet runs used learning rate
1e-2, patience 10, 5000 steps and barrier scale 10.) Adam moves each parameter by about the
learning rate per step, so the centre travels about ``learning_rate * num_steps`` per
coordinate at most: the method depends on the embeddings' scale and origin. On the
raw digits pixels of our tests (values 0-16) learning rate 1e-3 leaves the spotlight about
as wide as the data (AUROC ~0.5 for the misclassified 8s), 1e-2 finds them (AUROC > 0.95).

Where we differ from domino 0.1.5, on purpose:

- ``loss="cross_entropy"`` (default) is the model's loss, -log pred_probs[target], as in the
  paper. domino 0.1.5 passes the probabilities to ``torch.nn.functional.cross_entropy``,
  which treats them as logits (loss = -log softmax(pred_probs)[target]);
  ``loss="probs_as_logits"`` reproduces that.
- ``predict_proba`` returns the kernel w_i in [0, 1]; domino divides it by its sum over the
  scored examples, which makes a score depend on the other examples in the batch (a
  positive per-column factor: rankings are the same).
- ``predict`` returns one slice per example (see there); domino thresholds the batch-
  normalised weights at 0.5, which leaves almost every example outside every slice.
- a step whose objective is not finite (every kernel weight underflowed: embeddings far
  from the origin, or a learning rate too large for their scale) raises
  :class:`InputError`; domino carries on with NaN.
- the squared distance is computed from the scalar precision, not through a D x D
  precision matrix (O(ND) instead of O(ND^2) per step).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from harness.baselines.simple import SlicerInputs, _FittedCheck, check_inputs, check_positive_int
from harness.errors import InputError

# The barrier's final width, as a fraction of min_weight (domino's and the authors' default).
FINAL_BARRIER_FRACTION = 0.05
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SpotlightSlicer(_FittedCheck):
    """The Spotlight: ``n_slices`` Gaussian spotlights on high-loss regions, found one after another.

    Parameters
    ----------
    n_slices : int
        Spotlights to find; slices are returned in the order found (the first on the
        original losses, the next ones on the down-weighted losses).
    spotlight_size : float
        Fraction of the fit data the spotlight must hold at least (its total kernel
        weight), in (0, 1).
    num_steps : int
        Adam steps per spotlight.
    learning_rate : float
        Adam's initial learning rate.
    loss : {"cross_entropy", "probs_as_logits"}
        Per-example loss: -log pred_probs[target] (clipped at machine epsilon), or domino
        0.1.5's cross-entropy of the probabilities taken as logits (see the module notes).
    seed : int
        Accepted so that every slicer takes one; the Spotlight has no random step (it
        starts at the origin with a fixed precision), so the result does not depend on it.
    initial_precision : float
        Precision p of the kernel at the start of every spotlight.
    barrier_scale : float
        Height of the size barrier.
    lr_patience : int, lr_decay : float
        Steps without improvement before the learning rate is multiplied by ``lr_decay``.
    dtype : {"float32", "float64"}
        Precision of the embedding-sized tensors (domino: float32). The log precision, a
        scalar, is always float64, as in domino.
    device : str
        torch device of the optimisation.
    progress : bool
        Show a tqdm bar over the optimisation steps.
    """

    LOSSES = ("cross_entropy", "probs_as_logits")

    def __init__(
        self,
        n_slices: int = 5,
        spotlight_size: float = 0.02,
        num_steps: int = 1000,
        learning_rate: float = 1e-3,
        loss: str = "cross_entropy",
        seed: int = 0,
        *,
        initial_precision: float = 1e-4,
        barrier_scale: float = 1.0,
        lr_patience: int = 20,
        lr_decay: float = 0.5,
        dtype: str = "float32",
        device: str = "cpu",
        progress: bool = False,
    ):
        self.n_slices = check_positive_int("n_slices", n_slices)
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.lr_patience = check_positive_int("lr_patience", lr_patience, minimum=0)
        for name, value, low, high in (
            ("spotlight_size", spotlight_size, 0.0, 1.0),
            ("lr_decay", lr_decay, 0.0, 1.0),
        ):
            if not (_is_number(value) and low < value < high):
                raise InputError(f"{name} must be a number in ({low:g}, {high:g}); got {value!r}")
        for name, value in (
            ("learning_rate", learning_rate),
            ("initial_precision", initial_precision),
            ("barrier_scale", barrier_scale),
        ):
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0; got {value!r}")
        if loss not in self.LOSSES:
            raise InputError(f"loss must be one of {self.LOSSES}; got {loss!r}")
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {tuple(_DTYPES)}; got {dtype!r}")
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"device {device!r} is not a torch device: {exc}") from exc
        self.spotlight_size = float(spotlight_size)
        self.learning_rate = float(learning_rate)
        self.loss = loss
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.initial_precision = float(initial_precision)
        self.barrier_scale = float(barrier_scale)
        self.lr_decay = float(lr_decay)
        self.dtype = dtype
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------ fit
    def fit(self, embeddings, targets, pred_probs) -> "SpotlightSlicer":
        """Finds the spotlights on the fit data.

        ``embeddings`` (N, D), ``targets`` (N,) class indices, ``pred_probs`` (N, C)
        probabilities (or (N,) for binary tasks). Sets ``centres_`` (n_slices, D),
        ``log_precisions_`` (n_slices,), ``slice_weights_`` (each spotlight's total kernel
        weight on the fit data), ``slice_losses_`` (its kernel-weighted mean of the
        original losses), ``thresholds_`` (the kernel weight of its round(weight)-th
        heaviest fit example, used by ``predict``) and ``losses_`` (the per-example losses).
        """
        inputs = check_inputs(embeddings, targets, pred_probs)
        n = inputs.embeddings.shape[0]
        min_weight = n * self.spotlight_size
        if min_weight < 1:
            raise InputError(f"spotlight_size {self.spotlight_size:g} of {n} examples holds less than one "
                             "example; use more examples or a larger spotlight_size")
        x = self._tensor(inputs.embeddings)
        losses = self._losses(inputs)
        barrier_widths = np.geomspace(n - min_weight, FINAL_BARRIER_FRACTION * min_weight, self.num_steps)

        centres, log_precisions, weights, slice_losses, thresholds = [], [], [], [], []
        remaining = losses.clone()
        for index in range(self.n_slices):
            centre, log_precision = self._optimise(x, remaining, min_weight, barrier_widths, index)
            with torch.no_grad():
                kernel = _kernel(x, centre, log_precision)
            total = float(kernel.sum())
            if not total > 0:
                raise _underflow(index)
            remaining = remaining * (1 - kernel / kernel.max())
            centres.append(centre.cpu().double().numpy())
            log_precisions.append(float(log_precision))
            weights.append(total)
            slice_losses.append(float(kernel @ losses) / total)
            members = min(n, max(1, round(total)))
            thresholds.append(float(torch.topk(kernel, members).values[-1]))

        self.centres_ = np.stack(centres)
        self.log_precisions_ = np.array(log_precisions)
        self.slice_weights_ = np.array(weights)
        self.slice_losses_ = np.array(slice_losses)
        self.thresholds_ = np.array(thresholds)
        self.losses_ = losses.cpu().double().numpy()
        self.n_features_ = inputs.embeddings.shape[1]
        self.n_classes_ = inputs.n_classes
        return self

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=_DTYPES[self.dtype], device=self._device)

    def _losses(self, inputs: SlicerInputs) -> torch.Tensor:
        targets = torch.as_tensor(inputs.targets, device=self._device)
        if self.loss == "probs_as_logits":
            return F.cross_entropy(self._tensor(inputs.pred_probs), targets, reduction="none")
        eps = np.finfo(np.float64).eps
        picked = inputs.pred_probs[np.arange(len(inputs.targets)), inputs.targets]
        return self._tensor(-np.log(np.clip(picked, eps, 1.0)))

    def _optimise(self, x, losses, min_weight, barrier_widths, index):
        centre = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        log_precision = torch.tensor(math.log(self.initial_precision), dtype=torch.float64,
                                     device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([centre, log_precision], lr=self.learning_rate)
        plateau = self._plateau(optimizer)
        steps = tqdm(barrier_widths, desc=f"Spotlight {index + 1}/{self.n_slices}",
                     disable=not self.progress, leave=False)
        for width in steps:
            optimizer.zero_grad()
            objective = self._objective(x, losses, centre, log_precision, min_weight, float(width))
            if not torch.isfinite(objective):
                raise _underflow(index)
            objective.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            plateau.step(objective.item())
            if optimizer.param_groups[0]["lr"] != lr:
                # After each decay the plateau starts afresh (forgets its best value), as in the reference.
                plateau = self._plateau(optimizer)
        return centre.detach(), log_precision.detach()

    def _plateau(self, optimizer) -> ReduceLROnPlateau:
        return ReduceLROnPlateau(optimizer, patience=self.lr_patience, factor=self.lr_decay)

    def _objective(self, x, losses, centre, log_precision, min_weight: float, width: float) -> torch.Tensor:
        """Minus the kernel-weighted mean loss, plus the size barrier while it is active."""
        kernel = _kernel(x, centre, log_precision)
        total = kernel.sum()
        objective = -((kernel / total) @ losses)
        floor = min_weight + width
        if total < floor:
            objective = objective + self.barrier_scale * (total - floor) ** 2 / width**2
        return objective

    # ------------------------------------------------------------ predict
    def predict_proba(self, embeddings, targets, pred_probs) -> np.ndarray:
        """(N, n_slices) kernel weights exp(-p ||x - m||^2 / 2) in [0, 1], in the order found.

        ``targets`` and ``pred_probs`` are validated for the common interface; the scores
        depend on the embeddings only.
        """
        inputs = self._check_predict_inputs(embeddings, targets, pred_probs, need_embeddings=True)
        x = self._tensor(inputs.embeddings)
        with torch.no_grad():
            columns = [
                _kernel(x, self._tensor(centre), torch.tensor(log_precision, dtype=torch.float64))
                for centre, log_precision in zip(self.centres_, self.log_precisions_)
            ]
        return torch.stack(columns, dim=1).cpu().double().numpy()

    def predict(self, embeddings, targets, pred_probs) -> np.ndarray:
        """Every example's slice, or -1.

        An example is in spotlight j when its kernel weight reaches ``thresholds_[j]``, so
        that on the fit data a spotlight holds as many examples as its total weight. An
        example in several takes the earliest found: each spotlight is what remains once the
        earlier ones are removed (a later, wider spotlight does not take over their members).
        """
        scores = self.predict_proba(embeddings, targets, pred_probs)
        inside = scores >= self.thresholds_
        return np.where(inside.any(axis=1), inside.argmax(axis=1), -1)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _underflow(index: int) -> InputError:
    return InputError(
        f"spotlight {index + 1}: every kernel weight underflowed to 0; the embeddings are far from the "
        "origin for initial_precision, or learning_rate is too large for their scale: centre or rescale "
        "them, or lower initial_precision / learning_rate"
    )


def _kernel(x: torch.Tensor, centre: torch.Tensor, log_precision: torch.Tensor) -> torch.Tensor:
    """exp(-p ||x_i - m||^2 / 2) for every row x_i; p = exp(log_precision), cast to x's dtype."""
    offset = x - centre
    squared = ((offset * torch.exp(log_precision)) * offset).sum(dim=1)
    return torch.exp(-squared / 2)
