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
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from harness.batching import move_to, unsqueeze_leaves
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
        """Inverse of :meth:`flatten`; leading dimensions (a block of vectors) are kept."""
        out, start = {}, 0
        lead = vector.shape[:-1]
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            part = vector[..., start : start + size]
            out[name] = part.view(shape) if not lead else part.reshape(*lead, *shape)
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


# ---------------------------------------------------------------- the differentiable loss
class FunctionalLoss:
    """The task's loss as a pure function of the selected parameters.

    ``per_example_grads`` uses ``vmap(grad)`` (one backward per batch, not per example);
    ``hvp`` uses forward-over-reverse (``jvp`` of ``grad``), the cheapest exact HVP;
    ``hvp_block`` vmaps it over a block of tangents, so the primal forward and backward
    run once for the whole block; ``ggn_block`` is the Gauss-Newton product J^T H_z J.
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
            return self.batch_loss(p, unsqueeze_leaves(example))

        grads = vmap(grad(single), in_dims=(None, 0), chunk_size=self.chunk_size)(params, batch)
        return self.selection.flatten(grads, batch_dims=1)

    def hvp(self, params: dict[str, torch.Tensor], batch: Any, vector: torch.Tensor) -> torch.Tensor:
        """(sum over the batch of per-example Hessians) @ vector, flattened."""
        tangent = self.selection.unflatten(vector)
        _, out = jvp(lambda p: grad(self.batch_loss)(p, batch), (params,), (tangent,))
        return self.selection.flatten(out)

    def hvp_block(self, params: dict[str, torch.Tensor], batch: Any, vectors: torch.Tensor) -> torch.Tensor:
        """(b, |theta|) block of HVPs; ``vmap`` over the tangents only, so the primal pass
        (unbatched under vmap) runs once for the block."""
        tangents = self.selection.unflatten(vectors)

        def one(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return jvp(lambda p: grad(self.batch_loss)(p, batch), (params,), (tangent,))[1]

        return self.selection.flatten(vmap(one)(tangents), batch_dims=1)

    def ggn_block(self, params: dict[str, torch.Tensor], batch: Any, vectors: torch.Tensor) -> torch.Tensor:
        """(b, |theta|) block of Gauss-Newton products G v = sum_i J_i^T H_z,i J_i v, where
        J_i is the Jacobian of example i's logits and H_z,i the Hessian of its
        cross-entropy with respect to the logits (positive semi-definite)."""
        if type(self.task).loss is not Task.loss:
            raise InputError(
                f'curvature="ggn" needs a task whose loss is cross-entropy of its logits; {type(self.task).__name__} '
                'overrides Task.loss, so the split into logits and loss is unknown (use curvature="hessian")'
            )
        targets = self.task.targets(batch)

        def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.task.logits(self._call(p), batch)

        def summed_loss(z: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(z, targets, reduction="sum")

        z, pullback = vjp(logits, params)

        def one(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            _, jv = jvp(logits, (params,), (tangent,))
            _, hjv = jvp(grad(summed_loss), (z,), (jv,))
            return pullback(hjv)[0]

        return self.selection.flatten(vmap(one)(self.selection.unflatten(vectors)), batch_dims=1)

    def directional_derivatives(
        self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor, chunk_size: int | None = None
    ) -> torch.Tensor:
        """per-example gradients @ projection, (B, D), without any per-example gradient.

        Column k is the directional derivative of every example's loss along projection
        column k: one forward-mode pass (jvp) per column, vmapped over the D columns, so the
        primal forward runs once and the tangents share its batched kernels. Costs ~D
        tangent forwards instead of a per-example backward plus a (B, |theta|) block; it pays
        when D is small and per-example gradients are slow (convolutions, whose per-example
        weight gradients vmap cannot batch efficiently).
        """

        def directional(column: torch.Tensor) -> torch.Tensor:
            _, derivative = jvp(lambda p: self.losses(p, batch), (params,), (self.selection.unflatten(column),))
            return derivative

        return vmap(directional, in_dims=1, out_dims=1, chunk_size=chunk_size)(projection)

    def saved_bytes(self, params: dict[str, torch.Tensor], batch: Any) -> int:
        """Bytes autograd saves for one batch's backward: the memory each extra Krylov
        direction of :meth:`hvp_block` roughly needs again for its tangents."""
        total = [0]

        def count(tensor: torch.Tensor) -> torch.Tensor:
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            self.batch_loss(leaves, batch)
        return total[0]


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
# At the same P a block Krylov space has polynomial degree P / b instead of P, so it
# converges more slowly. Measured in float64 against explicit Hessians (MLPs of 442 and
# 1,042 parameters on digits; tests/test_block_krylov.py), top-D influence r vs the exact:
# P = 8 D: b <= 4 gives r = 1.0000000, b = 8 0.99999; P = 5 D: b = 2 0.9999998, b = 4
# 0.9995, b = 8 0.989; P = 4 D: b = 2 0.99918 where b = 1 gives 0.999999. Hence
# b <= P / (2 D) - 1: blocks pay only when P is many times D.
MAX_BLOCK_SIZE = 8  # beyond ~8 tangents per pass the per-HVP saving flattens while memory keeps growing


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (cuDNN defaults to TF32 on Ampere and
    later: ~1e-3 relative error per HVP, enough to spoil a Krylov basis); restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def memory_budget(device: torch.device) -> int:
    """A quarter of the device's *total* memory (not free memory: the same machine then
    always makes the same choice, and the same seed gives the same factors)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total // 4)


def automatic_block_size(per_direction_bytes: int, n_iterations: int, n_components: int, device: torch.device) -> int:
    """Directions per HVP pass: at most P / (2 D) - 1 (convergence, see above) and
    :data:`MAX_BLOCK_SIZE`, and as many as fit a quarter of the device's *total* memory
    (total, not free, so the same machine always picks the same size and the same seed
    gives the same factors)."""
    converging = n_iterations // (2 * n_components) - 1
    if converging <= 1:
        return 1
    fitting = int(memory_budget(device) // max(per_direction_bytes, 1))
    return max(1, min(MAX_BLOCK_SIZE, converging, fitting))


@dataclass
class ArnoldiResult:
    basis: torch.Tensor  # (m, |theta|) orthonormal rows q_1..q_m, the directions whose HVPs were computed
    hessenberg: np.ndarray  # (k >= m, m) float64: H Q_m^T = Q_k^T T (block Hessenberg T)
    breakdown: bool
    deflated: np.ndarray  # (m,) norm of the dropped remainder of each H q_c (0 where none was dropped)


def arnoldi(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    n_iterations: int,
    *,
    block_size: int = 1,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    basis_device: torch.device,
    breakdown_tol: float,
    progress: bool,
    basis_dtype: torch.dtype | None = None,
) -> ArnoldiResult:
    """Block Arnoldi iteration with full (twice-applied classical Gram-Schmidt)
    reorthogonalisation; ``matvec`` maps a (b, dim) block of directions to their HVPs.

    ``n_iterations`` (P) is the total number of HVPs, whatever the block size: each pass
    multiplies up to ``block_size`` basis vectors that have no HVP yet, and every result is
    orthogonalised against the whole basis and appended. With ``block_size=1`` this is
    plain Arnoldi. A remainder whose norm falls below ``breakdown_tol`` times the largest
    HVP norm seen (with blocks: the smaller of that and 1e3 x the basis's machine epsilon)
    is dropped (deflation); when no direction is left the Krylov space is (numerically)
    invariant, which is normal for rank-deficient Hessians.

    The basis is kept in ``basis_dtype`` (default ``dtype``; float64 makes it orthogonal to
    double precision); HVPs are computed in ``dtype``.
    """
    n_iterations = min(n_iterations, dim)
    block_size = max(1, min(block_size, n_iterations))
    basis_dtype = basis_dtype or dtype
    capacity = n_iterations + block_size  # the last pass appends up to b directions beyond P
    basis = torch.empty(capacity, dim, dtype=basis_dtype, device=basis_device)
    hess = np.zeros((capacity, n_iterations), dtype=np.float64)
    deflated = np.zeros(n_iterations, dtype=np.float64)
    size = 0  # basis vectors so far
    scale = 0.0
    # Plain Arnoldi stops at the first small remainder. A block goes on with its other
    # directions, and a remainder dropped there takes its small-eigenvalue components with
    # it (measured: the trailing eigenpairs of a rank-deficient Hessian go wrong), so a
    # block drops only remainders at round-off level.
    drop_tol = breakdown_tol if block_size == 1 else min(breakdown_tol, 1e3 * torch.finfo(basis_dtype).eps)

    def append(w: torch.Tensor, column: int | None) -> bool:
        """Orthogonalises w against the basis; appends it unless it deflates."""
        nonlocal size
        coeffs = torch.zeros(size, dtype=torch.float64)
        for _ in range(2):  # CGS2: one pass leaves O(eps * kappa) loss of orthogonality
            h = basis[:size] @ w
            w = w - basis[:size].T @ h
            coeffs += h.double().cpu()
        beta = float(w.norm())
        if column is not None:
            hess[:size, column] = coeffs.numpy()
        if beta <= drop_tol * max(scale, np.finfo(np.float64).tiny):
            if column is not None:
                deflated[column] = beta
            return False
        if column is not None:
            hess[size, column] = beta
        basis[size] = w / beta
        size += 1
        return True

    for i in range(block_size):  # random orthonormal start block; row by row to bound memory
        row = torch.randn(dim, generator=generator, dtype=torch.float64)
        if i == 0:
            basis[0] = (row / row.norm()).to(device=basis_device, dtype=basis_dtype)
            size = 1
        else:
            scale = float(row.norm())
            append(row.to(device=basis_device, dtype=basis_dtype), None)
    scale = 0.0
    done = 0  # HVPs computed = basis vectors multiplied
    bar = tqdm(total=n_iterations, desc="Arnoldi (HVPs)", disable=not progress, leave=False)
    while done < n_iterations and done < size:
        stop = min(size, done + block_size, n_iterations)
        products = matvec(basis[done:stop].to(device=device, dtype=dtype)).to(device=basis_device, dtype=basis_dtype)
        check_finite(products, f"the Hessian-vector products of Arnoldi directions {done}..{stop - 1}")
        scale = max(scale, float(products.norm(dim=1).max()))
        for column, w in zip(range(done, stop), products):
            append(w, column)
        bar.update(stop - done)
        done = stop
    bar.close()
    breakdown = done < n_iterations
    return ArnoldiResult(
        basis=basis[:done], hessenberg=hess[:size, :done], breakdown=breakdown, deflated=deflated[:done]
    )


def top_eigenpairs(
    hessenberg: np.ndarray, n_components: int, rtol: float, deflated: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top eigenpairs of the symmetrised restriction R of H to the Krylov space.

    The Ritz residual of a pair (theta, y) is ||H Q y - theta Q y||: the rows of the
    Hessenberg matrix below R times y (those basis vectors are orthonormal), plus the
    remainders dropped by deflation (``deflated``), bounded by their triangle sum.

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
    kept = vectors[:, keep]
    residuals = np.linalg.norm(hessenberg[m:] @ kept, axis=0)
    if deflated is not None:
        residuals = residuals + np.abs(deflated) @ np.abs(kept)
    return values[keep], kept, residuals, values
