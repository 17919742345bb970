"""The result-directory contract of slice reports: what the files hold, how to write and read them.

A *slice-report directory* is any directory holding at least one slice table
(``slices.csv`` or ``slices_<name>.csv``). It must also hold ``summary.json``.
Directories without a slice table are not slice reports and are skipped.

``summary.json`` (an object)
    ``config`` (object, required)
        The exact configuration of the run: model, layers, P, D, seeds, K or the rule
        thresholds, ... Shown verbatim in the report header.
    ``data_source`` (string or object, required)
        Where the data came from. An object may carry ``kind`` (``"canonical"`` for
        the paper's data, ``"offline stand-in"`` for a substitute), ``name`` and
        ``description``; every key is shown.
    ``title``, ``description`` (strings, optional)
        Heading (default: the directory name) and a paragraph under it.
    ``metrics`` (object, optional)
        Headline numbers (e.g. test accuracy), shown in the header.
    ``slice_tables`` (list, optional)
        Which slice tables to show, in order: file names or objects
        ``{"file": ..., "title": ...}``. Default: every ``slices*.csv``, sorted.
    ``group_label`` (string, optional)
        What the slice table's ``group`` column means (e.g. ``"Injected signal"``).
    Any other key is shown, collapsed, under "Other summary fields".

Slice table (CSV, one row per slice; list and dict cells are JSON, or Python
literals as ``DataFrame.to_csv`` writes them for :func:`harness.summarize_slices`)
    required: ``slice``, ``size``, ``accuracy`` (0..1), ``label_distribution`` and
    ``prediction_distribution`` (``{class: share}``).
    optional: ``n_errors``; ``nearest`` (example indices nearest the slice centre)
    with ``nearest_thumbnails`` (image paths relative to the directory, or data
    URIs), ``nearest_texts`` and ``nearest_labels``; ``opponents`` (training indices,
    most harmful first) with ``opponent_scores``, ``opponent_thumbnails``,
    ``opponent_texts`` and ``opponent_labels``; ``members`` (every example index of
    the slice, read by ``python -m harness opponents``); ``group`` (several runs in one
    table, e.g. one per injected signal: cards are shown per group). Other columns are
    ignored. A card lists at most ``harness.report.render.MAX_SHOWN_EXAMPLES`` examples
    of each kind.

``table1.csv`` or ``table1.md`` (optional)
    Shown as "Table 1"; looked up in the directory, then in its parent (``results/``).

Here: :func:`save_slice_table` and :func:`save_thumbnails` write the contract;
:func:`read_summary`, :func:`read_slice_table` (cells decoded by :func:`parse_cell`),
:func:`slice_table_entries`, :func:`find_table1` and :func:`experiment_dirs` read and
check it. :mod:`harness.report.render` turns what they read into HTML.
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.errors import InputError
from harness.io import atomic_write_text

SUMMARY_FILE = "summary.json"
MAX_CELL_CHARS = 10_000_000  # a cell listing every member of a slice of millions still fits
SLICE_TABLE_GLOB = "slices*.csv"
TABLE1_NAMES = ("table1.csv", "table1.md")
REQUIRED_SUMMARY_KEYS = ("config", "data_source")
SUMMARY_KEYS = (*REQUIRED_SUMMARY_KEYS, "title", "description", "metrics", "slice_tables", "group_label")
REQUIRED_COLUMNS = ("slice", "size", "accuracy", "label_distribution", "prediction_distribution")
LIST_COLUMNS = (
    "nearest",
    "nearest_thumbnails",
    "nearest_texts",
    "nearest_labels",
    "opponents",
    "opponent_scores",
    "opponent_thumbnails",
    "opponent_texts",
    "opponent_labels",
    "members",
)
# Thumbnail files a ``*_thumbnails`` cell may name (anything else is refused, not embedded).
IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}


# ---------------------------------------------------------------- writing the contract
def save_slice_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes a slice table (e.g. :func:`harness.summarize_slices`' frame plus optional
    columns) as CSV with list and dict cells encoded as JSON."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"slice table lacks required column(s) {missing}; it has {list(frame.columns)}")
    encoded = frame.copy()
    nested = (list, tuple, dict, np.ndarray)
    for column in encoded.columns:
        if encoded[column].map(lambda v: isinstance(v, nested)).any():
            # Cells without a value (a slice not illustrated) stay empty, not "null".
            encoded[column] = encoded[column].map(lambda v: json.dumps(_jsonable(v)) if isinstance(v, nested) else v)
    path = Path(path)
    atomic_write_text(encoded.to_csv(index=False), path)
    return path


def save_thumbnails(
    images: np.ndarray | Sequence[np.ndarray],
    experiment_dir: str | os.PathLike,
    names: Sequence[str],
    folder: str = "thumbnails",
) -> list[str]:
    """Saves images as ``experiment_dir/folder/<name>.png`` and returns their paths
    relative to ``experiment_dir``, ready for a ``*_thumbnails`` column.

    Each image is (H, W) grey, (H, W, 3|4) or (1|3|4, H, W) (channels first, as torch).
    Each is shown scaled to its own min..max.
    """
    import matplotlib.pyplot as plt

    if len(images) != len(names):
        raise InputError(f"mismatched lengths: {len(images)} images but {len(names)} names")
    directory = Path(experiment_dir) / folder
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise InputError(f"image {name!r} has shape {np.shape(image)}; expected (H, W), (H, W, C) or (C, H, W)")
        if not np.isfinite(array).all():
            raise InputError(f"image {name!r} contains non-finite values")
        low, high = array.min(), array.max()
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        plt.imsave(directory / f"{name}.png", scaled, cmap="gray" if scaled.ndim == 2 else None, vmin=0.0, vmax=1.0)
        paths.append(f"{folder}/{name}.png")
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------- reading the contract
def is_slice_report_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob(SLICE_TABLE_GLOB))


def read_summary(directory: Path) -> dict:
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise InputError(
            f"{directory} has a slice table but no {SUMMARY_FILE}: write one with keys {list(REQUIRED_SUMMARY_KEYS)} "
            "(see harness.report.contract for the result-directory contract)"
        )
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(summary, dict):
        raise InputError(f"{path} must hold a JSON object; got {type(summary).__name__}")
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        raise InputError(f"{path} lacks required key(s) {missing}")
    if not isinstance(summary["config"], dict):
        raise InputError(f"{path}: 'config' must be an object; got {type(summary['config']).__name__}")
    if not isinstance(summary["data_source"], (str, dict)):
        raise InputError(f"{path}: 'data_source' must be a string or an object")
    for key in ("metrics",):
        if key in summary and not isinstance(summary[key], dict):
            raise InputError(f"{path}: {key!r} must be an object")
    return summary


def slice_table_entries(directory: Path, summary: dict) -> list[tuple[str, str]]:
    """(file, title) of every slice table to show."""
    listed = summary.get("slice_tables")
    if listed is None:
        return [(p.name, _default_table_title(p.name)) for p in sorted(directory.glob(SLICE_TABLE_GLOB))]
    if not isinstance(listed, list) or not listed:
        raise InputError(f"{directory / SUMMARY_FILE}: 'slice_tables' must be a non-empty list")
    entries = []
    for item in listed:
        if isinstance(item, str):
            entries.append((item, _default_table_title(item)))
        elif isinstance(item, dict) and isinstance(item.get("file"), str):
            entries.append((item["file"], str(item.get("title") or _default_table_title(item["file"]))))
        else:
            raise InputError(
                f"{directory / SUMMARY_FILE}: each 'slice_tables' entry is a file name or {{'file', 'title'}}"
            )
    return entries


def _default_table_title(file_name: str) -> str:
    stem = Path(file_name).stem
    method = stem[len("slices") :].strip("_- ")
    return f"Slices ({method.replace('_', ' ')})" if method else "Slices"


def parse_cell(value: Any, column: str, where: str) -> Any:
    """A list/dict cell from JSON or a Python literal; ``None`` for an empty cell."""
    if isinstance(value, (list, dict)):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if text == "":
        return None
    if len(text) > MAX_CELL_CHARS:
        raise InputError(f"{where}: column {column!r} holds {len(text)} characters (at most {MAX_CELL_CHARS})")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    except RecursionError as exc:
        raise InputError(f"{where}: column {column!r} is nested too deeply: {text[:40]!r}...") from exc
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise InputError(f"{where}: column {column!r} is neither JSON nor a Python literal: {text[:80]!r}") from exc


def read_slice_table(path: str | os.PathLike) -> pd.DataFrame:
    """A slice table with list/dict cells decoded; ``InputError`` on a missing required column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no slice table at {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path} lacks required column(s) {missing}; it has {list(frame.columns)}")
    frame = frame.astype(object)
    for row in frame.index:
        where = f"{path}, slice {frame.at[row, 'slice']!r}"
        for column in ("label_distribution", "prediction_distribution", *LIST_COLUMNS):
            if column in frame.columns:
                frame.at[row, column] = parse_cell(frame.at[row, column], column, where)
    return frame


def find_table1(directory: Path) -> Path | None:
    """``table1.csv`` (preferred) or ``table1.md`` in ``directory``, else in its parent."""
    for folder in (directory, directory.parent):
        for name in TABLE1_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def experiment_dirs(results_root: str | os.PathLike) -> list[Path]:
    """The slice-report directories: ``results_root`` itself if it is one, else its sub-directories that are."""
    root = Path(results_root)
    if not root.is_dir():
        raise InputError(f"no results directory at {root}")
    if is_slice_report_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if is_slice_report_dir(p))
