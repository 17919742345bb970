"""Fast paths for InfluenceEmbedder, each exact (same factors and embeddings as the core
up to round-off) and each checked against the core in tests/test_fastpaths.py and
tests/test_block_krylov.py. The core picks the projection by itself (closed form,
forward mode or per-example gradients); what is here needs a different model or loader.

* :class:`LinearHeadEmbedder` / :class:`LinearHeadLoss`: theta = the last ``nn.Linear``
  under cross-entropy, from cached activations (:func:`capture_inputs`), in closed form.
  With the head's inputs ``a`` (B, H), softmax ``p`` (B, C) and one-hot targets ``y``:
  per-example gradient ``g_i = p_i - y_i`` gives dL_i/dW = g_i a_i^T and dL_i/db = g_i;
  HVP for V = (V_W, V_b): ``u_i = V_W a_i + V_b``, ``h_i = p_i * u_i - p_i (p_i . u_i)``,
  H V = (sum_i h_i a_i^T, sum_i h_i); embedding column k = g_i^T P_k a_i (+ g_i . P_k^b),
  without forming the (B, C*H) gradient block. No autograd graph at all.
* :class:`LinearLogitsHead`: the same closed-form projection for a last ``nn.Linear``
  inside a full model (its inputs captured by a forward hook); ``projection="auto"``
  uses it.
* :class:`FastInfluenceEmbedder`: any model. ``linearized_fit`` traces each fit batch's
  primal pass once (:class:`LinearizedHessianLoss`), so the P Arnoldi passes run only
  the tangent computation (blocks of them vmapped over the traced tangent map).
  :func:`forward_mode_embeddings` is the core's forward-mode projection as a function.
* :func:`tensor_batches` / :func:`fixed_batches`: in-memory batches sliced whole,
  instead of a DataLoader that collates example by example on every pass.

The frozen-trunk split (run the unselected layers once, differentiate a head module on
their outputs) composes with all of these; :func:`capture_inputs` caches the inputs of
any submodule.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, linearize, vmap
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset
from tqdm.auto import tqdm

from harness.batching import batch_length, eval_mode, first_examples, move_to
from harness.embed import InfluenceEmbedder
from harness.errors import InputError
from harness.hessian import FunctionalLoss, select_parameters
from harness.task import ClassificationTask, Task


def _plain_linear(module: Any) -> bool:
    """An nn.Linear whose forward is nn.Linear's: the closed forms assume output = x W^T + b,
    which a subclass's own forward (a scale, an activation) breaks without any error."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class LinearHeadLoss:
    """Closed-form drop-in for :class:`harness.hessian.FunctionalLoss` when the model is
    one ``nn.Linear`` applied to cached activations and the loss is cross-entropy.

    Same methods and flattening order (``weight`` row-major, then ``bias``) as the
    autograd path, so the Arnoldi code and the projection are shared unchanged.
    """

    def __init__(self, head: nn.Module, task: Task):
        if not _plain_linear(head):
            raise InputError("the linear-head fast path needs an nn.Linear model with nn.Linear's own forward; "
                             f"got {type(head).__name__}")
        if type(task) is not ClassificationTask:
            raise InputError(
                "the linear-head fast path computes cross-entropy in closed form and needs a "
                f"ClassificationTask with (activations, targets) batches; got {type(task).__name__}"
            )
        self.model, self.task = head, task
        self.selection = select_parameters(head, None)
        if set(self.selection.names) - {"weight", "bias"} or "weight" not in self.selection.names:
            raise InputError("the linear head's weight must be trainable (requires_grad=True)")
        self.has_bias = "bias" in self.selection.names
        self.frozen = {n: p.detach() for n, p in head.named_parameters() if n not in self.selection.names}

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.selection.names}

    def _call(self, params: dict[str, torch.Tensor]):
        weight = params["weight"]
        bias = params.get("bias", self.frozen.get("bias"))
        return lambda inputs: F.linear(inputs, weight, bias)

    def _softmax_and_residual(self, params: dict[str, torch.Tensor], batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        activations, targets = batch
        probs = torch.softmax(self._call(params)(activations), dim=-1)
        residual = probs.clone()
        residual[torch.arange(len(targets), device=residual.device), targets] -= 1
        return probs, residual

    def losses(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.task.loss(self._call(params), batch)

    def batch_loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.losses(params, batch).sum()

    def per_example_grads(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """(B, |theta|): rows vec(g_i a_i^T) followed by g_i (bias)."""
        activations = batch[0]
        _, residual = self._softmax_and_residual(params, batch)
        weight_grads = (residual.unsqueeze(2) * activations.unsqueeze(1)).flatten(1)
        return torch.cat([weight_grads, residual], dim=1) if self.has_bias else weight_grads

    def hvp(self, params: dict[str, torch.Tensor], batch: Any, vector: torch.Tensor) -> torch.Tensor:
        """(sum over the batch of per-example Hessians) @ vector, flattened."""
        activations = batch[0]
        tangent = self.selection.unflatten(vector)
        probs, _ = self._softmax_and_residual(params, batch)
        logit_tangent = activations @ tangent["weight"].T
        if self.has_bias:
            logit_tangent = logit_tangent + tangent["bias"]
        curvature = probs * logit_tangent - probs * (probs * logit_tangent).sum(dim=1, keepdim=True)
        parts = {"weight": curvature.T @ activations}
        if self.has_bias:
            parts["bias"] = curvature.sum(dim=0)
        return self.selection.flatten(parts)

    def hvp_block(self, params: dict[str, torch.Tensor], batch: Any, vectors: torch.Tensor) -> torch.Tensor:
        """(b, |theta|) block of HVPs in closed form, one batched product for the block."""
        activations = batch[0]
        tangent = self.selection.unflatten(vectors)
        probs, _ = self._softmax_and_residual(params, batch)
        logit_tangent = torch.einsum("bh,kch->kbc", activations, tangent["weight"])
        if self.has_bias:
            logit_tangent = logit_tangent + tangent["bias"][:, None, :]
        curvature = probs * logit_tangent - probs * (probs * logit_tangent).sum(dim=2, keepdim=True)
        parts = {"weight": torch.einsum("kbc,bh->kch", curvature, activations)}
        if self.has_bias:
            parts["bias"] = curvature.sum(dim=1)
        return self.selection.flatten(parts, batch_dims=1)

    # a linear model under cross-entropy: the Gauss-Newton matrix is the Hessian
    ggn_block = hvp_block

    def saved_bytes(self, params: dict[str, torch.Tensor], batch: Any) -> int:
        """Memory per extra direction of :meth:`hvp_block`: a few (B, C) tangents."""
        return 4 * batch[0].shape[0] * params["weight"].shape[0] * params["weight"].element_size()

    def project(self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor) -> torch.Tensor:
        """per_example_grads(batch) @ projection, without forming the (B, C*H) block."""
        _, residual = self._softmax_and_residual(params, batch)
        return closed_form_projection(batch[0], residual, projection, self.has_bias)


def closed_form_projection(
    activations: torch.Tensor, residual: torch.Tensor, projection: torch.Tensor, has_bias: bool
) -> torch.Tensor:
    """Per-example gradients of a linear layer under cross-entropy times ``projection``:
    column k is g_i^T P_k a_i (+ g_i . p_k with a bias), with g_i = softmax - one-hot."""
    n_classes, width = residual.shape[1], activations.shape[1]
    n_weight = n_classes * width
    weight_part = projection[:n_weight].T.reshape(-1, width)  # (D*C, H)
    projected = (activations @ weight_part.T).view(len(activations), -1, n_classes)  # (B, D, C)
    out = torch.einsum("bdc,bc->bd", projected, residual)
    if has_bias:
        out = out + residual @ projection[n_weight:]
    return out


class LinearLogitsHead:
    """theta = one ``nn.Linear`` of a full model whose output *is* the logits of a
    cross-entropy task (e.g. ``resnet.fc``): per-example gradients times a projection in
    closed form from the layer's inputs, captured by a forward hook in one no-grad
    forward. What InfluenceEmbedder's ``projection="auto"`` uses when it applies."""

    def __init__(self, model: nn.Module, module: nn.Linear, task: Task, has_bias: bool):
        self.model, self.module, self.task, self.has_bias = model, module, task, has_bias

    @classmethod
    def find(cls, model: nn.Module, task: Task, selection: Any, loss: Any, batch: Any) -> "LinearLogitsHead | None":
        """The head when theta is one such layer (checked on ``batch``), else None."""
        if type(task).loss is not Task.loss or not isinstance(getattr(loss, "_inner", loss), FunctionalLoss):
            return None  # the core's loss, or FastInfluenceEmbedder's LinearizedHessianLoss around it
        owners = {name.rpartition(".")[0] for name in selection.names}
        if len(owners) != 1:
            return None
        owner = owners.pop()
        module = dict(model.named_modules()).get(owner)
        prefix = f"{owner}." if owner else ""
        if not _plain_linear(module) or selection.names[0] != f"{prefix}weight":
            return None
        head = cls(model, module, task, has_bias=f"{prefix}bias" in selection.names)
        inputs, logits = head._capture(batch)
        if inputs is None or inputs.dim() != 2:
            return None
        # the logits must be the layer's x W^T + b as computed: not changed after the layer, nor by a
        # forward hook of it (a temperature); round-off up to 1e-5 of the largest logit is accepted
        with torch.no_grad():
            recomputed = F.linear(inputs, module.weight, module.bias)
        if recomputed.shape != logits.shape or not torch.allclose(
                recomputed, logits, rtol=1e-5, atol=1e-5 * float(logits.abs().max())):
            return None
        return head

    @torch.no_grad()
    def _capture(self, batch: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def keep(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            # a second call (weights reused) adds to the gradient a closed form of one call misses
            seen["input"] = None if "input" in seen else args[0]

        handle = self.module.register_forward_hook(keep)
        try:
            logits = self.task.logits(self.model, batch)
        finally:
            handle.remove()
        return seen.get("input"), logits

    def project(self, batch: Any, projection: torch.Tensor) -> torch.Tensor:
        inputs, logits = self._capture(batch)
        residual = torch.softmax(logits, dim=-1)
        residual[torch.arange(len(residual), device=residual.device), self.task.targets(batch)] -= 1
        return closed_form_projection(inputs.to(projection.dtype), residual.to(projection.dtype), projection, self.has_bias)


class LinearHeadEmbedder(InfluenceEmbedder):
    """:class:`harness.InfluenceEmbedder` for a last ``nn.Linear`` on cached activations.

    ``model`` is the head itself (e.g. ``resnet.fc``) and loaders yield
    ``(activations, targets)``, the activations being the head's inputs (see
    :func:`capture_inputs`). Fit and transform give the same factors and embeddings as
    the autograd path on the full model with ``layers=<head>``, with closed-form
    gradients and HVPs and no per-example gradient block in the transform.
    """

    def __init__(self, model: nn.Module, arnoldi_dim: int = 500, embedding_dim: int = 100, seed: int = 0, **kwargs: Any):
        if kwargs.get("layers") is not None:
            raise InputError("LinearHeadEmbedder differentiates the whole head; do not pass `layers`")
        kwargs.pop("layers", None)
        self._head_loss = LinearHeadLoss(model, kwargs.get("task") or ClassificationTask())
        super().__init__(model, None, arnoldi_dim, embedding_dim, seed, **kwargs)

    def _make_loss(self) -> LinearHeadLoss:
        return self._head_loss

    def _choose_projection(self, first_batch: Any) -> str:
        return "closed_form"

    def _project_batch(self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor) -> torch.Tensor:
        return self._loss.project(params, batch, projection)


class LinearizedHessianLoss:
    """:class:`harness.hessian.FunctionalLoss` whose HVPs reuse each batch's primal pass.

    FactorHessian applies the same Hessian (same parameters, same batches) P times. The
    forward-over-reverse HVP recomputes the primal forward and backward every time;
    ``torch.func.linearize`` traces them once per batch and keeps only the tangent
    computation, so later passes cost the tangent part alone. The trace costs a few
    HVPs per batch and keeps the batch's intermediates in memory, so it pays when P is
    large and the fit data is small enough to hold them (the usual InfEmbed setting).

    Batches are recognised by identity: the loader must yield the *same* tensors on
    every pass (:func:`fixed_batches`); a new tensor is traced anew.
    """

    def __init__(self, loss: FunctionalLoss):
        self._inner = loss
        self._traced: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def hvp(self, params: dict[str, torch.Tensor], batch: Any, vector: torch.Tensor) -> torch.Tensor:
        leaves = _tensor_leaves((params, batch))
        key = tuple(id(t) for t in leaves)
        if key not in self._traced:
            _, tangent_map = linearize(lambda p: grad(self._inner.batch_loss)(p, batch), params)
            self._traced[key] = (leaves, tangent_map)  # holding the leaves keeps their ids unique
        tangent_map = self._traced[key][1]
        return self._inner.selection.flatten(tangent_map(self._inner.selection.unflatten(vector)))

    def hvp_block(self, params: dict[str, torch.Tensor], batch: Any, vectors: torch.Tensor) -> torch.Tensor:
        """A block of HVPs: the traced tangent map vmapped over the block."""
        self.hvp(params, batch, vectors[0])  # traces the batch if it is new
        tangent_map = self._traced[tuple(id(t) for t in _tensor_leaves((params, batch)))][1]
        selection = self._inner.selection
        return selection.flatten(vmap(tangent_map)(selection.unflatten(vectors)), batch_dims=1)

    def clear(self) -> None:
        self._traced.clear()


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _tensor_leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for value in tree for leaf in _tensor_leaves(value)]
    return []


def forward_mode_embeddings(
    loss: FunctionalLoss, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """per-example gradients @ projection by forward mode (see
    :meth:`harness.hessian.FunctionalLoss.directional_derivatives`)."""
    return FunctionalLoss.directional_derivatives(loss, params, batch, projection, chunk_size)


class FastInfluenceEmbedder(InfluenceEmbedder):
    """:class:`harness.InfluenceEmbedder` with traced HVPs; same arguments, factors and
    embeddings (to round-off) as the core, which already picks the fastest projection.

    linearized_fit : bool
        FactorHessian with :class:`LinearizedHessianLoss`. Give ``fit`` a loader that
        yields the same tensors every pass (:func:`fixed_batches`); the traces are
        dropped after fit.
    """

    def __init__(self, *args: Any, linearized_fit: bool = True, **kwargs: Any):
        self.linearized_fit = bool(linearized_fit)
        super().__init__(*args, **kwargs)

    def _make_loss(self) -> Any:
        loss = super()._make_loss()
        return LinearizedHessianLoss(loss) if self.linearized_fit else loss

    def fit(self, loader: Iterable) -> "FastInfluenceEmbedder":
        try:
            return super().fit(loader)
        finally:
            if self.linearized_fit:
                self._loss.clear()


def fixed_batches(data: Dataset | tuple[torch.Tensor, ...], batch_size: int, device: str | torch.device = "cpu") -> list:
    """The batches of in-memory tensors, sliced once and kept: every pass over the list
    yields the same tensor objects (what :class:`LinearizedHessianLoss` needs)."""
    return [tuple(t.to(device) for t in batch) for batch in tensor_batches(data, batch_size)]


def tensor_batches(data: Dataset | tuple[torch.Tensor, ...], batch_size: int) -> DataLoader:
    """A DataLoader over in-memory tensors that slices whole batches at once.

    A plain ``DataLoader(TensorDataset(...))`` indexes and collates one example at a
    time, which costs more than a closed-form HVP on a batch of cached activations;
    every Arnoldi pass pays it again. Here each batch is one fancy-indexing call.
    """
    if not isinstance(data, Dataset):
        data = TensorDataset(*data)
    if not isinstance(data, TensorDataset):
        raise InputError(f"tensor_batches needs a TensorDataset or a tuple of tensors; got {type(data).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    sampler = BatchSampler(SequentialSampler(data), batch_size=batch_size, drop_last=False)
    return DataLoader(data, sampler=sampler, batch_size=None)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    module_name: str,
    loader: Iterable,
    task: Task | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``model`` once over ``loader`` (eval mode) and returns the inputs of the named
    submodule, (N, ...), and the targets, (N,), in loader order.

    These cached activations feed :class:`LinearHeadEmbedder`, so the model's trunk is
    evaluated once instead of once per Arnoldi pass.
    """
    task = task or ClassificationTask()
    modules = dict(model.named_modules())
    if module_name not in modules:
        raise InputError(f"unknown module {module_name!r}; the model has {list(modules)[:8]}...")
    captured: list[torch.Tensor] = []

    def keep_input(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().cpu())

    device = torch.device(device)
    targets = []
    handle = modules[module_name].register_forward_pre_hook(keep_input)
    try:
        with eval_mode(model):
            for batch in tqdm(loader, desc=f"caching inputs of {module_name}", disable=not progress, leave=False):
                batch = move_to(task.model_batch(batch), device)
                task.logits(model, batch)
                targets.append(task.targets(batch).cpu())
    finally:
        handle.remove()
    if not captured:
        raise InputError("empty loader: no activations captured")
    return torch.cat(captured), torch.cat(targets)


# ---------------------------------------------------------------- layer-wise projection
class LayerwiseProjection:
    """Per-example gradients times a projection from each selected layer's inputs and
    output gradients: one forward and one backward of the summed loss per batch, no
    (B, |theta|) gradient block and no per-example backward. What
    ``projection="auto"`` uses when every selected parameter belongs to one of these layers:

    * ``nn.Linear`` with inputs a_i (T, in) and output gradients b_i (T, out) (T positions:
      tokens, or 1): dL_i/dW = sum_t b_it a_it^T, so column d of the embedding is
      sum_t b_it^T V_d a_it (+ (sum_t b_it) . v_d for the bias), V_d the weight rows of
      projection column d. With T D <= 4 (T + D) the contraction runs as a_it -> a_it V_d^T
      (never a per-example weight gradient: T D products per weight); otherwise summing
      over positions first is cheaper (T + D products), which forms one layer's per-example
      weight gradients at a time. (Measured on W2's layer4, T = 4, D = 5: forming them
      there made the projection ~3x slower than forward mode.)
    * ``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1, zero padding): the same with a_i the
      unfolded input patches (positions = output pixels).
    * ``nn.LayerNorm`` and eval-mode BatchNorm: dL_i/dgamma = sum over positions of
      x_hat * b, dL_i/dbeta = sum of b, with x_hat the normalised input.

    Examples must not interact in the forward (eval mode: no batch statistics). Each
    layer's output is handed on as a copy, so in-place operations after it (ReLU(inplace),
    residual ``+=``) cannot change the tensor whose gradient is taken; an input changed in
    place later is detected and rejected. The first batch is checked: the per-example
    terms summed over the batch must give every selected parameter's batch gradient
    (autograd's, from the same backward) to a relative 1e-3, which fails when a selected
    parameter is also used outside its layer (tied weights), and its first example embedded
    alone must get the embedding it got in the batch to a relative 1e-3, which fails when
    examples interact after a selected layer (a batch mean in the forward: the summed
    gradient is then still right, each example's term is not). (The projected sums are no
    usable check in float32: on the bench's ResNet-18 layer4 + fc, autograd's batch
    gradient times the eigen-directions differs from them by ~0.3%; against float64
    embeddings the layer-wise ones are off by 3e-5 relative, forward mode's by 9e-7,
    per-example gradients' (vmap) by 1.6e-3.)
    """

    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    CHECK_RTOL = 1e-3  # float32 round-off of sums of B per-example terms, far below a missing term

    def __init__(self, loss: FunctionalLoss, layers: dict[str, tuple[nn.Module, dict[str, slice]]]):
        self.loss = loss
        self.layers = layers  # module name -> (module, {"weight"/"bias": rows of the projection})
        self.checked = False

    @classmethod
    def find(cls, model: nn.Module, selection: Any, loss: Any) -> "LayerwiseProjection | None":
        """The projection when every selected parameter is a weight or bias of a supported
        layer (checked structurally here, numerically on the first batch), else None."""
        if not isinstance(getattr(loss, "_inner", loss), FunctionalLoss):  # the core's loss, or it traced
            return None
        modules = dict(model.named_modules())
        layers: dict[str, tuple[nn.Module, dict[str, slice]]] = {}
        start = 0
        for name, shape in zip(selection.names, selection.shapes):
            size = int(torch.Size(shape).numel())
            owner, _, attr = name.rpartition(".")
            module = modules.get(owner)
            if not isinstance(module, cls.SUPPORTED) or attr not in ("weight", "bias") or not _supported(module):
                return None
            layers.setdefault(owner, (module, {}))[1][attr] = slice(start, start + size)
            start += size
        return cls(loss, layers)

    def project(self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor) -> torch.Tensor | None:
        """(B, D) embeddings of the batch; None when the first batch's check fails."""
        calls: list[tuple[str, torch.Tensor, int, torch.Tensor]] = []

        def record(name: str):
            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                calls.append((name, args[0], args[0]._version, output))
                return output.clone()  # later in-place ops change the copy, not `output`

            return hook

        handles = [module.register_forward_hook(record(name)) for name, (module, _) in self.layers.items()]
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        try:
            with torch.enable_grad():
                total = self.loss.losses(leaves, batch).sum()
        finally:
            for handle in handles:
                handle.remove()
        if not calls or any(inputs._version != version for _, inputs, version, _ in calls):
            return None
        check = not self.checked
        wanted = [output for *_, output in calls] + (list(leaves.values()) if check else [])
        grads = torch.autograd.grad(total, wanted, allow_unused=True)
        n = batch_length(batch)
        out = torch.zeros(n, projection.shape[1], dtype=projection.dtype, device=projection.device)
        summed = torch.zeros(projection.shape[0], dtype=projection.dtype, device=projection.device)
        for (name, inputs, _, output), output_grad in zip(calls, grads):
            if output_grad is None or inputs.shape[0] != n or output.shape[0] != n:
                return None
            module, rows = self.layers[name]
            terms = _layer_terms(module, inputs.detach(), output_grad, projection.dtype)
            out += _layer_projection(terms, rows, projection)
            if check:
                for attr, gradient in _layer_batch_gradient(terms, rows).items():
                    summed[rows[attr]] += gradient
        if check:
            # every selected parameter's batch gradient from the layer terms == autograd's (a use of the
            # parameter outside its layer, or examples that interact, leave an O(1) difference)
            batch_gradient = torch.cat([
                torch.zeros(stop - start) if g is None else g.reshape(-1).to(summed)
                for (_, start, stop), g in zip(self._spans(), grads[len(calls):])
            ])
            # relative to each parameter's gradient, plus a floor at the whole gradient's scale: some
            # gradients are zero in exact arithmetic (an attention key bias) and round-off in float32
            floor = 1e-2 * self.CHECK_RTOL * float(batch_gradient.norm())
            for _, start, stop in self._spans():
                difference = float((summed[start:stop] - batch_gradient[start:stop]).norm())
                if difference > self.CHECK_RTOL * float(batch_gradient[start:stop].norm()) + floor:
                    return None
            self.checked = True
            if n > 1 and not self._alone_as_in_batch(params, batch, projection, out):
                self.checked = False
                return None
        return out

    def _alone_as_in_batch(self, params: dict[str, torch.Tensor], batch: Any, projection: torch.Tensor,
                           embeddings: torch.Tensor) -> bool:
        """Whether the first example, embedded alone, gets the embedding it got in the batch.
        Examples that interact after a selected layer (a batch mean in the forward) pass the
        summed-gradient check but not this one: the per-example gradients the other
        projections compute are each example's loss on its own."""
        alone = self.project(params, first_examples(batch, 1), projection)[0]
        # relative to the example's embedding, plus a floor at the batch's scale for an example whose
        # embedding is (almost) zero
        floor = 1e-2 * self.CHECK_RTOL * float(embeddings.norm(dim=1).mean())
        return float((alone - embeddings[0]).norm()) <= self.CHECK_RTOL * float(embeddings[0].norm()) + floor

    def _spans(self) -> list[tuple[str, int, int]]:
        spans, start = [], 0
        for name, shape in zip(self.loss.selection.names, self.loss.selection.shapes):
            size = int(torch.Size(shape).numel())
            spans.append((name, start, start + size))
            start += size
        return spans


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    return True


def _layer_terms(module: nn.Module, inputs: torch.Tensor, output_grad: torch.Tensor, dtype: torch.dtype):
    """This call's per-example parameter gradients in factored form: ("outer", a (B, L, in),
    b (B, L, out)) with dL_i/dW = sum_l b_il a_il^T and dL_i/dbias = sum_l b_il (Linear,
    Conv), or ("direct", dL_i/dweight (B, ...), dL_i/dbias (B, ...)) (LayerNorm, BatchNorm)."""
    n = inputs.shape[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            raise InputError("layer-wise projection needs BatchNorm in eval mode")
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        normalised = (inputs - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        weight_grad = (normalised * output_grad).flatten(2).sum(2) if inputs.dim() > 2 else normalised * output_grad
        bias_grad = output_grad.flatten(2).sum(2) if inputs.dim() > 2 else output_grad
        return "direct", weight_grad.to(dtype), bias_grad.to(dtype)
    if isinstance(module, nn.LayerNorm):
        normalised = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
        dims = tuple(range(1, inputs.dim() - len(module.normalized_shape)))
        weight_grad = (normalised * output_grad).sum(dims) if dims else normalised * output_grad
        bias_grad = output_grad.sum(dims) if dims else output_grad
        return "direct", weight_grad.reshape(n, -1).to(dtype), bias_grad.reshape(n, -1).to(dtype)
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = module.kernel_size
        if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
            inputs, output_grad = inputs.unsqueeze(2), output_grad.unsqueeze(2)
            kernel, dilation = (1, kernel[0]), (1, module.dilation[0])
            padding, stride = (0, module.padding[0]), (1, module.stride[0])
        else:
            dilation, padding, stride = module.dilation, module.padding, module.stride
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, in, L)
        return "outer", patches.transpose(1, 2).to(dtype), output_grad.flatten(2).transpose(1, 2).to(dtype)
    # nn.Linear: positions are every dimension between the batch and the features
    return ("outer", inputs.reshape(n, -1, inputs.shape[-1]).to(dtype),
            output_grad.reshape(n, -1, output_grad.shape[-1]).to(dtype))


def _layer_projection(terms: tuple, rows: dict[str, slice], projection: torch.Tensor) -> torch.Tensor:
    """This call's per-example parameter gradients times their projection rows, (B, D)."""
    kind, first, second = terms
    n, width = first.shape[0], projection.shape[1]
    out = torch.zeros(n, width, dtype=projection.dtype, device=projection.device)
    if kind == "direct":
        if "weight" in rows:
            out += first @ projection[rows["weight"]]
        if "bias" in rows:
            out += second @ projection[rows["bias"]]
        return out
    activations, output_grad = first, second
    n_out, n_in = output_grad.shape[-1], activations.shape[-1]
    if "weight" in rows:
        weight_rows = projection[rows["weight"]].view(n_out, n_in, width)
        positions = activations.shape[1]
        if positions * width <= 4 * (positions + width):  # few positions: sum_l b_il^T (V_d a_il), no per-example gradient
            mapped = activations.reshape(n * positions, n_in) @ weight_rows.permute(1, 0, 2).reshape(n_in, n_out * width)
            out += torch.einsum("blod,blo->bd", mapped.view(n, positions, n_out, width), output_grad)
        else:  # per-example weight gradients of this layer, summed over positions first
            weight_grad = torch.bmm(output_grad.transpose(1, 2), activations)  # (B, out, in)
            out += weight_grad.reshape(n, -1) @ weight_rows.reshape(n_out * n_in, width)
    if "bias" in rows:
        out += output_grad.sum(1) @ projection[rows["bias"]]
    return out


def _layer_batch_gradient(terms: tuple, rows: dict[str, slice]) -> dict[str, torch.Tensor]:
    """This call's per-example parameter gradients summed over the batch, flattened."""
    kind, first, second = terms
    if kind == "direct":
        parts = {"weight": first.sum(0), "bias": second.sum(0)}
    else:
        parts = {"weight": torch.einsum("blo,bli->oi", second, first), "bias": second.sum((0, 1))}
    return {attr: parts[attr].reshape(-1) for attr in rows}


# ---------------------------------------------------------------- frozen prefix, run once
class FrozenPrefix:
    """The frozen modules a forward runs before it reaches any selected parameter, run
    once per fit batch instead of once per Arnoldi pass.

    Found on the first batch: the outermost modules that hold no selected parameter and
    whose whole call ends before the first call of a module that does (e.g. a ResNet's
    conv1 .. layer3 when theta = layer4 + fc; a BERT's embeddings and first encoder layers
    when theta is the last layer). While :meth:`replaying`, each such module returns the
    output it computed for the batch instead of running. Checked on the first batch, not
    assumed: a module is kept only when (1) it is called once per forward, (2) its output
    is unchanged when theta is perturbed (no hidden use of the selected parameters),
    (3) nothing later changes its output in place, and (4) the loss with replay equals the
    loss without it, bit for bit. Fit uses it when the outputs of all fit batches fit a
    quarter of the device's memory.
    """

    def __init__(self, loss: FunctionalLoss, names: list[str]):
        self.loss, self.names = loss, names
        modules = dict(loss.model.named_modules())
        self.modules = {name: modules[name] for name in names}
        self.outputs: list[dict[str, Any]] = []
        self.batches: list[Any] = []

    @classmethod
    def find(cls, loss: Any, params: dict[str, torch.Tensor], batch: Any) -> "FrozenPrefix | None":
        if type(loss) is not FunctionalLoss:
            return None
        model, selected = loss.model, set(loss.selection.names)
        holds = {name: any((f"{name}.{p}" if name else p) in selected for p, _ in m.named_parameters())
                 for name, m in model.named_modules()}
        owns = {name: any((f"{name}.{p}" if name else p) in selected for p, _ in m.named_parameters(recurse=False))
                for name, m in model.named_modules()}
        events: list[tuple[str, str]] = []
        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: events.append(("start", n))))
            handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: events.append(("end", n))))
        try:
            with torch.no_grad():
                loss.losses(params, batch)
        finally:
            for handle in handles:
                handle.remove()
        first_selected = next((i for i, (kind, n) in enumerate(events) if kind == "start" and owns[n]), None)
        if first_selected is None:
            return None
        calls = [n for kind, n in events if kind == "start"]
        # modules whose whole call ends before theta is first reached, outermost only, once per forward
        completed = [n for kind, n in events[:first_selected] if kind == "end" and n and not holds[n]]
        candidates = [c for c in completed if not any(c.startswith(f"{o}.") for o in completed)]
        candidates = [c for c in candidates if calls.count(c) == 1]
        if not candidates:
            return None
        prefix = cls(loss, candidates)
        return prefix if prefix._verify(params, batch) else None

    def _record(self, params: dict[str, torch.Tensor], batch: Any) -> tuple[dict[str, Any], dict[str, list[int]], torch.Tensor]:
        outputs: dict[str, Any] = {}
        handles = [
            m.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, (out, _versions(out))))
            for n, m in self.modules.items()
        ]
        try:
            with torch.no_grad():
                losses = self.loss.losses(params, batch)
        finally:
            for handle in handles:
                handle.remove()
        changed = {n for n, (out, versions) in outputs.items() if _versions(out) != versions}
        return {n: out for n, (out, _) in outputs.items()}, changed, losses

    def _verify(self, params: dict[str, torch.Tensor], batch: Any) -> bool:
        reference, changed, losses = self._record(params, batch)
        generator = torch.Generator().manual_seed(0)
        perturbed = {n: p + 0.1 * torch.randn(p.shape, generator=generator).to(p) * (p.abs().mean() + 1e-3)
                     for n, p in params.items()}
        moved, _, _ = self._record(perturbed, batch)
        keep = [n for n in self.names if n in reference and n not in changed and _equal(reference[n], moved.get(n))]
        if not keep:
            return False
        self.names, self.modules = keep, {n: self.modules[n] for n in keep}
        self.outputs = [self._outputs_of(params, batch)]
        with self.replaying(0):
            with torch.no_grad():
                replayed = self.loss.losses(params, batch)
        self.outputs = []
        return torch.equal(replayed, losses)

    def _outputs_of(self, params: dict[str, torch.Tensor], batch: Any) -> dict[str, Any]:
        outputs, changed, _ = self._record(params, batch)
        if changed & set(self.names):
            raise InputError("a frozen module's output was changed in place after the first fit batch")
        return {n: outputs[n] for n in self.names}

    def add_batch(self, params: dict[str, torch.Tensor], batch: Any) -> None:
        """Runs the prefix on one more fit batch and keeps its outputs (and the batch)."""
        self.outputs.append(self._outputs_of(params, batch))
        self.batches.append(batch)

    def bytes_per_batch(self) -> int:
        """Bytes held for the first batch: its prefix outputs and its inputs."""
        if not self.outputs:
            return 0
        return sum(tensor_bytes(out) for out in self.outputs[0].values()) + tensor_bytes(self.batches[0])

    @contextlib.contextmanager
    def replaying(self, index: int) -> Iterator[None]:
        """While active, the prefix modules return batch ``index``'s outputs."""
        saved = self.outputs[index]
        for name, module in self.modules.items():
            module.forward = lambda *_args, _out=saved[name], **_kwargs: _out
        try:
            yield
        finally:
            for module in self.modules.values():
                del module.forward


def _versions(output: Any) -> list[int]:
    return [t._version for t in _tensor_leaves(output)]


def tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensor_leaves(tree))


def same_layout(a: Any, b: Any) -> bool:
    """Whether two batches hold tensors that agree in everything but dimension 0 (so
    they can be concatenated), in the same tuple/list/dict structure."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dim() > 0 and b.dim() == a.dim()
                and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_layout(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(same_layout(x, y) for x, y in zip(a, b))
    return False


def concatenate_batches(batches: list[Any]) -> Any:
    """Batches of the same layout (:func:`same_layout`) joined along dimension 0."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if torch.is_tensor(first):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: concatenate_batches([b[k] for b in batches]) for k in first}
    parts = [concatenate_batches(list(column)) for column in zip(*batches)]
    return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)


def _equal(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = _tensor_leaves(a), _tensor_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))
