"""COVID-19 chest X-rays: torchxrayvision loader, bone-age stand-in age groups, the DenseNet
trunk/head split, Table 4, and both experiments end to end on the real data (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness.data.covid import DATASET_NAME, age_group_table, covid_root, load_covid19, patient_split
from harness.errors import InputError
from harness.paths import has_dataset

needs_data = pytest.mark.skipif(not has_dataset(DATASET_NAME), reason=f"shared dataset {DATASET_NAME!r} is absent")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Trained models and factors go to a temporary cache, so every run trains and embeds."""
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))


def test_missing_data_gives_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="metadata.csv, images"):
        covid_root(tmp_path)
    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    with pytest.raises(InputError, match="covid-chestxray.*not found"):
        covid_root()


def test_patient_split_keeps_each_patient_on_one_side():
    patients = np.repeat(np.arange(30), 3).astype(str)
    train, test = patient_split(patients, 0.25, seed=0)
    assert set(patients[train]).isdisjoint(patients[test])
    assert len(train) + len(test) == len(patients)
    again = patient_split(patients, 0.25, seed=0)
    assert np.array_equal(again[1], test)
    with pytest.raises(InputError, match="test_fraction"):
        patient_split(patients, 1.5, seed=0)


def test_table4_means_per_outcome_and_cluster_with_nan_where_empty():
    from experiments.covid_xray import OUTCOMES, outcome_names, table4

    targets = np.array([0, 0, 1, 1, 1])
    predicted = np.array([0, 1, 0, 1, 1])
    outcomes = outcome_names(targets, predicted)
    assert outcomes.tolist() == ["TN", "FP", "FN", "TP", "TP"]
    labels = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [0, 0]], dtype=float)
    clusters = np.array([0, 0, 1, 1, 0])
    table = table4(labels, ["A", "B"], clusters, outcomes, n_clusters=2)
    assert list(table.columns.get_level_values(0).unique()) == list(OUTCOMES)
    assert table[("TP", "C1")].tolist() == [0.0, 0.0]
    assert table[("TP", "C2")].tolist() == [1.0, 0.0]
    assert table[("FN", "C2")].tolist() == [1.0, 1.0]
    assert table[("TN", "C2")].isna().all() and table[("FN", "C1")].isna().all()


def test_densenet_head_on_trunk_features_equals_the_whole_model():
    xrv = pytest.importorskip("torchxrayvision")
    from experiments.covid_xray import PAPER_LAYERS
    from harness.models.densenet import DenseNetHead, DenseNetTrunk

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, num_classes=2, block_config=(1, 1, 1, 3)).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(3, 1, 32, 32) * 500
    head = DenseNetHead(model)
    with torch.no_grad():
        assert torch.allclose(head(DenseNetTrunk(model)(images)), model(images), atol=1e-5)
    names = [n for n, _ in head.named_parameters()]
    assert "features.denseblock4.denselayer3.conv1.weight" in names and "classifier.weight" in names
    assert PAPER_LAYERS[1] == "features.denseblock4.denselayer16.conv1"


@needs_data
def test_torchxrayvision_loader_skips_rows_without_an_image():
    pytest.importorskip("torchxrayvision")
    dataset = load_covid19()
    # The data README's loader check: 527 frontal rows, 520 with an image, 423 COVID-19 positive.
    assert len(dataset) == 520
    assert int(dataset.labels[:, dataset.pathologies.index("COVID-19")].sum()) == 423
    sample = dataset[len(dataset) - 1]
    assert sample["img"].shape[0] == 1 and float(sample["img"].max()) <= 1024


@needs_data
def test_stand_in_age_groups_are_five_ordered_equal_bins():
    table, names = age_group_table()
    assert len(names) == 5 and len(table) == 452
    counts = np.bincount(table["label"], minlength=5)
    assert counts.min() >= 0.15 * len(table)
    for group, name in enumerate(names):
        low, high = (int(v) for v in name.split("-"))
        ages = table.loc[table["label"] == group, "age"]
        assert ages.min() >= low and ages.max() <= high
    assert all(Path(p).is_file() for p in table["path"])


@needs_data
def test_covid_experiment_end_to_end_on_a_tiny_subset(tmp_path, fresh_cache):
    pytest.importorskip("torchxrayvision")
    from experiments import covid_xray

    out = tmp_path / "covid"
    summary = covid_xray.main([
        "--subset", "40", "--epochs", "1", "--image-size", "32", "--blocks", "1,1,1,16",
        "--arnoldi-dim", "8", "--embedding-dim", "4", "--out", str(out), "--quiet",
    ])
    assert summary["model"]["pretrained"] is False
    table = pd.read_csv(out / "table4.csv", index_col="label")
    assert table.shape == (len(summary["data"]["pathologies"]), 12)
    clusters = pd.read_csv(out / "clusters.csv")
    assert clusters["size"].sum() == summary["data"]["n_test"]
    for _, row in clusters.iterrows():
        for outcome in ("TN", "FP", "FN", "TP"):
            column = table[f"{outcome}_{row['cluster']}"]
            assert column.isna().all() == (row[outcome] == 0)
    # COVID-19 is 1 for every (false negative, true positive) and 0 for every (TN, FP) example.
    covid = table.loc["COVID-19"]
    assert ((covid.filter(regex="^(FN|TP)").dropna() == 1).all() and (covid.filter(regex="^(TN|FP)").dropna() == 0).all())
    assert json.loads((out / "summary.json").read_text())["influence"]["layers"][0] == "classifier"
