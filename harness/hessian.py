"""Per-example gradients, Hessian-vector products and the Arnoldi factorisation.

Everything here works on a *selection* of a model's parameters (``layers``): the
rest of the model is frozen and enters ``torch.func.functional_call`` as constants,
so gradients, HVPs and the Krylov basis live in the space of the selected
parameters only.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from harness.errors import InputError
from harness.task import Task


# ---------------------------------------------------------------- parameter selection
@dataclass(frozen=True)
class ParameterSelection:
    """The parameters InfEmbed differentiates, in a fixed order, and how to flatten them."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-name tensors into one vector (or a batch of vectors)."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            out[name] = vector[start : start + size].view(shape)
            start += size
        return out


def select_parameters(model: nn.Module, layers: Sequence[str] | str | None) -> ParameterSelection:
    """Parameters of the named modules (or exact parameter names); all trainable ones if None."""
    named = dict(model.named_parameters())
    if layers is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise InputError("no trainable parameter selected: the model has no parameter with requires_grad=True")
    else:
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise InputError("no trainable parameter selected: `layers` is empty")
        modules = dict(model.named_modules())
        chosen: list[str] = []
        for layer in layers:
            if layer in named:
                matches = [layer]
            elif layer in modules:
                prefix = f"{layer}." if layer else ""
                matches = [n for n in named if n.startswith(prefix)]
                if not matches:
                    raise InputError(f"no trainable parameter selected: module {layer!r} has no parameters")
            else:
                close = difflib.get_close_matches(layer, list(modules) + list(named), n=5)
                hint = f"; did you mean one of {close}?" if close else ""
                raise InputError(f"unknown layer name {layer!r}: not a module or parameter of the model{hint}")
            chosen.extend(m for m in matches if m not in chosen)
        names = [n for n in named if n in chosen]  # model order, whatever order the user gave
    return ParameterSelection(tuple(names), tuple(named[n].shape for n in names))


# ---------------------------------------------------------------- batches
def move_to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_length(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_length(next(iter(batch.values())))
    return batch_length(batch[0])


def _unsqueeze_leaves(example: Any) -> Any:
    if torch.is_tensor(example):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {k: _unsqueeze_leaves(v) for k, v in example.items()}
    return type(example)(_unsqueeze_leaves(v) for v in example)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm and Dropout behave as at inference; the caller's modes are restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


# ---------------------------------------------------------------- the differentiable loss
class FunctionalLoss:
    """The task's loss as a pure function of the selected parameters.

    ``per_example_grads`` uses ``vmap(grad)`` (one backward per batch, not per example);
    ``hvp`` uses forward-over-reverse (``jvp`` of ``grad``), the cheapest exact HVP.
    """

    def __init__(self, model: nn.Module, task: Task, selection: ParameterSelection, chunk_size: int | None = None):
        self.model, self.task, self.selection, self.chunk_size = model, task, selection, chunk_size
        selected = set(selection.names)
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
        self.frozen.update(dict(model.named_buffers()))

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.selection.names}

    def _call(self, params: dict[str, torch.Tensor]) -> Callable[..., Any]:
        state = {**self.frozen, **params}
        return lambda *args, **kwargs: functional_call(self.model, state, args, kwargs)

    def losses(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.task.loss(self._call(params), batch)

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.losses(params, batch).sum()

    def per_example_grads(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """(B, |theta|) matrix of per-example loss gradients."""

        def single(p: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            return self.batch_loss(p, _unsqueeze_leaves(example))

        grads = vmap(grad(single), in_dims=(None, 0), chunk_size=self.chunk_size)(params, batch)
        return self.selection.flatten(grads, batch_dims=1)

    def hvp(self, params: dict[str, torch.Tensor], batch: Any, vector: torch.Tensor) -> torch.Tensor:
        """(sum over the batch of per-example Hessians) @ vector, flattened."""
        tangent = self.selection.unflatten(vector)
        _, out = jvp(lambda p: grad(self.batch_loss)(p, batch), (params,), (tangent,))
        return self.selection.flatten(out)


def iterate_batches(
    loader: Iterable,
    task: Task,
    loss: FunctionalLoss,
    device: torch.device,
    validate: bool,
    what: str,
    allow_empty: bool = False,
) -> Iterator[tuple[int, Any]]:
    """Yields (index, model batch on device); validates every batch (``validate``) or the first."""
    n_batches = 0
    for i, raw in enumerate(loader):
        batch = move_to(task.model_batch(raw), device)
        if validate or i == 0:
            task.validate(loss._call(loss.params()), batch)
        n_batches += 1
        yield i, batch
    if n_batches == 0 and not allow_empty:
        raise InputError(f"empty loader: the {what} loader yielded no batch")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise InputError(f"non-finite values in {what}: check the model, the inputs and the loss")


# ---------------------------------------------------------------- Arnoldi
@dataclass
class ArnoldiResult:
    basis: torch.Tensor  # (m, |theta|) orthonormal rows q_1..q_m
    hessenberg: np.ndarray  # (m + 1, m) float64: H Q^T = Q^T R + beta q_{m+1} e_m^T
    breakdown: bool


def arnoldi(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    n_iterations: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    basis_device: torch.device,
    breakdown_tol: float,
    progress: bool,
) -> ArnoldiResult:
    """Arnoldi iteration with full (twice-applied classical Gram-Schmidt) reorthogonalisation.

    Stops early when the new direction's norm falls below ``breakdown_tol`` times the
    largest HVP norm seen: the Krylov space is then (numerically) invariant, which is
    normal for rank-deficient Hessians.
    """
    n_iterations = min(n_iterations, dim)
    basis = torch.empty(n_iterations + 1, dim, dtype=dtype, device=basis_device)
    hess = np.zeros((n_iterations + 1, n_iterations), dtype=np.float64)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype)
    basis[0] = (start / start.norm()).to(basis_device)
    scale, breakdown, m = 0.0, False, n_iterations
    bar = tqdm(range(n_iterations), desc="Arnoldi (HVP passes)", disable=not progress, leave=False)
    for k in bar:
        w = matvec(basis[k].to(device)).to(basis_device)
        check_finite(w, f"the Hessian-vector product of Arnoldi iteration {k}")
        scale = max(scale, float(w.norm()))
        coeffs = torch.zeros(k + 1, dtype=torch.float64)
        for _ in range(2):  # CGS2: one pass leaves O(eps * kappa) loss of orthogonality
            h = basis[: k + 1] @ w
            w = w - basis[: k + 1].T @ h
            coeffs += h.double().cpu()
        hess[: k + 1, k] = coeffs.numpy()
        beta = float(w.norm())
        hess[k + 1, k] = beta
        if beta <= breakdown_tol * max(scale, np.finfo(np.float64).tiny):
            breakdown, m = True, k + 1
            break
        basis[k + 1] = w / beta
    bar.close()
    return ArnoldiResult(basis=basis[:m], hessenberg=hess[: m + 1, :m], breakdown=breakdown)


def top_eigenpairs(
    hessenberg: np.ndarray, n_components: int, rtol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top eigenpairs of the symmetrised restriction R of H to the Krylov space.

    Returns (eigenvalues, eigenvectors, ritz_residuals, all_eigenvalues). Keeps the
    ``n_components`` largest eigenvalues and then drops every one that is not
    greater than ``rtol * largest`` (zero or negative curvature: no inverse exists there,
    so those directions are left out, exactly as a pseudo-inverse does).
    """
    m = hessenberg.shape[1]
    restriction = hessenberg[:m, :m]
    # H is symmetric, so R is in exact arithmetic; symmetrise away round-off and use eigh.
    values, vectors = np.linalg.eigh((restriction + restriction.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    largest = values[0]
    if largest <= 0:
        raise InputError(
            "the Hessian has no positive curvature in the Krylov space (largest eigenvalue "
            f"{largest:.3g}); influence embeddings are undefined. Is the model trained?"
        )
    keep = np.arange(min(n_components, m))
    keep = keep[values[keep] > rtol * largest]
    residuals = np.abs(hessenberg[m, m - 1] * vectors[m - 1, keep])
    return values[keep], vectors[:, keep], residuals, values
