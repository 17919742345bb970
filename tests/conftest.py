"""Small real problems for the core tests: scikit-learn's digits (shipped with the package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: these checks run many tiny kernels, which extra threads only slow down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(n_components: int, n_classes: int, dtype: torch.dtype):
    x, y = load_digits(return_X_y=True)
    keep = y < n_classes
    x, y = x[keep], y[keep]
    x = PCA(n_components=n_components, random_state=0).fit_transform(x)
    x = (x - x.mean(0)) / x.std(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    n_train = int(0.7 * len(y))
    to = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    yt = torch.as_tensor(y, dtype=torch.long)
    return (to(x[:n_train]), yt[:n_train]), (to(x[n_train:]), yt[n_train:])


def train_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 200) -> nn.Module:
    """Full-batch L-BFGS to a tight optimum (so the Hessian is that of a minimum)."""
    torch.manual_seed(0)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


class Problem:
    def __init__(self, model, train, test):
        self.model, self.train, self.test = model, train, test

    def loader(self, split: str, batch_size: int = 256) -> DataLoader:
        x, y = getattr(self, split)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="session")
def logreg64() -> Problem:
    """Multinomial logistic regression on digits (12 PCA features, 10 classes), float64."""
    train, test = _digits(12, 10, torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(12, 10).double()
    train_lbfgs(model, *train, weight_decay=0.0)
    return Problem(model, train, test)


@pytest.fixture(scope="session")
def mlp64() -> Problem:
    """A small MLP (8 -> 6 -> 4 classes) on digits, float64."""
    train, test = _digits(8, 4, torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    train_lbfgs(model, *train, weight_decay=1e-3)
    return Problem(model, train, test)


@pytest.fixture(scope="session")
def mlp32() -> Problem:
    """The same MLP in float32 (the default dtype users run)."""
    train, test = _digits(8, 4, torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    train_lbfgs(model, *train, weight_decay=1e-3)
    return Problem(model, train, test)


def explicit_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Hessian of the mean (optionally per-example ``weights``-weighted) cross-entropy w.r.t. the named
    parameters, formed explicitly."""
    from torch.func import functional_call, hessian

    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}

    def flat_loss(vec):
        out, start = {}, 0
        for n in names:
            size = chosen[n].numel()
            out[n] = vec[start : start + size].view_as(chosen[n])
            start += size
        logits = functional_call(model, {**frozen, **out}, (x,))
        if weights is None:
            return nn.functional.cross_entropy(logits, y)
        return (weights * nn.functional.cross_entropy(logits, y, reduction="none")).mean()

    vec = torch.cat([chosen[n].reshape(-1) for n in names])
    return hessian(flat_loss)(vec)


def explicit_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-example gradients by a plain loop of autograd calls (the naive reference)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()
