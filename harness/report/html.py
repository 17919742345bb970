"""Static, self-contained HTML slice reports from result directories.

A report is one HTML file with inline CSS, inline JavaScript and images embedded as
base64 data URIs: it opens from disk in any browser, needs no server and makes no
network request, and can be mailed or archived as a single file.

Result-directory contract
-------------------------
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
    ignored. A card lists at most ``MAX_SHOWN_EXAMPLES`` examples of each kind.

``table1.csv`` or ``table1.md`` (optional)
    Shown as "Table 1"; looked up in the directory, then in its parent (``results/``).

:func:`save_slice_table` and :func:`save_thumbnails` write the contract;
:func:`write_report` renders one directory, :func:`write_reports` every directory
under a results folder plus an ``index.html`` linking them.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2
from markupsafe import Markup, escape
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from harness.errors import InputError
from harness.io import atomic_write_text

SUMMARY_FILE = "summary.json"
MAX_CELL_CHARS = 10_000_000  # a cell listing every member of a slice of millions still fits
REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
SLICE_TABLE_GLOB = "slices*.csv"
TABLE1_NAMES = ("table1.csv", "table1.md")
REQUIRED_SUMMARY_KEYS = ("config", "data_source")
SHOWN_SUMMARY_KEYS = (*REQUIRED_SUMMARY_KEYS, "title", "description", "metrics", "slice_tables", "group_label")
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
# Beyond this many classes a bar chart stops being readable; the rest is one "other" bar.
MAX_CHART_CLASSES = 8
# A card lists at most this many nearest examples / opponents; the rest are counted.
MAX_SHOWN_EXAMPLES = 12
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
@dataclass
class Example:
    """One example shown on a card (nearest the centre, or an opponent)."""

    index: Any = None
    thumbnail: str | None = None
    text: str | None = None
    label: str | None = None
    score: float | None = None


@dataclass
class Bar:
    name: str
    label_share: float
    prediction_share: float


@dataclass
class SliceCard:
    slice: str
    size: int
    accuracy: float
    n_errors: int | None
    label_distribution: dict[str, float]
    prediction_distribution: dict[str, float]
    nearest: list[Example] = field(default_factory=list)
    opponents: list[Example] = field(default_factory=list)
    group: str | None = None

    @property
    def top_label(self) -> str:
        return next(iter(self.label_distribution), "")

    @property
    def top_prediction(self) -> str:
        return next(iter(self.prediction_distribution), "")

    def bars(self) -> list[Bar]:
        """Classes by their larger share (label or prediction); the tail becomes 'other'."""
        names = list(dict.fromkeys([*self.label_distribution, *self.prediction_distribution]))
        names.sort(key=lambda n: -max(self.label_distribution.get(n, 0.0), self.prediction_distribution.get(n, 0.0)))
        shown = names[:MAX_CHART_CLASSES]
        bars = [Bar(n, self.label_distribution.get(n, 0.0), self.prediction_distribution.get(n, 0.0)) for n in shown]
        rest = names[MAX_CHART_CLASSES:]
        if rest:
            bars.append(
                Bar(
                    f"other ({len(rest)})",
                    sum(self.label_distribution.get(n, 0.0) for n in rest),
                    sum(self.prediction_distribution.get(n, 0.0) for n in rest),
                )
            )
        return bars


@dataclass
class SliceTable:
    title: str
    file: str
    cards: list[SliceCard]

    def groups(self) -> list[tuple[str | None, list[SliceCard]]]:
        """Cards by their ``group`` column value, in order of first appearance."""
        grouped: dict[str | None, list[SliceCard]] = {}
        for card in self.cards:
            grouped.setdefault(card.group, []).append(card)
        return list(grouped.items())


@dataclass
class Experiment:
    name: str
    path: Path
    summary: dict
    tables: list[SliceTable]
    table1_html: str | None

    @property
    def title(self) -> str:
        return str(self.summary.get("title") or self.name)


def is_slice_report_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob(SLICE_TABLE_GLOB))


def read_summary(directory: Path) -> dict:
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise InputError(
            f"{directory} has a slice table but no {SUMMARY_FILE}: write one with keys {list(REQUIRED_SUMMARY_KEYS)} "
            "(see harness.report.html for the result-directory contract)"
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


def _table_entries(directory: Path, summary: dict) -> list[tuple[str, str]]:
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


def _number(value: Any, column: str, where: str, kind: type) -> Any:
    try:
        number = kind(float(value))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {column!r} must be a number; got {value!r}") from exc
    return number


def _distribution(value: Any, column: str, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise InputError(f"{where}: {column!r} must be a non-empty {{class: share}} mapping; got {value!r}")
    try:
        shares = {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {column!r} shares must be numbers; got {value!r}") from exc
    if any(not 0.0 <= s <= 1.0 + 1e-6 for s in shares.values()):
        raise InputError(f"{where}: {column!r} shares must lie in [0, 1]; got {value!r}")
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


class _Images:
    """Reads thumbnails once each and embeds them as data URIs."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.cache: dict[str, str] = {}

    def data_uri(self, reference: Any, where: str) -> str:
        reference = str(reference)
        if reference.startswith("data:image/"):
            return reference
        if reference not in self.cache:
            path = self.directory / reference
            if path.suffix.lower() not in IMAGE_TYPES:
                raise InputError(f"{where}: thumbnail {reference!r} is not an image file ({sorted(IMAGE_TYPES)})")
            if not path.is_file():
                raise InputError(f"{where}: thumbnail {reference!r} not found at {path}")
            mime = mimetypes.guess_type(path.name)[0] or "image/png"
            self.cache[reference] = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        return self.cache[reference]


def _examples(row: pd.Series, prefix: str, index_column: str, images: _Images, where: str) -> list[Example]:
    def column(name: str) -> list | None:
        value = row.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise InputError(f"{where}: {name!r} must be a list; got {type(value).__name__}")
        return value

    indices = column(index_column)
    thumbnails = column(f"{prefix}_thumbnails")
    texts = column(f"{prefix}_texts")
    labels = column(f"{prefix}_labels")
    scores = column("opponent_scores") if prefix == "opponent" else None
    given = {n: v for n, v in ((index_column, indices), (f"{prefix}_thumbnails", thumbnails),
                               (f"{prefix}_texts", texts), (f"{prefix}_labels", labels),
                               ("opponent_scores", scores)) if v is not None}
    if not given:
        return []
    lengths = {n: len(v) for n, v in given.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"{where}: mismatched lengths of the {prefix} columns: {lengths}")
    count = next(iter(lengths.values()))
    return [
        Example(
            index=indices[i] if indices is not None else None,
            thumbnail=images.data_uri(thumbnails[i], where) if thumbnails is not None else None,
            text=str(texts[i]) if texts is not None else None,
            label=str(labels[i]) if labels is not None else None,
            score=_number(scores[i], "opponent_scores", where, float) if scores is not None else None,
        )
        for i in range(count)
    ]


def _cards(frame: pd.DataFrame, path: Path, images: _Images) -> list[SliceCard]:
    cards = []
    for _, row in frame.iterrows():
        where = f"{path}, slice {row['slice']!r}" + (f" (group {row['group']!r})" if "group" in row else "")
        accuracy = _number(row["accuracy"], "accuracy", where, float)
        if not 0.0 <= accuracy <= 1.0:
            raise InputError(f"{where}: 'accuracy' must lie in [0, 1]; got {accuracy}")
        size = _number(row["size"], "size", where, int)
        if size < 0:
            raise InputError(f"{where}: 'size' must be >= 0; got {size}")
        n_errors = row.get("n_errors")
        cards.append(
            SliceCard(
                slice=str(row["slice"]),
                size=size,
                accuracy=accuracy,
                n_errors=_number(n_errors, "n_errors", where, int) if n_errors not in (None, "") else None,
                label_distribution=_distribution(row["label_distribution"], "label_distribution", where),
                prediction_distribution=_distribution(row["prediction_distribution"], "prediction_distribution", where),
                nearest=_examples(row, "nearest", "nearest", images, where),
                opponents=_examples(row, "opponent", "opponents", images, where),
                group=str(row["group"]) if row.get("group") not in (None, "") else None,
            )
        )
    return cards


def find_table1(directory: Path) -> Path | None:
    """``table1.csv`` (preferred) or ``table1.md`` in ``directory``, else in its parent."""
    for folder in (directory, directory.parent):
        for name in TABLE1_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def table1_html(path: Path | None) -> str | None:
    if path is None:
        return None
    if path.suffix == ".csv":
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"{path} is not a readable CSV: {exc}") from exc
        return frame.to_html(index=False, border=0, classes="table1", na_rep="", float_format=lambda x: f"{x:.3g}")
    return f'<pre class="table1">{escape(path.read_text())}</pre>'


def read_experiment(directory: str | os.PathLike) -> Experiment:
    """Reads and validates one slice-report directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"no result directory at {directory}")
    if not is_slice_report_dir(directory):
        raise InputError(
            f"{directory} holds no slice table ({SLICE_TABLE_GLOB}); see harness.report.html for the contract"
        )
    summary = read_summary(directory)
    images = _Images(directory)
    tables = []
    for file_name, title in _table_entries(directory, summary):
        path = directory / file_name
        tables.append(SliceTable(title, file_name, _cards(read_slice_table(path), path, images)))
    return Experiment(directory.name, directory, summary, tables, table1_html(find_table1(directory)))


# ---------------------------------------------------------------- rendering
def _config_rows(config: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_config_rows(value, f"{name}."))
        else:
            rows.append((name, value if isinstance(value, str) else json.dumps(value)))
    return rows


def _short(text: str, limit: int = 16) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


_CSS = """
:root { --label: #d62728; --pred: #1f77b4; --ink: #1d2430; --muted: #5b6472; --line: #d9dde3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f4f6f8; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 16px 24px; }
h1 { margin: 0 0 4px; font-size: 22px; } h2 { font-size: 18px; margin: 24px 0 8px; }
main { padding: 0 24px 32px; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e7ecf2; }
.badge.canonical { background: #d8f0dc; color: #175a26; } .badge.stand-in { background: #fdecc8; color: #7a4b00; }
details { margin-top: 8px; } summary { cursor: pointer; font-weight: 600; }
table.kv, table.table1 { border-collapse: collapse; margin: 6px 0; background: #fff; }
table.kv td, table.table1 td, table.table1 th { border: 1px solid var(--line); padding: 3px 8px; text-align: left;
         vertical-align: top; }
table.kv td:first-child { font-family: ui-monospace, monospace; color: var(--muted); }
table.kv td code { white-space: pre-wrap; word-break: break-word; }
pre.table1 { background: #fff; border: 1px solid var(--line); padding: 8px; overflow-x: auto; }
.controls { margin: 8px 0 12px; display: flex; gap: 8px; align-items: center; }
.controls button { font: inherit; padding: 4px 12px; border: 1px solid var(--line); border-radius: 6px;
                   background: #fff; cursor: pointer; }
.controls button[aria-pressed="true"] { background: var(--ink); color: #fff; border-color: var(--ink); }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; vertical-align: middle; }
.slice-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 14px; }
.slice-card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.slice-card h3 { margin: 0; font-size: 16px; display: flex; justify-content: space-between; }
.stats { display: flex; gap: 14px; margin: 4px 0 8px; color: var(--muted); }
.stats b { color: var(--ink); }
.acc-low { color: #b3261e; }
.dist-chart { width: 100%; height: auto; display: block; }
.dist-chart text { font-size: 11px; fill: var(--ink); }
.bar-label { fill: var(--label); } .bar-pred { fill: var(--pred); }
.examples { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 8px; }
.example { margin: 0; width: 76px; font-size: 11px; color: var(--muted); text-align: center; }
.example img.thumb { width: 72px; height: 72px; object-fit: contain; image-rendering: pixelated;
                     border: 1px solid var(--line); background: #000; display: block; margin: 0 auto 2px; }
.example img.thumb.broken { outline: 3px solid #b3261e; }
.example.text { width: 100%; text-align: left; }
.example.text blockquote { margin: 0; padding: 4px 8px; border-left: 3px solid var(--line); color: var(--ink);
                           max-height: 5.8em; overflow: hidden; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin: 4px 0 8px; }
.chip { font-size: 12px; background: #eef1f5; border-radius: 4px; padding: 0 6px; }
h4 { margin: 8px 0 2px; font-size: 13px; }
h3.slice-group { margin: 16px 0 8px; font-size: 15px; }
.chip.more { background: none; color: var(--muted); align-self: center; }
"""

# Cards carry their numbers as data attributes; sorting just reorders the nodes.
# "#sort=size" in the address selects the order on load (links can share a view).
_JS = """
(function () {
  var orders = {
    accuracy: function (a, b) { return a.dataset.accuracy - b.dataset.accuracy || b.dataset.size - a.dataset.size; },
    size: function (a, b) { return b.dataset.size - a.dataset.size || a.dataset.accuracy - b.dataset.accuracy; }
  };
  function sortCards(key) {
    if (!orders[key]) { return; }
    document.querySelectorAll('.slice-grid').forEach(function (grid) {
      Array.prototype.slice.call(grid.children).sort(orders[key]).forEach(function (card) { grid.appendChild(card); });
    });
    document.querySelectorAll('button[data-sort]').forEach(function (button) {
      button.setAttribute('aria-pressed', String(button.dataset.sort === key));
    });
    document.body.dataset.sort = key;
  }
  document.addEventListener('DOMContentLoaded', function () {
    document.querySelectorAll('button[data-sort]').forEach(function (button) {
      button.addEventListener('click', function () { sortCards(button.dataset.sort); });
    });
    var match = /sort=(\\w+)/.exec(window.location.hash);
    sortCards(match ? match[1] : 'accuracy');
  });
  window.addEventListener('load', function () {
    var broken = 0;
    document.querySelectorAll('img.thumb').forEach(function (img) {
      if (!img.naturalWidth) { img.classList.add('broken'); broken += 1; }
    });
    document.body.dataset.brokenImages = String(broken);
  });
})();
"""

_CHART = """{%- set row = 26 -%}{%- set left = 100 -%}{%- set span = 186 -%}
<svg class="dist-chart" viewBox="0 0 330 {{ bars|length * row + 4 }}" role="img"
     aria-label="label and prediction distribution of slice {{ card.slice }}">
{%- for bar in bars %}{% set y = loop.index0 * row + 2 %}
  <g class="bar-row"><title>{{ bar.name }}: label {{ pct(bar.label_share) }}, prediction {{ pct(bar.prediction_share) }}</title>
    <text x="{{ left - 6 }}" y="{{ y + 15 }}" text-anchor="end">{{ short(bar.name) }}</text>
    <rect class="bar-label" x="{{ left }}" y="{{ y + 1 }}" height="10" width="{{ '%.1f' % (bar.label_share * span) }}"/>
    <rect class="bar-pred" x="{{ left }}" y="{{ y + 12 }}" height="10" width="{{ '%.1f' % (bar.prediction_share * span) }}"/>
    <text x="{{ left + bar.label_share * span + 4 }}" y="{{ y + 10 }}">{{ pct(bar.label_share) }}</text>
    <text x="{{ left + bar.prediction_share * span + 4 }}" y="{{ y + 21 }}">{{ pct(bar.prediction_share) }}</text>
  </g>
{%- endfor %}
</svg>"""

_EXAMPLES = """{%- macro examples(items, kind) -%}
{%- if items and (items[0].thumbnail or items[0].text) %}
<div class="examples {{ kind }}">
{%- for ex in items[:max_shown] %}
  {%- set caption -%}
    {%- if ex.index is not none %}#{{ ex.index }}{% endif %}{% if ex.label %} &middot; {{ ex.label }}{% endif -%}
    {%- if ex.score is not none %}<br>{{ '%.3g' % ex.score }}{% endif -%}
  {%- endset %}
  {%- if ex.thumbnail %}
  <figure class="example"><img class="thumb" src="{{ ex.thumbnail }}" alt="{{ kind }} example {{ ex.index }}">
    <figcaption>{{ caption }}</figcaption></figure>
  {%- else %}
  <figure class="example text"><blockquote title="{{ ex.text }}">{{ ex.text }}</blockquote>
    <figcaption>{{ caption }}</figcaption></figure>
  {%- endif %}
{%- endfor %}
{%- if items|length > max_shown %}<span class="chip more">+{{ items|length - max_shown }} more</span>{% endif %}
</div>
{%- elif items %}
<div class="chips {{ kind }}">{% for ex in items[:max_shown] %}<span class="chip">#{{ ex.index }}
  {%- if ex.label %} {{ ex.label }}{% endif %}{% if ex.score is not none %} ({{ '%.3g' % ex.score }}){% endif %}</span>
{%- endfor %}
{%- if items|length > max_shown %}<span class="chip more">+{{ items|length - max_shown }} more</span>{% endif %}</div>
{%- endif %}
{%- endmacro %}"""

_HEADER = """<header>
  <h1>{{ title }}</h1>
  {% if description %}<p class="muted">{{ description }}</p>{% endif %}
  <div>Data source: {% if data_source is string %}<span class="badge">{{ data_source }}</span>
  {%- else %}{% if data_source.get('kind') %}<span class="badge {{ kind_class }}">{{ data_source.kind }}</span>{% endif %}
    {{ data_source.get('name', '') }}{% if data_source.get('description') %} &mdash; {{ data_source.description }}
    {%- endif %}{% endif %}
  </div>
  {% if metrics %}<div class="stats metrics">{% for key, value in metrics.items() %}<span>{{ key }}:
    <b>{{ '—' if value is none else value }}</b></span>{% endfor %}</div>{% endif %}
  <details open><summary>Configuration</summary>
    <table class="kv config">{% for key, value in config_rows %}<tr><td>{{ key }}</td><td><code>{{ value }}</code></td></tr>
    {% endfor %}</table>
    {% if source_rows %}<table class="kv source">{% for key, value in source_rows %}
      <tr><td>data_source.{{ key }}</td><td><code>{{ value }}</code></td></tr>{% endfor %}</table>{% endif %}
  </details>
  {% if extra_rows %}<details><summary>Other summary fields</summary>
    <table class="kv extra">{% for key, value in extra_rows %}<tr><td>{{ key }}</td><td><code>{{ value }}</code></td></tr>
    {% endfor %}</table></details>{% endif %}
</header>"""

_REPORT = (
    _EXAMPLES
    + """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} &ndash; slice report</title>
<style>{{ css }}</style>
<script>{{ js }}</script>
</head>
<body data-report="slices">
"""
    + _HEADER
    + """
<main>
{% if table1 %}<section class="table1-section"><h2>Table 1</h2>{{ table1 }}</section>{% endif %}
<div class="controls">Sort by
  <button type="button" data-sort="accuracy" aria-pressed="true">accuracy (worst first)</button>
  <button type="button" data-sort="size" aria-pressed="false">size (largest first)</button>
  <span class="legend muted"><span style="background: var(--label)"></span>label<span
    style="background: var(--pred)"></span>prediction</span>
</div>
{% for table in tables %}
<section class="slice-table" data-file="{{ table.file }}">
  <h2>{{ table.title }} <span class="muted">&middot; {{ table.cards|length }} slices &middot; {{ table.file }}</span></h2>
  {%- for group, cards in table.groups() %}
  {% if group is not none %}<h3 class="slice-group">{{ group_label }} {{ group }}</h3>{% endif %}
  <div class="slice-grid">
  {%- for card in cards %}
    <article class="slice-card" id="{{ table.file }}-{{ group or '' }}-slice-{{ card.slice }}" data-slice="{{ card.slice }}"
             data-size="{{ card.size }}" data-accuracy="{{ '%.6f' % card.accuracy }}"
             {%- if group is not none %} data-group="{{ group }}"{% endif %}>
      <h3><span>Slice {{ card.slice }}</span><span class="muted">{{ card.top_label }} &rarr; {{ card.top_prediction }}</span></h3>
      <div class="stats"><span>size <b>{{ card.size }}</b></span>
        <span>accuracy <b class="{{ 'acc-low' if card.accuracy < 0.5 else '' }}">{{ '%.1f' % (100 * card.accuracy) }}%</b></span>
        {% if card.n_errors is not none %}<span>errors <b>{{ card.n_errors }}</b></span>{% endif %}</div>
      {% set bars = card.bars() %}""" + _CHART + """
      {% if card.nearest %}<h4>Nearest the centre</h4>{{ examples(card.nearest, 'nearest') }}{% endif %}
      {% if card.opponents %}<h4>Top opponents <span class="muted">(most harmful training examples: index &middot; label, influence)</span></h4>
      {{ examples(card.opponents, 'opponents') }}{% endif %}
    </article>
  {%- endfor %}
  </div>
  {%- endfor %}
</section>
{% endfor %}
<p class="muted">Generated by <code>python -m harness report</code> from {{ source_files|join(', ') }}.</p>
</main>
</body></html>
"""
)

_INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Slice reports</title><style>{{ css }}</style></head>
<body data-report="index">
<header><h1>Slice reports</h1><p class="muted">{{ root }}</p></header>
<main>
{% if table1 %}<section class="table1-section"><h2>Table 1</h2>{{ table1 }}</section>{% endif %}
<h2>Experiments</h2>
<table class="kv experiments">{% for exp, href in experiments %}
<tr><td><a href="{{ href }}">{{ exp.title }}</a></td>
<td>{% for table in exp.tables %}{{ table.title }}: {{ table.cards|length }} slices{% if not loop.last %}; {% endif %}
{% endfor %}</td></tr>{% endfor %}</table>
</main></body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_ENV.globals.update(pct=_percent, short=_short, max_shown=MAX_SHOWN_EXAMPLES)


def render_report(experiment: Experiment) -> str:
    """The report's HTML text."""
    data_source = experiment.summary["data_source"]
    kind = str(data_source.get("kind", "")).lower() if isinstance(data_source, dict) else ""
    kind_class = "canonical" if kind == "canonical" else ("stand-in" if "stand" in kind else "")
    source_rows = []
    if isinstance(data_source, dict):
        source_rows = [(k, v) for k, v in _config_rows(data_source) if k not in ("kind", "name", "description")]
    return _ENV.from_string(_REPORT).render(
        title=experiment.title,
        description=experiment.summary.get("description"),
        data_source=data_source,
        kind_class=kind_class,
        metrics=experiment.summary.get("metrics") or {},
        config_rows=_config_rows(experiment.summary["config"]),
        extra_rows=_config_rows({k: v for k, v in experiment.summary.items() if k not in SHOWN_SUMMARY_KEYS}),
        source_rows=source_rows,
        table1=Markup(experiment.table1_html) if experiment.table1_html else None,
        tables=experiment.tables,
        group_label=str(experiment.summary.get("group_label") or "Group"),
        source_files=[SUMMARY_FILE, *(t.file for t in experiment.tables)],
        css=Markup(_CSS),
        js=Markup(_JS),
    )


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Renders one slice-report directory to ``out`` (default ``<dir>/report.html``)."""
    experiment = read_experiment(results_dir)
    path = Path(out) if out is not None else experiment.path / REPORT_FILE
    atomic_write_text(render_report(experiment), path)
    return path


def experiment_dirs(results_root: str | os.PathLike) -> list[Path]:
    """The slice-report directories: ``results_root`` itself if it is one, else its sub-directories that are."""
    root = Path(results_root)
    if not root.is_dir():
        raise InputError(f"no results directory at {root}")
    if is_slice_report_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if is_slice_report_dir(p))


def write_reports(results_root: str | os.PathLike, progress: bool = True) -> list[Path]:
    """A report per slice-report directory under ``results_root`` plus ``results_root/index.html``
    linking them (and showing Table 1). Returns the report paths (index last)."""
    root = Path(results_root)
    directories = experiment_dirs(root)
    if not directories:
        raise InputError(
            f"no slice-report directory under {root}: none holds a slice table ({SLICE_TABLE_GLOB}) "
            "and summary.json (see harness.report.html for the contract)"
        )
    if directories == [root]:
        return [write_report(root)]
    experiments, written = [], []
    for directory in tqdm(directories, desc="reports", disable=not progress, leave=False):
        experiment = read_experiment(directory)
        path = directory / REPORT_FILE
        atomic_write_text(render_report(experiment), path)
        experiments.append((experiment, path.relative_to(root).as_posix()))
        written.append(path)
    table1 = table1_html(next((root / n for n in TABLE1_NAMES if (root / n).is_file()), None))
    index = _ENV.from_string(_INDEX).render(
        root=root.name,
        table1=Markup(table1) if table1 else None,
        experiments=experiments,
        css=Markup(_CSS),
    )
    atomic_write_text(index, root / INDEX_FILE)
    return [*written, root / INDEX_FILE]

