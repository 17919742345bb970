"""The one training loop: its learning-rate schedules against hand-written torch loops, the
per-epoch callback, and its bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.errors import InputError
from harness.train import TrainConfig, train_model


@pytest.fixture
def digits() -> DataLoader:
    x, y = load_digits(return_X_y=True)
    examples = TensorDataset(torch.tensor(x[:256] / 16, dtype=torch.float32), torch.tensor(y[:256]))
    return DataLoader(examples, batch_size=64)


def small_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def hand_trained(model: nn.Module, loader: DataLoader, config: TrainConfig) -> nn.Module:
    """The reference: SGD with momentum 0.9, stepped by torch's OneCycleLR every batch or not at all."""
    torch.manual_seed(config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * len(loader)) \
        if config.schedule == "onecycle" else None
    model.train()
    for _ in range(config.epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return model.eval()


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_schedules_match_a_hand_written_torch_loop(digits, schedule):
    config = TrainConfig(epochs=3, lr=0.2, weight_decay=1e-4, optimizer="sgd", schedule=schedule)
    trained = train_model(small_net(), digits, config, progress=False)
    reference = hand_trained(small_net(), digits, config)
    for (name, ours), theirs in zip(trained.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_onecycle_differs_from_a_constant_rate(digits):
    weights = [train_model(small_net(), digits, TrainConfig(epochs=2, lr=0.2, optimizer="sgd", schedule=s),
                           progress=False)[0].weight for s in ("constant", "onecycle")]
    assert not torch.allclose(*weights)


def test_on_epoch_gets_the_model_in_eval_mode_and_the_mean_training_loss(digits):
    model = small_net()
    with torch.no_grad():  # lr = 0 keeps the weights, so the epoch's mean loss is the initial model's (BatchNorm
        # in train mode normalises by batch statistics either way)
        expected = torch.stack([nn.functional.cross_entropy(copy.deepcopy(model).train()(x), y)
                                for x, y in digits]).mean()
    calls, modes_in_training = [], []
    model.register_forward_hook(lambda module, args, output: modes_in_training.append(module.training))

    def on_epoch(epoch, seen, mean_loss):
        calls.append((epoch, seen.training, mean_loss))

    train_model(model, digits, TrainConfig(epochs=2, lr=0.0, optimizer="sgd"), progress=False, on_epoch=on_epoch)
    assert [(epoch, mode) for epoch, mode, _ in calls] == [(1, False), (2, False)]
    for _, _, mean_loss in calls:
        assert mean_loss == pytest.approx(expected.item(), rel=1e-5)
    assert all(modes_in_training) and len(modes_in_training) == 2 * len(digits)  # back in train mode after epoch 1
    assert not model.training


def test_bad_schedules_are_refused(digits):
    with pytest.raises(InputError, match="schedule must be"):
        train_model(small_net(), digits, TrainConfig(epochs=1, schedule="cosine"), progress=False)
    batches = (batch for batch in digits)  # no length: OneCycleLR cannot know its steps
    with pytest.raises(InputError, match="loader with a length"):
        train_model(small_net(), batches, TrainConfig(epochs=1, schedule="onecycle"), progress=False)
