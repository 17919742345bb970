"""InfluenceEmbedder: FactorHessian (fit) and influence embeddings (transform).

mu(z) = lambda^{-1/2} M^T grad_theta L(z; theta), so that the practical influence of a
training example z' on an example z is I(z', z) = mu(z')^T mu(z) (paper, eq. 2 and 5).

**Which Hessian.** The paper writes both the mean (section 2) and the sum (Algorithm 3)
of the per-example Hessians. We use the *mean* over the Hessian data by default
(``hessian_reduction="mean"``), the Hessian of the objective the model was trained on;
``"sum"`` gives Captum's convention. The two differ only by a factor: embeddings with
"sum" equal embeddings with "mean" divided by sqrt(N'), influences by N'.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harness import distributed
from harness.batching import batch_length, eval_mode, move_to
from harness.errors import InputError, warn_caller
from harness.hessian import (
    FunctionalLoss,
    ParameterSelection,
    arnoldi,
    automatic_block_size,
    check_finite,
    full_precision,
    iterate_batches,
    memory_budget,
    select_parameters,
    top_eigenpairs,
)
from harness.io import atomic_torch_save, check_output_path, load_torch_file
from harness.task import ClassificationTask, Task
from harness.validation import (
    check_bool,
    check_choice,
    check_device,
    check_factors_state,
    check_float,
    check_int,
    check_layers,
    check_loader,
    check_loader_order,
    check_optional_int,
    check_seed,
)

FACTORS_FORMAT = "harness.influence-factors/1"
CURVATURES = ("hessian", "ggn")
PROJECTIONS = ("auto", "gradients", "forward", "closed_form", "layerwise")
# A kept eigenpair whose Ritz residual exceeds this fraction of its eigenvalue has not
# converged: its direction (and so the embeddings) can be far from the Hessian's.
RITZ_RESIDUAL_WARNING = 0.1
# Forward mode costs ~one tangent forward per embedding column; per-example gradients
# cost a backward that vmap runs well for linear layers but ~70x slower than a plain
# backward for convolutions on CPU (measured, see results/bench): the break-even D.
FORWARD_MODE_MAX_DIM = {"convolutional": 24, "linear": 2}


@dataclass
class FactorConfig:
    """How FactorHessian runs. Every field is an argument of InfluenceEmbedder."""

    arnoldi_dim: int = field(default=500, metadata={"help": "P: Arnoldi iterations (HVP passes over the fit data)."})
    embedding_dim: int = field(default=100, metadata={"help": "D: top eigenpairs kept; embedding width."})
    seed: int = field(default=0, metadata={"help": "Seed of the Arnoldi start vector."})
    hessian_reduction: str = field(
        default="mean", metadata={"help": "'mean' or 'sum' of per-example Hessians.", "choices": ("mean", "sum")}
    )
    eigenvalue_rtol: float = field(
        default=1e-5,
        metadata={"help": "Eigenvalues <= rtol * largest are dropped (no curvature, no inverse)."},
    )
    breakdown_tol: float = field(
        default=1e-6, metadata={"help": "Arnoldi stops when a new direction's norm < tol * largest HVP norm."}
    )
    damping: float = field(default=0.0, metadata={"help": "Added to every kept eigenvalue (H + damping I)."})
    curvature: str = field(
        default="hessian",
        metadata={
            "help": "'hessian' (the paper) or 'ggn' (Gauss-Newton: positive semi-definite, ~3x cheaper).",
            "choices": CURVATURES,
        },
    )
    block_size: int | str = field(
        default="auto",
        metadata={"help": "Krylov directions per HVP pass (1 = plain Arnoldi); 'auto': from P / D and memory."},
    )
    float64_basis: bool = field(default=False, metadata={"help": "Keep the Krylov basis in float64."})
    merge_fit_batches: bool = field(
        default=True,
        metadata={
            "help": "Concatenate fit batches of equal layout into larger ones (within a memory budget): fewer, "
            "larger HVP calls for the same Hessian (round-off aside)."
        },
    )
    frozen_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run the frozen modules before theta once per fit batch, not once per HVP pass (used only "
            "where checked exact on the first batch and the outputs fit a quarter of the device's memory)."
        },
    )


class InfluenceEmbedder:
    """Influence embeddings of a trained model, scikit-learn style.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model. Used in eval mode (BatchNorm statistics frozen, no dropout)
        during fit and transform; its own mode is restored afterwards.
    layers : str or sequence of str, optional
        Module names (``"fc"``, ``"layer4"``, ``"bert.pooler.dense"``) or exact parameter
        names whose parameters define theta. ``None``: every parameter with
        ``requires_grad``.
    arnoldi_dim : int
        P, the number of Arnoldi iterations = Hessian-vector-product passes over the fit
        data (paper: 500). Capped at the number of selected parameters.
    embedding_dim : int
        D, the number of top eigenpairs kept = embedding width (paper: 100). Fewer are
        kept, with a warning, when the Hessian has fewer positive eigenvalues above
        ``eigenvalue_rtol`` (e.g. softmax regression always has a null space).
    seed : int
        Seed of the random Arnoldi start vector; the same seed gives the same factors.
    task : harness.Task, optional
        Maps a batch to per-example losses. Default: :class:`ClassificationTask`
        (batches ``(inputs, targets)``, cross-entropy).
    hessian_reduction : {"mean", "sum"}
        Hessian of the mean (default) or of the summed loss over the fit data.
    eigenvalue_rtol, breakdown_tol, damping : float
        See :class:`FactorConfig`.
    curvature : {"hessian", "ggn"}
        The curvature FactorHessian factors: the Hessian (default, the paper) or the
        Gauss-Newton matrix J^T H_z J (positive semi-definite, so no negative
        eigenvalues; about 3x cheaper per product; needs a cross-entropy task).
    block_size : int or "auto"
        Krylov directions whose HVPs share one pass over the fit data (vmap over the
        tangents, the primal computed once per batch); the total number of HVPs stays P.
        1 is plain Arnoldi. A block space of the same P converges more slowly, so "auto"
        takes at most P / (2 D) - 1 directions (1 at the paper's P = 5 D), at most 8, and
        as many as fit a quarter of the device's memory; ``block_size_`` says which.
        Different block sizes span different Krylov spaces: pass an int for factors that
        must not depend on the machine.
    float64_basis : bool
        Keep the P x |theta| Krylov basis (and its orthogonalisation) in float64.
    merge_fit_batches : bool
        Fit concatenates consecutive fit batches whose tensors agree in everything but
        the example count into batches of up to a sixteenth of the device's memory (by
        the bytes autograd saves per example), held for the P passes when the inputs fit a
        quarter of it: the same summed Hessian in fewer, larger HVP calls (small models
        spend most of an HVP in per-call overhead); sums differ only by round-off.
    frozen_prefix : bool
        Fit runs the frozen modules a forward passes through before it reaches theta (a
        ResNet's conv1..layer3 for theta = layer4 + fc) once per fit batch and replays
        their outputs in the P passes, where :class:`harness.fastpaths.FrozenPrefix`
        checks that exact on the first batch and their outputs for all fit batches fit a
        quarter of the device's memory; ``frozen_prefix_`` names the replayed modules.
    projection : {"auto", "gradients", "forward", "closed_form", "layerwise"}
        How transform computes gradients times M lambda^-1/2, all exact: per-example
        gradients (vmap), forward-mode directional derivatives (one tangent per
        embedding column), the closed form when theta is a last nn.Linear producing
        the logits of a cross-entropy task, or layer-wise from each selected layer's
        inputs and output gradients (one forward and backward per batch; theta made of
        Linear, Conv1d/2d, LayerNorm and BatchNorm layers, see
        :class:`harness.fastpaths.LayerwiseProjection`). "auto" picks the closed form
        where it applies, else layer-wise (checked on the first batch), else forward
        mode when D is small (<= 24 with convolutions in theta, <= 2 otherwise), else
        per-example gradients; ``projection_mode_`` says which.
    trunk : callable, optional
        When the selected layers are a suffix of the network, say so here: ``model`` is
        then the head that holds them, and ``trunk`` maps a model batch of the loaders
        to the head's batch (e.g. ``lambda b: (features(b[0]), b[1])``). It runs once per
        example, without gradients: fit keeps the N' head batches in memory for its P
        passes, transform maps each batch as it streams.
    device : str or torch.device, optional
        Where gradients and HVPs are computed; default: the model's device.
    basis_device : str or torch.device, optional
        Where the P x |theta| Krylov basis is stored (e.g. ``"cpu"`` when it does not
        fit on the accelerator); default: ``device``.
    chunk_size : int, optional
        Examples per vmap chunk when computing per-example gradients (bounds memory).
    progress : bool
        Show tqdm progress bars.

    Raises
    ------
    InputError
        The constructor rejects: a ``model`` that is not an ``nn.Module``; a ``task`` that
        is not a :class:`harness.Task`; ``arnoldi_dim``, ``embedding_dim`` that are not
        integers >= 1 (``True``, ``10.0``, ``"5"`` included) or ``embedding_dim >
        arnoldi_dim``; a ``seed`` outside the integers 0..2**32-1 (``"abc"``, ``1.7``,
        ``-1``); ``damping`` not finite or < 0; ``eigenvalue_rtol`` / ``breakdown_tol``
        not finite or outside [0, 1); ``hessian_reduction`` other than "mean"/"sum";
        ``chunk_size`` < 1; a non-bool ``progress``; a ``device`` / ``basis_device`` that
        is not a device name or does not exist here (``"cuda"`` without a GPU); ``layers``
        that are not names or select no trainable parameter.
        :meth:`fit` and :meth:`transform` reject: a loader that is not an iterable of
        batches, and for :meth:`fit` one that cannot be passed over repeatedly (a
        generator or iterator); an empty loader; batches that are not
        ``(inputs, targets)`` for the task; targets that are not 1-D integer class indices
        in range or do not match the inputs in length; inputs the model cannot run on
        (wrong width or dtype); non-finite gradients or embeddings. :meth:`transform` and
        :meth:`gradients` reject a shuffling loader (``shuffle=True``, random samplers).
        :meth:`load` rejects: a missing file; a file that is not a torch zip, or that
        names any Python object (it is read with ``weights_only=True``: nothing in it
        runs); another format tag; missing fields, unknown config keys, config values the
        constructor rejects; factors, eigenvalues, residuals or spectrum that are not
        finite floating tensors of matching shapes; eigenvalues <= 0; a model whose
        selected parameters differ in name or shape; keyword arguments that the file fixes
        (``layers`` and the :class:`FactorConfig` fields).
        :meth:`save` rejects a target that is a directory, symlink or device, or in a
        folder where no file can be created (see :func:`harness.io.atomic_path`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | str | None = None,
        arnoldi_dim: int = 500,
        embedding_dim: int = 100,
        seed: int = 0,
        *,
        task: Task | None = None,
        hessian_reduction: str = "mean",
        eigenvalue_rtol: float = 1e-5,
        breakdown_tol: float = 1e-6,
        damping: float = 0.0,
        device: str | torch.device | None = None,
        basis_device: str | torch.device | None = None,
        chunk_size: int | None = None,
        progress: bool = True,
        curvature: str = "hessian",
        block_size: int | str = "auto",
        float64_basis: bool = False,
        merge_fit_batches: bool = True,
        frozen_prefix: bool = True,
        projection: str = "auto",
        trunk: Callable[[Any], Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if task is not None and not isinstance(task, Task):
            raise InputError(f"task must be a harness.Task; got {type(task).__name__}")
        self.config = FactorConfig(
            arnoldi_dim=check_int(arnoldi_dim, "arnoldi_dim", 1),
            embedding_dim=check_int(embedding_dim, "embedding_dim", 1),
            seed=check_seed(seed),
            hessian_reduction=check_choice(hessian_reduction, "hessian_reduction", ("mean", "sum")),
            eigenvalue_rtol=check_float(eigenvalue_rtol, "eigenvalue_rtol", 0.0, 1.0, include_boundaries="left"),
            breakdown_tol=check_float(breakdown_tol, "breakdown_tol", 0.0, 1.0, include_boundaries="left"),
            damping=check_float(damping, "damping", 0.0),
        )
        if self.config.embedding_dim > self.config.arnoldi_dim:
            raise InputError(
                f"embedding_dim ({embedding_dim}) > arnoldi_dim ({arnoldi_dim}): at most P eigenpairs exist"
            )
        if block_size != "auto":
            block_size = check_int(block_size, "block_size", 1)
        if trunk is not None and not callable(trunk):
            raise InputError(f"trunk must be callable (a module or a function of a batch); got {type(trunk).__name__}")
        self.config = replace(
            self.config,
            curvature=check_choice(curvature, "curvature", CURVATURES),
            block_size=block_size,
            float64_basis=check_bool(float64_basis, "float64_basis"),
            merge_fit_batches=check_bool(merge_fit_batches, "merge_fit_batches"),
            frozen_prefix=check_bool(frozen_prefix, "frozen_prefix"),
        )
        self.projection_mode = check_choice(projection, "projection", PROJECTIONS)
        chunk_size = check_optional_int(chunk_size, "chunk_size", 1)
        progress = check_bool(progress, "progress")
        device = check_device(device) if device is not None else None
        basis_device = check_device(basis_device, "basis_device") if basis_device is not None else None
        self.trunk = trunk
        self.model = model
        self.layers = check_layers(layers)
        self.task = task if task is not None else ClassificationTask()
        self.selection: ParameterSelection = select_parameters(model, self.layers)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.basis_device = torch.device(basis_device) if basis_device is not None else self.device
        self.chunk_size = chunk_size
        self.progress = progress
        self._loss = self._make_loss()

    # ------------------------------------------------------------ hooks for fast paths
    def _make_loss(self) -> FunctionalLoss:
        """The differentiable loss fit and transform use; subclasses swap in fast paths
        (see :mod:`harness.fastpaths`)."""
        return FunctionalLoss(self.model, self.task, self.selection, self.chunk_size)

    def _project_batch(self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of one batch times ``projection``: (B, D), by the
        projection :meth:`_choose_projection` picked."""
        mode = self.projection_mode_
        if mode == "closed_form":
            return self._linear_logits_head.project(batch, projection)
        if mode == "layerwise":
            embeddings = self._layerwise.project(params, batch, projection)
            if embeddings is not None:
                return embeddings
            if self.projection_mode == "layerwise":
                raise InputError(
                    'projection="layerwise" does not apply to this model: a selected parameter is used outside '
                    "its layer, examples interact, or a layer input is changed in place (use projection=\"auto\")"
                )
            self.projection_mode_ = mode = self._fallback_projection()
        if mode == "forward":
            return self._loss.directional_derivatives(params, batch, projection, self.chunk_size)
        return self._loss.per_example_grads(params, batch) @ projection

    def _choose_projection(self, first_batch: Any) -> str:
        """The exact projection ``projection`` names, or for "auto" the fastest one
        (see the class docstring): the closed form for a last linear layer, layer-wise
        for supported layers, forward mode for small D, per-example gradients otherwise."""
        from harness.fastpaths import LayerwiseProjection, LinearLogitsHead

        requested = self.projection_mode
        head = LinearLogitsHead.find(self.model, self.task, self.selection, self._loss, first_batch)
        if requested == "closed_form" and head is None:
            raise InputError(
                'projection="closed_form" needs theta = one nn.Linear whose output is the logits of a '
                "cross-entropy task (2-D inputs)"
            )
        self._linear_logits_head = head
        self._layerwise = LayerwiseProjection.find(self.model, self.selection, self._loss)
        if requested == "layerwise" and self._layerwise is None:
            raise InputError(
                'projection="layerwise" needs every selected parameter to be the weight or bias of an nn.Linear, '
                "nn.Conv1d/2d (groups=1, zero padding), nn.LayerNorm or BatchNorm layer"
            )
        if requested != "auto":
            return requested
        if head is not None:
            return "closed_form"
        if self._layerwise is not None:
            return "layerwise"
        return self._fallback_projection()

    def _fallback_projection(self) -> str:
        """Forward mode for small D, per-example gradients otherwise."""
        convolutional = any(
            isinstance(module, nn.modules.conv._ConvNd) and any(
                # recursing: a parametrized weight (torch.nn.utils.parametrize) is a child's parameter
                f"{name}.{p}" in self.selection.names for p, _ in module.named_parameters()
            )
            for name, module in self.model.named_modules()
        )
        limit = FORWARD_MODE_MAX_DIM["convolutional" if convolutional else "linear"]
        return "forward" if self.n_components_ <= limit else "gradients"

    # ------------------------------------------------------------ fitted state
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "eigenvalues_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise InputError("this InfluenceEmbedder is not fitted: call fit(loader) or InfluenceEmbedder.load first")

    @property
    def n_components_(self) -> int:
        self._check_fitted()
        return int(self.eigenvalues_.shape[0])

    # ------------------------------------------------------------ fit = FactorHessian
    def fit(self, loader: Iterable) -> "InfluenceEmbedder":
        """FactorHessian on the examples of ``loader`` (a re-iterable of batches).

        Runs P Arnoldi iterations in blocks of ``block_size_`` directions, each block one
        pass of vmapped forward-over-reverse HVPs (or Gauss-Newton products) over the
        loader, then keeps the top-D eigenpairs (M, lambda) of the restricted curvature.
        Sets ``eigenvalues_`` (D,), ``factors_`` M (|theta|, D), ``ritz_residuals_``,
        ``arnoldi_iterations_``, ``block_size_``, ``n_fit_examples_``. Warns when a kept
        eigenpair's Ritz residual exceeds a tenth of its eigenvalue (increase P).

        Under torch.distributed each rank passes its own shard (see
        :func:`harness.distributed.shard`); HVPs are summed over ranks, so every rank
        ends with the same factors.
        """
        check_loader(loader, "fit", passes="P + 1 times")
        cfg = self.config
        self._loss = self._make_loss()
        with eval_mode(self.model), full_precision():
            if self.trunk is not None:
                loader = list(self._head_batches(loader))  # the trunk once, not once per pass
            params = {k: v.to(self.device) for k, v in self._loss.params().items()}
            sharded = distributed.is_distributed()
            n_local, first = 0, None
            for _, batch in iterate_batches(
                loader, self.task, self._loss, self.device, validate=True, what="fit", allow_empty=sharded
            ):
                n_local += batch_length(batch)
                first = batch if first is None else first
            n_examples = int(distributed.all_reduce_sum(torch.tensor([n_local], dtype=torch.int64, device=self.device)))
            if n_examples == 0:
                raise InputError("empty loader: the fit loaders of all ranks yielded no batch")
            scale = 1.0 / n_examples if cfg.hessian_reduction == "mean" else 1.0
            block_size = self._block_size(params, first)
            held = self._merged_batches(params, loader, first, n_local) if cfg.merge_fit_batches else None
            prefix = self._frozen_prefix(params, loader, held, first, n_local)
            if prefix is not None:
                held = prefix.batches
            self.frozen_prefix_ = list(prefix.names) if prefix is not None else []
            self.n_fit_batches_ = len(held) if held is not None else None

            def curvature_product(vectors: torch.Tensor) -> torch.Tensor:
                total = torch.zeros_like(vectors)
                batches = held if held is not None else self._model_batches(loader)
                for i, batch in enumerate(batches):  # validated in the first pass
                    with prefix.replaying(i) if prefix is not None else contextlib.nullcontext():
                        if cfg.curvature == "ggn":
                            total += self._loss.ggn_block(params, batch, vectors)
                        elif len(vectors) == 1:  # plain Arnoldi: no vmap
                            total[0] += self._loss.hvp(params, batch, vectors[0])
                        else:
                            total += self._loss.hvp_block(params, batch, vectors)
                return distributed.all_reduce_sum(total) * scale

            generator = torch.Generator().manual_seed(cfg.seed)
            dtype = next(iter(params.values())).dtype
            result = arnoldi(
                curvature_product,
                self.selection.numel,
                cfg.arnoldi_dim,
                block_size=block_size,
                generator=generator,
                dtype=dtype,
                device=self.device,
                basis_device=self.basis_device,
                basis_dtype=torch.float64 if cfg.float64_basis else None,
                breakdown_tol=cfg.breakdown_tol,
                progress=self.progress,
            )
        values, vectors, residuals, spectrum = top_eigenpairs(
            result.hessenberg, cfg.embedding_dim, cfg.eigenvalue_rtol, result.deflated
        )
        if len(values) < cfg.embedding_dim:
            warn_caller(
                f"kept {len(values)} of embedding_dim={cfg.embedding_dim} eigenpairs: the rest have eigenvalue "
                f"<= {cfg.eigenvalue_rtol:g} x largest (the Hessian is rank-deficient or not positive definite "
                f"there, or P={result.basis.shape[0]} Arnoldi iterations found no more)"
            )
        relative = residuals / values
        if len(values) and relative.max() > RITZ_RESIDUAL_WARNING:
            worst = int(relative.argmax())
            warn_caller(
                f"{int((relative > RITZ_RESIDUAL_WARNING).sum())} of {len(values)} kept eigenpairs have not converged: "
                f"Ritz residual up to {relative[worst]:.2g} x its eigenvalue (pair {worst + 1}, eigenvalue "
                f"{values[worst]:.3g}); increase arnoldi_dim (P={result.basis.shape[0]}) or lower embedding_dim"
            )
        vectors_t = torch.as_tensor(vectors, dtype=result.basis.dtype, device=result.basis.device)
        factors = result.basis.T @ vectors_t  # M = Q V
        self.factors_ = factors.to(device=self.device, dtype=dtype)
        self.eigenvalues_ = torch.as_tensor(values + cfg.damping, dtype=torch.float64)
        self.ritz_residuals_ = residuals
        self.arnoldi_spectrum_ = spectrum
        self.arnoldi_iterations_ = int(result.basis.shape[0])
        self.arnoldi_breakdown_ = bool(result.breakdown)
        self.block_size_ = int(block_size)
        self.n_fit_examples_ = int(n_examples)
        self._projection = None
        return self

    def _model_batches(self, loader: Iterable) -> Iterator[Any]:
        for raw in loader:
            yield move_to(self.task.model_batch(raw), self.device)

    def _merged_batches(self, params: dict[str, torch.Tensor], loader: Iterable, first_batch: Any, n_examples: int):
        """The fit batches concatenated (see ``merge_fit_batches``), or None: stream the
        loader in every pass (its inputs do not fit, or nothing would be merged)."""
        from harness.fastpaths import concatenate_batches, same_layout, tensor_bytes

        if first_batch is None:
            return None
        first_size = max(batch_length(first_batch), 1)
        input_bytes = tensor_bytes(first_batch) / first_size
        budget = memory_budget(self.device)
        if input_bytes * n_examples > budget or n_examples <= first_size:
            return None
        per_example = 3 * self._loss.saved_bytes(params, first_batch) / first_size + input_bytes
        largest = max(first_size, int(budget // 4 // max(per_example, 1)))
        merged: list[Any] = []
        pending: list[Any] = []
        count = 0
        for batch in self._model_batches(loader):
            size = batch_length(batch)
            if pending and (count + size > largest or not same_layout(pending[0], batch)):
                merged.append(concatenate_batches(pending))
                pending, count = [], 0
            pending.append(batch)
            count += size
        if pending:
            merged.append(concatenate_batches(pending))
        return merged

    def _frozen_prefix(self, params: dict[str, torch.Tensor], loader: Iterable, held: list | None,
                       first_batch: Any, n_examples: int):
        """The FrozenPrefix holding its outputs for every fit batch (``held``, else the
        loader's), or None; see ``frozen_prefix`` in the class docstring."""
        from harness.fastpaths import FrozenPrefix

        if not self.config.frozen_prefix or first_batch is None:
            return None
        probe = held[0] if held is not None else first_batch
        prefix = FrozenPrefix.find(self._loss, params, probe)
        if prefix is None:
            return None
        budget = memory_budget(self.device)
        for batch in held if held is not None else self._model_batches(loader):
            prefix.add_batch(params, batch)
            if prefix.bytes_per_batch() * n_examples / max(batch_length(probe), 1) > budget:
                return None
        return prefix

    def _block_size(self, params: dict[str, torch.Tensor], first_batch: Any) -> int:
        """The configured block size, or (``"auto"``) the one the memory allows for the
        first fit batch; under torch.distributed the smallest over ranks."""
        cfg = self.config
        if cfg.block_size != "auto":
            return min(cfg.block_size, cfg.arnoldi_dim)
        per_direction = 0
        if first_batch is not None:
            # each extra direction holds tangents of the forward's and the backward's intermediates
            per_direction = 3 * self._loss.saved_bytes(params, first_batch)
        size = automatic_block_size(per_direction, cfg.arnoldi_dim, cfg.embedding_dim, self.device)
        return int(distributed.gather_rows(np.array([size])).min())

    # ------------------------------------------------------------ transform
    @property
    def projection_(self) -> torch.Tensor:
        """M lambda^{-1/2}, (|theta|, D): embeddings are gradients times this matrix."""
        self._check_fitted()
        if self._projection is None:
            inv_sqrt = self.eigenvalues_.rsqrt().to(self.factors_.dtype).to(self.factors_.device)
            self._projection = self.factors_ * inv_sqrt
        return self._projection

    def gradients(self, loader: Iterable) -> Iterable[torch.Tensor]:
        """Yields (B, |theta|) per-example gradient blocks, one per batch (for inspection)."""
        check_loader_order(loader, "input")
        with eval_mode(self.model):
            params = {k: v.to(self.device) for k, v in self._loss.params().items()}
            if self.trunk is not None:
                loader = self._head_batches(loader)
            for i, batch in iterate_batches(loader, self.task, self._loss, self.device, validate=True, what="input"):
                grads = self._loss.per_example_grads(params, batch)
                check_finite(grads, f"the per-example gradients of batch {i}")
                yield grads

    def transform(self, loader: Iterable) -> np.ndarray:
        """Influence embeddings, (N, n_components_) float32, in loader order.

        Streams: only one batch of per-example gradients exists at a time. Under
        torch.distributed each rank embeds its shard and every rank receives all
        shards concatenated in rank order.
        """
        projection = self.projection_
        check_loader_order(loader, "transform")
        sharded = distributed.is_distributed()
        blocks = [torch.zeros(0, projection.shape[1])]
        total = len(loader) if hasattr(loader, "__len__") else None
        with eval_mode(self.model), full_precision():
            if self.trunk is not None:
                loader = self._head_batches(loader)
            params = {k: v.to(self.device) for k, v in self._loss.params().items()}
            batches = iterate_batches(
                loader, self.task, self._loss, self.device, validate=True, what="input", allow_empty=sharded
            )
            bar = tqdm(batches, total=total, desc="influence embeddings", disable=not self.progress, leave=False)
            for i, batch in bar:
                if i == 0:
                    self.projection_mode_ = self._choose_projection(batch)
                block = self._project_batch(params, batch, projection)
                check_finite(block, f"the influence embeddings of batch {i}")
                blocks.append(block.float().cpu())
        local = torch.cat(blocks).numpy()
        return distributed.gather_rows(local)

    def _head_batches(self, loader: Iterable) -> Iterator[Any]:
        """The loader's batches mapped through ``trunk`` (no gradients, trunk in eval mode)."""
        trunk_modules = [self.trunk] if isinstance(self.trunk, nn.Module) else []
        for raw in loader:
            batch = move_to(self.task.model_batch(raw), self.device)
            with torch.no_grad(), contextlib.ExitStack() as stack:
                for module in trunk_modules:
                    stack.enter_context(eval_mode(module))
                head_batch = self.trunk(batch)
            yield head_batch

    def fit_transform(self, loader: Iterable) -> np.ndarray:
        return self.fit(loader).transform(loader)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the fitted factors atomically (a crash leaves no half-written file)."""
        self._check_fitted()
        path = check_output_path(path, "factors file")
        state = {
            "format": FACTORS_FORMAT,
            "config": asdict(self.config),
            "layers": self.layers,
            "parameter_names": list(self.selection.names),
            "parameter_shapes": [list(s) for s in self.selection.shapes],
            "factors": self.factors_.cpu(),
            "eigenvalues": self.eigenvalues_,
            # Tensors, not numpy arrays: the file must load with weights_only=True (no pickle).
            "ritz_residuals": torch.as_tensor(np.asarray(self.ritz_residuals_)),
            "arnoldi_spectrum": torch.as_tensor(np.asarray(self.arnoldi_spectrum_)),
            "arnoldi_iterations": self.arnoldi_iterations_,
            "arnoldi_breakdown": self.arnoldi_breakdown_,
            "n_fit_examples": self.n_fit_examples_,
        }
        atomic_torch_save(state, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs: Any) -> "InfluenceEmbedder":
        """Rebuilds a fitted embedder for ``model`` from :meth:`save`'s file.

        ``kwargs`` (task, device, chunk_size, progress, ...) are passed to the constructor.
        The file is read with ``weights_only=True`` (nothing in it can run) and every field
        is checked; see the class docstring for what raises ``InputError``.
        """
        config_fields = [f.name for f in fields(FactorConfig)]
        clashing = sorted(set(kwargs) & {"layers", *config_fields})
        if clashing:
            raise InputError(f"{clashing} come from the factors file and cannot be passed to load")
        state = load_torch_file(path, "factors file")
        state = check_factors_state(state, str(path), FACTORS_FORMAT, config_fields)
        embedder = cls(model, layers=state["layers"], **state["config"], **kwargs)
        expected = list(zip(state["parameter_names"], state["parameter_shapes"]))
        actual = [(n, list(s)) for n, s in zip(embedder.selection.names, embedder.selection.shapes)]
        if expected != actual:
            raise InputError(
                f"the model's selected parameters do not match the saved factors: saved {expected[:3]}..., "
                f"model {actual[:3]}..."
            )
        dtype = next(iter(embedder._loss.params().values())).dtype
        embedder.factors_ = state["factors"].to(embedder.device, dtype)
        embedder.eigenvalues_ = state["eigenvalues"]
        embedder.ritz_residuals_ = state["ritz_residuals"]
        embedder.arnoldi_spectrum_ = state["arnoldi_spectrum"]
        embedder.arnoldi_iterations_ = state["arnoldi_iterations"]
        embedder.arnoldi_breakdown_ = state["arnoldi_breakdown"]
        embedder.n_fit_examples_ = state["n_fit_examples"]
        embedder._projection = None
        return embedder
