"""Slice figures and text tables from harness.report.figures, on slices of the digits data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from harness import kmeans_slices, summarize_slices
from harness.errors import InputError
from harness.report.figures import plot_slice_distributions, plot_slice_examples, text_slice_table, write_text_table


@pytest.fixture(scope="module")
def digit_slices():
    x, y = load_digits(return_X_y=True)
    x, y = x[:300], y[:300]
    # A deliberately confused "model": predicts 1 for every 7, so some slices have errors.
    predictions = np.where(y == 7, 1, y)
    ids, _ = kmeans_slices(x, 6, seed=0)
    frame = summarize_slices(ids, x, y, predictions, n_nearest=4, class_names=[str(d) for d in range(10)])
    images = (x.reshape(-1, 8, 8) * 16).astype(np.uint8)
    return frame, images, y, predictions


def test_distribution_figure_is_written(digit_slices, tmp_path):
    frame, *_ = digit_slices
    path = plot_slice_distributions(frame, tmp_path / "f.png", title="digits")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_example_figure_is_written(digit_slices, tmp_path):
    frame, images, y, predictions = digit_slices
    rgb = np.repeat(images[..., None], 3, axis=-1)
    nearest = [[(rgb[i], f"{y[i]} / {predictions[i]}") for i in row] for row in frame["nearest"]]
    opponents = [[(rgb[i], str(y[i])) for i in row[:2]] for row in frame["nearest"]]
    path = plot_slice_examples(frame, tmp_path / "e.png", nearest, opponents)
    assert path.stat().st_size > 1000
    with pytest.raises(InputError, match="mismatched"):
        plot_slice_examples(frame, tmp_path / "e.png", nearest[:-1], opponents)


def test_text_table_lists_nearest_examples(digit_slices, tmp_path):
    frame, _, y, predictions = digit_slices
    texts = [f"digit {d}" for d in y]
    table = text_slice_table(frame, texts, y, predictions, [str(d) for d in range(10)], n_texts=3)
    assert len(table) == 3 * len(frame)
    first = table.iloc[0]
    assert first["text"] == texts[first["example"]] and first["label"] == str(y[first["example"]])
    write_text_table(table, tmp_path / "t.md", tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").shape == table.shape
    assert (tmp_path / "t.md").read_text().startswith("|")


def test_bad_slice_tables_are_rejected(tmp_path):
    with pytest.raises(InputError, match="empty"):
        plot_slice_distributions(pd.DataFrame(columns=["size", "accuracy", "label_distribution",
                                                       "prediction_distribution"]), tmp_path / "x.png")
    with pytest.raises(InputError, match="lacks"):
        plot_slice_distributions(pd.DataFrame({"size": [1]}), tmp_path / "x.png")
