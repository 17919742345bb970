"""The slice figures and tables of the paper's case studies, from one code path.

Every figure starts from a slice table as :func:`harness.summarize_slices` returns it
(``size``, ``accuracy``, ``label_distribution``, ``prediction_distribution`` per row):

* :func:`plot_slice_distributions` - label (red) vs prediction (blue) distribution per
  slice, with its size and error rate (paper Figure F; Figure 1, left);
* :func:`plot_slice_examples` - one row per slice: the same bars, the examples nearest
  the slice centre and the slice's strongest opponents as thumbnails with their labels
  (paper Figures 1 and 2);
* :func:`text_slice_table` - the texts nearest each slice centre with label and
  prediction, as a table (paper Tables 2 and 3).

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot state, no GUI
backend) and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.errors import InputError
from harness.io import atomic_path, atomic_write_text

LABEL_COLOUR = "tab:red"
PREDICTION_COLOUR = "tab:blue"
REQUIRED = ("size", "accuracy", "label_distribution", "prediction_distribution")


def _check_frame(frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"expected a slice table (pandas DataFrame); got {type(frame).__name__}")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"slice table lacks column(s) {missing} (use harness.summarize_slices)")
    if frame.empty:
        raise InputError("the slice table is empty: no slice to draw")


def _save(figure: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def _short(name: Any, limit: int = 18) -> str:
    text = str(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw_distributions(ax, label_distribution: dict, prediction_distribution: dict, max_classes: int = 6) -> None:
    """Paired horizontal bars per class: share of the slice with that label (red) and
    with that prediction (blue); the ``max_classes`` classes with the largest shares."""
    shares = {}
    for name in list(label_distribution) + list(prediction_distribution):
        shares[name] = max(label_distribution.get(name, 0.0), prediction_distribution.get(name, 0.0))
    classes = sorted(shares, key=lambda n: -shares[n])[:max_classes]
    y = np.arange(len(classes))
    height = 0.4
    ax.barh(y - height / 2, [label_distribution.get(c, 0.0) for c in classes], height, color=LABEL_COLOUR,
            label="label")
    ax.barh(y + height / 2, [prediction_distribution.get(c, 0.0) for c in classes], height,
            color=PREDICTION_COLOUR, label="prediction")
    ax.set_yticks(y, [_short(c) for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)


def _slice_title(row: pd.Series) -> str:
    name = row["slice"] if "slice" in row else row.name
    return f"slice {name}: n={int(row['size'])}, error {100 * (1 - float(row['accuracy'])):.0f}%"


def plot_slice_distributions(frame: pd.DataFrame, path: str | os.PathLike, title: str | None = None,
                             max_classes: int = 6, n_cols: int = 3, dpi: int = 100) -> Path:
    """Figure F: label vs prediction distribution of every slice in ``frame``."""
    _check_frame(frame)
    n = len(frame)
    n_cols = max(1, min(n_cols, n))
    n_rows = -(-n // n_cols)
    figure = Figure(figsize=(3.6 * n_cols, 2.1 * n_rows))
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for ax, (_, row) in zip(axes.flat, frame.iterrows()):
        draw_distributions(ax, row["label_distribution"], row["prediction_distribution"], max_classes)
        ax.set_title(_slice_title(row), fontsize=8)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=7, loc="lower right")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path, dpi)


def plot_slice_examples(frame: pd.DataFrame, path: str | os.PathLike,
                        nearest: Sequence[Sequence[tuple[np.ndarray, str]]],
                        opponents: Sequence[Sequence[tuple[np.ndarray, str]]],
                        title: str | None = None, max_classes: int = 5, dpi: int = 60) -> Path:
    """Figures 1/2: per slice (row of ``frame``), the distribution bars, then the
    ``nearest`` (image, caption) pairs, then the ``opponents`` (image, caption) pairs.

    Images are (H, W, 3) uint8 or floats in [0, 1]; captions are e.g. "label / prediction".
    """
    _check_frame(frame)
    if len(nearest) != len(frame) or len(opponents) != len(frame):
        raise InputError(
            f"mismatched lengths: {len(frame)} slices, {len(nearest)} nearest and {len(opponents)} opponent lists"
        )
    n_near = max((len(x) for x in nearest), default=0)
    n_opp = max((len(x) for x in opponents), default=0)
    n_cols = 1 + n_near + n_opp
    figure = Figure(figsize=(2.6 + 1.5 * (n_near + n_opp), 1.7 * len(frame)))
    grid = figure.add_gridspec(len(frame), n_cols, width_ratios=[2.2] + [1] * (n_near + n_opp))
    for r, (_, row) in enumerate(frame.iterrows()):
        ax = figure.add_subplot(grid[r, 0])
        draw_distributions(ax, row["label_distribution"], row["prediction_distribution"], max_classes)
        ax.set_title(_slice_title(row), fontsize=7)
        if r == 0:
            ax.legend(fontsize=6, loc="lower right")
        for c, (group, heading) in enumerate(((nearest[r], "nearest centre"), (opponents[r], "opponent"))):
            offset = 1 + c * n_near
            for k, (image, caption) in enumerate(group):
                ax = figure.add_subplot(grid[r, offset + k])
                ax.imshow(np.asarray(image), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(_short(caption, 26), fontsize=6)
                if r == 0:
                    ax.set_title(f"{heading} {k + 1}", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path, dpi)


def _distribution_text(distribution: dict, top: int = 3) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in list(distribution.items())[:top])


def text_slice_table(frame: pd.DataFrame, texts: Sequence[str], labels: np.ndarray, predictions: np.ndarray,
                     class_names: Sequence[str], n_texts: int = 3, max_chars: int = 220) -> pd.DataFrame:
    """Tables 2/3: one row per text nearest a slice centre (``frame['nearest']``), with the
    slice's size, accuracy and label/prediction distributions, and the text's label and
    prediction."""
    _check_frame(frame)
    if "nearest" not in frame.columns:
        raise InputError("slice table lacks the 'nearest' column (use harness.summarize_slices)")
    rows = []
    for _, row in frame.iterrows():
        for rank, index in enumerate(list(row["nearest"])[:n_texts]):
            text = str(texts[index])
            rows.append({
                "slice": row["slice"] if "slice" in row else row.name,
                "size": int(row["size"]),
                "accuracy": round(float(row["accuracy"]), 3),
                "labels": _distribution_text(row["label_distribution"]),
                "predictions": _distribution_text(row["prediction_distribution"]),
                "rank": rank + 1,
                "example": int(index),
                "label": class_names[int(labels[index])],
                "prediction": class_names[int(predictions[index])],
                "text": text if len(text) <= max_chars else text[: max_chars - 1] + "…",
            })
    return pd.DataFrame(rows)


def write_text_table(table: pd.DataFrame, markdown_path: str | os.PathLike, csv_path: str | os.PathLike) -> None:
    """The text table as Markdown (for reading) and CSV (for tools), written atomically."""
    atomic_write_text(table.to_markdown(index=False) + "\n", markdown_path)
    atomic_write_text(table.to_csv(index=False), csv_path)
