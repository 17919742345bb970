"""The closed-form linear-head fast path against the autograd path of the core."""

from __future__ import annotations

import copy
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from harness import InfluenceEmbedder, InputError
from harness.fastpaths import (
    FastInfluenceEmbedder,
    LinearHeadEmbedder,
    LinearHeadLoss,
    LinearizedHessianLoss,
    LinearLogitsHead,
    capture_inputs,
    concatenate_batches,
    forward_mode_embeddings,
    fixed_batches,
    same_layout,
    tensor_batches,
)
from harness.hessian import FunctionalLoss, select_parameters
from harness.task import ClassificationTask, HuggingFaceClassificationTask


pytestmark = pytest.mark.usefixtures("one_thread")


def _autograd_loss(head: nn.Module) -> FunctionalLoss:
    return FunctionalLoss(head, ClassificationTask(), select_parameters(head, None))


def _head_with_bias(logreg64, bias: str) -> nn.Module:
    if bias == "trainable":
        return logreg64.model
    if bias == "absent":
        return nn.Linear(12, 10, bias=False).double()
    head = copy.deepcopy(logreg64.model)
    with torch.no_grad():
        head.bias.copy_(torch.linspace(-2, 2, 10, dtype=torch.float64))  # far from zero: leaving it out shows
    head.bias.requires_grad_(False)
    return head


@pytest.mark.parametrize("bias", ["trainable", "absent", "frozen"])
def test_closed_form_gradients_hvp_and_projection_match_autograd(logreg64, bias):
    """A frozen bias is not part of theta but still shifts the logits every closed form uses."""
    head = _head_with_bias(logreg64, bias)
    x, y = logreg64.test
    batch = (x, y)
    fast, slow = LinearHeadLoss(head, ClassificationTask()), _autograd_loss(head)
    params = slow.params()
    assert list(params) == (["weight"] if bias != "trainable" else ["weight", "bias"])
    torch.testing.assert_close(fast.losses(params, batch), slow.losses(params, batch), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast.batch_loss(params, batch), slow.batch_loss(params, batch), rtol=1e-12, atol=1e-14)

    grads = fast.per_example_grads(params, batch)
    torch.testing.assert_close(grads, slow.per_example_grads(params, batch), rtol=1e-10, atol=1e-12)

    vector = torch.randn(slow.selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast.hvp(params, batch, vector), slow.hvp(params, batch, vector), rtol=1e-10, atol=1e-12)

    projection = torch.randn(slow.selection.numel, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast.project(params, batch, projection), grads @ projection, rtol=1e-10, atol=1e-12)

    vectors = torch.randn(3, slow.selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fast.hvp_block(params, batch, vectors), slow.hvp_block(params, batch, vectors),
                               rtol=1e-10, atol=1e-12)


def test_linear_head_embedder_reproduces_the_core_on_the_full_model(mlp64):
    """Cached activations of the last layer + closed form == the core with layers='2'."""
    model = mlp64.model
    core = InfluenceEmbedder(model, layers="2", arnoldi_dim=20, embedding_dim=8, seed=5, progress=False)
    core.fit(mlp64.loader("train"))

    train_acts, train_y = capture_inputs(model, "2", mlp64.loader("train"), progress=False)
    test_acts, test_y = capture_inputs(model, "2", mlp64.loader("test"), progress=False)
    torch.testing.assert_close(train_acts, model[:2](mlp64.train[0]).detach())
    torch.testing.assert_close(train_y, mlp64.train[1])

    def loader(acts, y):
        return DataLoader(TensorDataset(acts, y), batch_size=50)

    fast = LinearHeadEmbedder(model[2], arnoldi_dim=20, embedding_dim=8, seed=5, progress=False)
    fast.fit(loader(train_acts, train_y))
    np.testing.assert_allclose(fast.eigenvalues_.numpy(), core.eigenvalues_.numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        fast.transform(loader(test_acts, test_y)), core.transform(mlp64.loader("test")), rtol=1e-5, atol=1e-6
    )


def test_linear_head_embedder_survives_refit_and_save_load(logreg64, tmp_path):
    loader = logreg64.loader("train")
    fast = LinearHeadEmbedder(logreg64.model, arnoldi_dim=15, embedding_dim=5, progress=False)
    first = fast.fit(loader).transform(logreg64.loader("test"))
    second = fast.fit(loader).transform(logreg64.loader("test"))
    np.testing.assert_array_equal(first, second)
    assert isinstance(fast._loss, LinearHeadLoss)
    loaded = LinearHeadEmbedder.load(fast.save(tmp_path / "head.pt"), logreg64.model, progress=False)
    np.testing.assert_array_equal(loaded.transform(logreg64.loader("test")), first)


def test_bad_inputs_raise_input_error(mlp64):
    with pytest.raises(InputError, match="nn.Linear"):
        LinearHeadEmbedder(mlp64.model)
    with pytest.raises(InputError, match="ClassificationTask"):
        LinearHeadEmbedder(mlp64.model[2], task=HuggingFaceClassificationTask())
    with pytest.raises(InputError, match="layers"):
        LinearHeadEmbedder(mlp64.model[2], layers="weight")
    with pytest.raises(InputError, match="unknown module"):
        capture_inputs(mlp64.model, "head", mlp64.loader("test"), progress=False)
    frozen = nn.Linear(8, 4).double().requires_grad_(False)
    with pytest.raises(InputError, match="trainable"):
        LinearHeadLoss(frozen, ClassificationTask())
    with pytest.raises(InputError, match=r"^the linear-head fast path needs an nn\.Linear model with nn\.Linear's own "
                                         r"forward; got _DoubledLinear$"):
        LinearHeadLoss(_DoubledLinear(8, 4).double(), ClassificationTask())


class _DoubledLinear(nn.Linear):
    """An nn.Linear whose own forward doubles the output: x W^T + b no longer gives the logits."""

    def forward(self, x):
        return 2 * super().forward(x)


def _exact_without_the_closed_form(model, n_features, n_classes, layers=None):
    """Fit and transform under projection="auto": embeddings equal explicit per-example gradients
    times the projection, by a path other than the closed form. The loader, for further checks."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, n_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (30,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    embedder = InfluenceEmbedder(model, layers=layers, arnoldi_dim=12, embedding_dim=4, progress=False).fit(loader)
    got = embedder.transform(loader)
    loss = FunctionalLoss(model, ClassificationTask(), embedder.selection)
    np.testing.assert_allclose(got, (loss.per_example_grads(loss.params(), (x, y)) @ embedder.projection_).numpy(),
                               rtol=1e-6, atol=1e-9)
    assert embedder.projection_mode_ != "closed_form"
    return loader


def test_auto_projection_of_a_linear_whose_forward_hook_scales_its_output_is_exact():
    """A forward hook (a temperature of 2) keeps nn.Linear's forward but not x W^T + b as the
    logits: the closed form would miss the factor; the path taken is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[2].register_forward_hook(lambda _module, _args, output: 2 * output)
    _exact_without_the_closed_form(model, 5, 3, layers="2")


def test_fast_embedder_takes_the_closed_form_for_a_last_linear(mlp64):
    """FastInfluenceEmbedder's loss wraps the core's (LinearizedHessianLoss): the closed form
    still applies to theta = the last nn.Linear, as in the core, with the same embeddings."""
    options = dict(layers="2", arnoldi_dim=12, embedding_dim=4, seed=2, progress=False)
    batches = fixed_batches(mlp64.train, 50)
    fast = FastInfluenceEmbedder(mlp64.model, **options).fit(batches)
    core = InfluenceEmbedder(mlp64.model, projection="gradients", **options).fit(batches)
    np.testing.assert_allclose(fast.transform(batches), core.transform(batches), rtol=1e-6, atol=1e-9)
    assert fast.projection_mode_ == "closed_form"
    FastInfluenceEmbedder(mlp64.model, projection="closed_form", **options).fit(batches).transform(batches)


def test_auto_projection_of_a_linear_subclass_with_its_own_forward_is_exact():
    """The closed form assumes nn.Linear's forward; a subclass changing it gets another path
    whose embeddings equal explicit per-example gradients times the projection."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _DoubledLinear(6, 3)).double()
    loader = _exact_without_the_closed_form(model, 5, 3, layers="2")
    with pytest.raises(InputError, match="closed_form"):
        InfluenceEmbedder(model, layers="2", arnoldi_dim=12, embedding_dim=4, projection="closed_form",
                          progress=False).fit(loader).transform(loader)


def test_linearized_hvp_matches_forward_over_reverse(mlp64):
    selection = select_parameters(mlp64.model, None)
    plain = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    traced = LinearizedHessianLoss(FunctionalLoss(mlp64.model, ClassificationTask(), selection))
    params = plain.params()
    batch = tuple(mlp64.train)
    for seed in (1, 2):  # the second call reuses the trace
        vector = torch.randn(selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(traced.hvp(params, batch, vector), plain.hvp(params, batch, vector), rtol=1e-10, atol=1e-12)
    assert len(traced._traced) == 1


@pytest.mark.parametrize("projection", ["gradients", "forward"])
def test_fast_embedder_reproduces_the_core(mlp64, projection):
    batches = fixed_batches(mlp64.train, 256)
    core = InfluenceEmbedder(mlp64.model, arnoldi_dim=30, embedding_dim=10, seed=2, progress=False).fit(batches)
    fast = FastInfluenceEmbedder(
        mlp64.model, arnoldi_dim=30, embedding_dim=10, seed=2, progress=False, projection=projection
    )
    fast.fit(batches)
    assert len(fast._loss._traced) == 0, "traces must be released after fit"
    np.testing.assert_allclose(fast.eigenvalues_.numpy(), core.eigenvalues_.numpy(), rtol=1e-9)
    test = mlp64.loader("test")
    np.testing.assert_allclose(fast.transform(test), core.transform(test), rtol=1e-5, atol=1e-7)


def test_forward_mode_embeddings_equal_gradients_times_projection(mlp64):
    selection = select_parameters(mlp64.model, None)
    loss = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    params, batch = loss.params(), tuple(mlp64.test)
    projection = torch.randn(selection.numel, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = loss.per_example_grads(params, batch) @ projection
    torch.testing.assert_close(forward_mode_embeddings(loss, params, batch, projection), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="projection"):
        FastInfluenceEmbedder(mlp64.model, projection="jvp")


def test_tensor_batches_slice_whole_batches_in_order(logreg64):
    x, y = logreg64.test
    batches = list(tensor_batches((x, y), 50))
    assert [len(b[1]) for b in batches] == [50] * (len(y) // 50) + ([len(y) % 50] if len(y) % 50 else [])
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), x)
    fixed = fixed_batches((x, y), 50)
    assert all(a[0] is b[0] for a, b in zip(fixed, fixed))
    with pytest.raises(InputError, match="batch_size"):
        tensor_batches((x, y), 0)


def test_linear_head_saved_bytes_are_four_logit_tangents_per_example(logreg64):
    """The block size is sized from this estimate: 4 (B, C) tangents in the weight's dtype."""
    fast = LinearHeadLoss(logreg64.model, ClassificationTask())
    x, y = logreg64.test
    # B = 7, C = 10, H = 12 all differ, so a swapped dimension shows
    saved = fast.saved_bytes(fast.params(), (x[:7], y[:7]))
    assert type(saved) is int and saved == 4 * 7 * 10 * 8


def test_linear_head_input_errors_give_the_exact_reason(logreg64):
    """Each rejection names what is wrong; a weight-only freeze is caught here, not by select_parameters."""
    with pytest.raises(InputError, match=r"^the linear-head fast path computes cross-entropy in closed form and needs a "
                                         r"ClassificationTask with \(activations, targets\) batches; "
                                         r"got HuggingFaceClassificationTask$"):
        LinearHeadLoss(logreg64.model, HuggingFaceClassificationTask())
    frozen_weight = nn.Linear(8, 4).double()
    frozen_weight.weight.requires_grad_(False)
    with pytest.raises(InputError, match=r"^the linear head's weight must be trainable \(requires_grad=True\)$"):
        LinearHeadLoss(frozen_weight, ClassificationTask())
    with pytest.raises(InputError, match=r"^LinearHeadEmbedder differentiates the whole head; do not pass `layers`$"):
        LinearHeadEmbedder(logreg64.model, layers="weight")


def test_linear_head_embedder_defaults_keyword_arguments_and_projection_mode(logreg64):
    """Defaults read off a constructed embedder (the body passes them on), keyword arguments reach the
    core, and the transform reports the closed form it used."""
    default = LinearHeadEmbedder(logreg64.model)
    assert (default.config.arnoldi_dim, default.config.embedding_dim, default.config.seed) == (500, 100, 0)
    assert default.progress is True
    fast = LinearHeadEmbedder(logreg64.model, arnoldi_dim=15, embedding_dim=5, progress=False, damping=0.25,
                              hessian_reduction="sum")
    assert fast.progress is False
    assert (fast.config.damping, fast.config.hessian_reduction) == (0.25, "sum")
    fast.fit(logreg64.loader("train")).transform(logreg64.loader("test"))
    assert fast.projection_mode_ == "closed_form"


class _SmoothedTask(ClassificationTask):
    """Label-smoothed cross-entropy: softmax - one-hot is not its per-example gradient."""

    def loss(self, model, batch):
        return F.cross_entropy(self.logits(model, batch), self.targets(batch), reduction="none", label_smoothing=0.1)


def _head_found(model, layers, task, batch):
    selection = select_parameters(model, layers)
    return LinearLogitsHead.find(model, task, selection, FunctionalLoss(model, task, selection), batch), selection


def test_linear_logits_head_found_for_a_bare_or_nested_last_linear_and_exact(logreg64):
    """The model itself being the layer (owner "") and a layer two modules deep (owner "2.0") both get
    the closed form, equal to explicit per-example gradients times the projection."""
    x, y = logreg64.test
    torch.manual_seed(0)
    nested = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Sequential(nn.Linear(6, 10))).double()
    for model, layers, module in [(logreg64.model, None, logreg64.model), (nested, "2.0", nested[2][0])]:
        head, selection = _head_found(model, layers, ClassificationTask(), (x, y))
        assert head is not None and head.module is module and head.has_bias
        projection = torch.randn(selection.numel, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        loss = FunctionalLoss(model, ClassificationTask(), selection)
        expected = loss.per_example_grads(loss.params(), (x, y)) @ projection
        torch.testing.assert_close(head.project((x, y), projection), expected, rtol=1e-10, atol=1e-12)


def test_linear_logits_head_not_found_for_another_loss_or_pooled_token_inputs(logreg64):
    """The closed form is cross-entropy's gradient for one (B, H) input row per example: a task with its
    own loss, or a layer on (B, T, H) tokens whose logits a hook pools to (B, C), get none."""
    x, y = logreg64.test
    assert _head_found(logreg64.model, None, _SmoothedTask(), (x, y))[0] is None
    pooled = nn.Linear(12, 10).double()
    pooled.register_forward_hook(lambda _module, _args, output: output.mean(1))
    tokens = x[:, None, :].expand(-1, 3, -1) + torch.arange(3, dtype=torch.float64)[None, :, None]
    assert _head_found(pooled, None, ClassificationTask(), (tokens, y))[0] is None


def test_linear_logits_head_needs_the_layers_output_as_the_logits_up_to_round_off(logreg64):
    """The closed form differentiates x W^T + b: logits changed by a forward hook of the layer (a
    temperature, a shift, a slice) get none; a change within 1e-5 of the largest logit (the round-off
    of another kernel) is accepted."""
    x, y = logreg64.test
    scale = float(logreg64.model(x).abs().max())
    assert scale > 5  # so that 1e-5 x the largest logit differs from 1e-5 / it and from an absolute 1e-8

    def found(change):
        model = copy.deepcopy(logreg64.model)
        model.register_forward_hook(lambda _module, _args, output: change(output))
        return _head_found(model, None, ClassificationTask(), (x, y))[0] is not None

    assert found(lambda output: output)
    assert found(lambda output: output + 0.5e-5 * scale)
    assert not found(lambda output: output + 2e-5 * scale)
    assert not found(lambda output: 2 * output)
    assert not found(lambda output: output[:, :5])


def test_linear_logits_head_not_found_for_a_layer_the_forward_never_calls(logreg64):
    """A selected nn.Linear that the forward does not call has no captured inputs: no closed form."""
    x, y = logreg64.test
    model = nn.ModuleDict({"fc": copy.deepcopy(logreg64.model), "spare": nn.Linear(12, 10).double()})
    task = ClassificationTask()
    task.logits = lambda module, batch: module["fc"](batch[0])
    assert _head_found(model, "spare", task, (x, y))[0] is None


def test_a_last_linear_called_twice_takes_an_exact_path():
    """Weights reused (logits = fc(tanh(fc(x)))): the last call's output is the logits, but the
    gradient has a term from the first call too; the path taken is exact."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 4).double()
    model = nn.Sequential(fc, nn.Tanh(), fc)
    _exact_without_the_closed_form(model, 4, 4)


def test_a_last_linear_with_only_its_bias_selected_takes_an_exact_path(mlp64):
    """theta = the bias alone (all else frozen): the closed form covers weight (+ bias) only, so
    another path is taken, equal to explicit per-example gradients times the projection."""
    model = copy.deepcopy(mlp64.model).requires_grad_(False)
    model[2].bias.requires_grad_(True)
    loader = DataLoader(TensorDataset(*mlp64.train), batch_size=100)
    embedder = InfluenceEmbedder(model, arnoldi_dim=4, embedding_dim=2, progress=False).fit(loader)
    got = embedder.transform(loader)
    assert embedder.selection.names == ("2.bias",) and embedder.projection_mode_ != "closed_form"
    loss = FunctionalLoss(model, ClassificationTask(), embedder.selection)
    expected = loss.per_example_grads(loss.params(), mlp64.train) @ embedder.projection_
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-9)


def test_linear_logits_head_projects_float32_activations_with_a_float64_projection(mlp32):
    """A float64 projection (float64_basis) of a float32 model: inputs and residual are cast to it."""
    x, y = mlp32.test
    head, selection = _head_found(mlp32.model, "2", ClassificationTask(), (x, y))
    projection = torch.randn(selection.numel, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = head.project((x, y), projection)
    model64 = copy.deepcopy(mlp32.model).double()
    loss64 = FunctionalLoss(model64, ClassificationTask(), select_parameters(model64, "2"))
    expected = loss64.per_example_grads(loss64.params(), (x.double(), y)) @ projection
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_linearized_hvps_trace_each_batch_and_hvp_block_matches_single_hvps(mlp64):
    """Two batches of the same layout get two traces (the second must not reuse the first's); a block,
    also of one vector and also on a batch not yet traced, equals the stacked forward-over-reverse HVPs."""
    selection = select_parameters(mlp64.model, None)
    plain = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    traced = LinearizedHessianLoss(FunctionalLoss(mlp64.model, ClassificationTask(), selection))
    params = plain.params()
    x, y = mlp64.train
    first, second = (x[:100], y[:100]), (x[100:200], y[100:200])
    vectors = torch.randn(3, selection.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def stacked(batch, block):
        return torch.stack([plain.hvp(params, batch, v) for v in block])

    block = traced.hvp_block(params, first, vectors)
    torch.testing.assert_close(block, stacked(first, vectors), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(traced.hvp(params, second, vectors[0]), plain.hvp(params, second, vectors[0]),
                               rtol=1e-10, atol=1e-12)
    one = traced.hvp_block(params, second, vectors[1:2])
    assert one.shape == (1, selection.numel)
    torch.testing.assert_close(one, stacked(second, vectors[1:2]), rtol=1e-10, atol=1e-12)
    assert len(traced._traced) == 2


class _CountingLoss(FunctionalLoss):
    """Counts the (vmapped) forwards: one per chunk of projection columns."""

    calls = 0

    def losses(self, params, batch):
        self.calls += 1
        return super().losses(params, batch)


def test_forward_mode_embeddings_run_chunk_size_columns_at_a_time(mlp64):
    """chunk_size bounds the tangents held at once: 5 columns in chunks of 2 are 3 forwards, same result."""
    selection = select_parameters(mlp64.model, None)
    loss = _CountingLoss(mlp64.model, ClassificationTask(), selection)
    params, batch = loss.params(), tuple(mlp64.test)
    projection = torch.randn(selection.numel, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    plain = FunctionalLoss(mlp64.model, ClassificationTask(), selection)
    expected = plain.per_example_grads(params, batch) @ projection
    got = forward_mode_embeddings(loss, params, batch, projection, chunk_size=2)
    assert loss.calls == 3
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fast_embedder_without_linearized_fit_uses_the_core_loss(mlp64):
    """linearized_fit=False is the opt-out for loaders that yield new tensors every pass."""
    assert type(FastInfluenceEmbedder(mlp64.model, progress=False, linearized_fit=False)._loss) is FunctionalLoss
    assert type(FastInfluenceEmbedder(mlp64.model, progress=False)._loss) is LinearizedHessianLoss


class _Squares(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(float(i * i))


def test_tensor_batches_accept_batch_size_one_and_reject_other_datasets(logreg64):
    """Batches of one are valid; a Dataset that is not a TensorDataset is named in the error."""
    x, y = logreg64.test
    ones = list(tensor_batches((x[:3], y[:3]), 1))
    assert [len(b[1]) for b in ones] == [1, 1, 1]
    torch.testing.assert_close(torch.cat([b[0] for b in ones]), x[:3])
    with pytest.raises(InputError, match=r"^tensor_batches needs a TensorDataset or a tuple of tensors; got _Squares$"):
        tensor_batches(_Squares(), 2)


def test_fixed_batches_are_moved_to_the_device():
    """The meta device (available without an accelerator) shows the tensors are moved."""
    fixed = fixed_batches((torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)), 2, device="meta")
    assert [t.device.type for batch in fixed for t in batch] == ["meta"] * 6


def test_same_layout_compares_structure_and_all_but_dimension_0():
    """Merging fit batches relies on it: nested containers of tensors that differ only in length agree;
    scalars (nothing to join along), leaves that are no tensors, and mismatched containers do not."""
    t = torch.zeros(3, 2)
    longer = (torch.ones(5, 2), {"mask": torch.ones(1, 2), "ids": t[:1].long()})
    assert same_layout((t, {"mask": t, "ids": t.long()}), longer)
    assert not same_layout({"mask": t}, {"mask": t.double()})
    assert not same_layout({"mask": t}, {"mask": torch.zeros(3, 4)})
    assert not same_layout(torch.tensor(1.0), torch.tensor(2.0))
    assert not same_layout({"mask": t}, (t,))
    assert not same_layout((t,), {"mask": t})
    assert not same_layout((t,), [t])
    assert not same_layout(3, 3)
    assert not same_layout(t, (t,))


_Pair = namedtuple("_Pair", "inputs targets")


def test_concatenate_batches_joins_tensors_dicts_lists_and_namedtuples():
    """The joined batch keeps the first batch's container type, field and key order."""
    a = torch.arange(4.0).view(2, 2)
    b = torch.arange(4.0, 6.0).view(1, 2)
    ab = torch.arange(6.0).view(3, 2)
    pair = concatenate_batches([_Pair(a, torch.tensor([0, 1])), _Pair(b, torch.tensor([1]))])
    assert type(pair) is _Pair
    torch.testing.assert_close(pair.inputs, ab)
    torch.testing.assert_close(pair.targets, torch.tensor([0, 1, 1]))
    joined = concatenate_batches([{"x": a, "y": a[:, 0]}, {"y": b[:, 0], "x": b}])
    assert list(joined) == ["x", "y"]
    torch.testing.assert_close(joined["x"], ab)
    torch.testing.assert_close(joined["y"], ab[:, 0])
    listed = concatenate_batches([[a], [b]])
    assert type(listed) is list
    torch.testing.assert_close(listed[0], ab)
    single = (a,)
    assert concatenate_batches([single]) is single
