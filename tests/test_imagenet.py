"""Tiny-ImageNet loader, the ResNet trunk/head split, and the ImageNet experiment end to end
on a tiny subset of the shared Tiny-ImageNet data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from harness import InfluenceEmbedder
from harness.errors import InputError
from harness.models.vision import imagenet_resnet, resnet, split_resnet
from harness.paths import has_dataset

needs_tiny = pytest.mark.skipif(not has_dataset("tiny-imagenet-subset"),
                                reason="shared Tiny-ImageNet subset absent (set INFEMBED_DATA)")


@pytest.fixture
def small_resnet():
    torch.manual_seed(0)
    return resnet("resnet18", 5).eval()


def test_split_resnet_reproduces_the_model(small_resnet):
    images = torch.randn(3, 3, 64, 64)
    for head_layers in (("layer4", "fc"), ("fc",), ("layer3", "layer4", "fc")):
        split = split_resnet(small_resnet, head_layers)
        with torch.no_grad():
            torch.testing.assert_close(split.head(split.trunk(images)), small_resnet(images))
    names = [n for n, _ in split_resnet(small_resnet).head.named_parameters()]
    assert names == [n for n, _ in small_resnet.named_parameters() if n.startswith(("layer4.", "fc."))]


def test_head_gradients_equal_whole_model_gradients(small_resnet):
    images, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    split = split_resnet(small_resnet)
    with torch.no_grad():
        features = split.trunk(images)
    layers = ["layer4", "fc"]
    whole = InfluenceEmbedder(small_resnet, layers=layers, arnoldi_dim=2, embedding_dim=1, progress=False)
    head = InfluenceEmbedder(split.head, layers=layers, arnoldi_dim=2, embedding_dim=1, progress=False)
    (g_whole,) = list(whole.gradients([(images, targets)]))
    (g_head,) = list(head.gradients([(features, targets)]))
    torch.testing.assert_close(g_head, g_whole, rtol=1e-4, atol=1e-6)


def test_split_resnet_rejects_bad_input(small_resnet):
    with pytest.raises(InputError, match="tail"):
        split_resnet(small_resnet, ("layer3", "fc"))
    with pytest.raises(InputError, match="ResNet"):
        split_resnet(torch.nn.Linear(2, 2))


def test_missing_imagenet_weights_say_what_to_do(tmp_path):
    with pytest.raises(InputError, match="no ImageNet weights"):
        imagenet_resnet("resnet18", tmp_path / "absent.pth")


def test_missing_data_gives_a_clear_error(tmp_path, monkeypatch):
    from harness.data.tiny_imagenet import tiny_imagenet

    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    with pytest.raises(InputError, match="tiny-imagenet-subset.*not found"):
        tiny_imagenet("val")


@needs_tiny
def test_tiny_imagenet_loader():
    from harness.data.tiny_imagenet import tiny_imagenet

    val = tiny_imagenet("val", per_class=2, seed=1)
    assert len(val) == 60 and len(val.class_names) == 30
    assert np.bincount(val.labels).tolist() == [2] * 30
    image, label = val[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 0
    assert val.thumbnail(0).shape == (64, 64, 3)
    assert tiny_imagenet("val", per_class=2, seed=1).samples == val.samples
    assert len(tiny_imagenet("val")) == 1500
    with pytest.raises(InputError, match="split"):
        tiny_imagenet("test")


@needs_tiny
def test_imagenet_experiment_end_to_end(tmp_path, monkeypatch):
    from experiments.imagenet_resnet18 import ImageNetConfig, run

    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    config = ImageNetConfig(train_per_class=2, val_per_class=1, epochs=1, batch_size=32, fit_per_class=1,
                            opponent_pool_per_class=1, arnoldi_dim=4, embedding_dim=3, chunk_size=8,
                            max_accuracy=0.0, min_size=2)
    out = tmp_path / "results"
    summary = run(config, out=str(out), progress=False)

    frame = pd.read_csv(out / "slices.csv")
    stored = json.loads((out / "summary.json").read_text())
    assert stored["metrics"] == summary["metrics"]
    assert stored["metrics"]["n_slices"] == len(frame) >= 1
    members = [json.loads(m) for m in frame["members"]]
    flat = np.concatenate(members)
    assert len(flat) == len(set(flat.tolist())) == stored["metrics"]["slice_examples"]  # disjoint slices
    assert (frame["size"] >= config.min_size).all()
    assert (frame["accuracy"] <= config.max_accuracy).all()
    assert stored["config"]["opponent_pool_examples"] == 30
    for opponents, files in zip(frame["opponents"], frame["opponent_files"]):
        # positions in the training images that have features (the fit and pool parts, at most all 60)
        assert all(0 <= i < 60 for i in json.loads(opponents))
        assert all(not f.startswith("val_") for f in json.loads(files))  # opponents come from the training split
    for name in ("figure_slices.png", "figure_distributions.png"):
        assert (out / name).stat().st_size > 1000
    thumbnails = json.loads(frame["opponent_thumbnails"][0])
    assert all((out / t).is_file() for t in thumbnails)

    # A = 0.4 as given unless scaled; the learning curve is recorded once and read back with the cached weights.
    assert stored["config"]["effective_max_accuracy"] == config.max_accuracy
    (epoch,) = stored["training"]["learning_curve"]
    assert epoch["epoch"] == 1 and 0 <= epoch["val_accuracy"] <= 1 and epoch["train_loss"] > 0
    assert stored["training"]["one_time_cost_s"] == epoch["elapsed_s"]
    again = run(ImageNetConfig(**{**vars(config), "max_accuracy": 0.5, "scale_max_accuracy": True}),
                out=str(tmp_path / "again"), progress=False)
    assert again["training"]["learning_curve"] == stored["training"]["learning_curve"]
    assert again["metrics"]["test_accuracy"] == summary["metrics"]["test_accuracy"]
    assert again["config"]["effective_max_accuracy"] == round(0.5 * summary["metrics"]["test_accuracy"] / 0.698, 4)
