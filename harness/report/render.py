"""Slice reports as static, self-contained HTML pages, from result directories.

A report is one HTML file with inline CSS, inline JavaScript and images embedded as
base64 data URIs: it opens from disk in any browser, needs no server and makes no
network request, and can be mailed or archived as a single file.

:func:`read_experiment` reads one directory through :mod:`harness.report.contract` into a
view model (:class:`Experiment` > :class:`SliceTable` > :class:`SliceCard` >
:class:`Example`), checking every value it shows; :func:`render_report` fills the Jinja
templates with it. The templates, the stylesheet and the script are package data in
``harness/report/templates/`` (``report.html.j2``, ``index.html.j2``, ``macros.html.j2``,
``report.css``, ``report.js``). :func:`write_report` renders one directory,
:func:`write_reports` every directory under a results folder plus an ``index.html``
linking them.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape
import pandas as pd
from tqdm.auto import tqdm

from harness.errors import InputError
from harness.io import atomic_write_text
from harness.report.contract import (
    IMAGE_TYPES,
    SLICE_TABLE_GLOB,
    SUMMARY_FILE,
    SUMMARY_KEYS,
    TABLE1_NAMES,
    experiment_dirs,
    find_table1,
    is_slice_report_dir,
    read_slice_table,
    read_summary,
    slice_table_entries,
)

REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
TEMPLATES = "templates"  # the folder of harness.report holding the templates, the stylesheet and the script
# Beyond this many classes a bar chart stops being readable; the rest is one "other" bar.
MAX_CHART_CLASSES = 8
# A card lists at most this many nearest examples / opponents; the rest are counted.
MAX_SHOWN_EXAMPLES = 12


# ---------------------------------------------------------------- the view model
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


# ---------------------------------------------------------------- reading a directory into the view model
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
            f"{directory} holds no slice table ({SLICE_TABLE_GLOB}); see harness.report.contract for the contract"
        )
    summary = read_summary(directory)
    images = _Images(directory)
    tables = []
    for file_name, title in slice_table_entries(directory, summary):
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


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("harness.report", TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)
_ENV.globals.update(pct=_percent, max_shown=MAX_SHOWN_EXAMPLES)


@functools.cache
def _asset(name: str) -> Markup:
    """A stylesheet or script of the templates folder, inlined verbatim into the pages."""
    return Markup(importlib.resources.files("harness.report").joinpath(TEMPLATES, name).read_text(encoding="utf-8"))


def render_report(experiment: Experiment) -> str:
    """The report's HTML text."""
    data_source = experiment.summary["data_source"]
    kind = str(data_source.get("kind", "")).lower() if isinstance(data_source, dict) else ""
    kind_class = "canonical" if kind == "canonical" else ("stand-in" if "stand" in kind else "")
    source_rows = []
    if isinstance(data_source, dict):
        source_rows = [(k, v) for k, v in _config_rows(data_source) if k not in ("kind", "name", "description")]
    return _ENV.get_template("report.html.j2").render(
        title=experiment.title,
        description=experiment.summary.get("description"),
        data_source=data_source,
        kind_class=kind_class,
        metrics=experiment.summary.get("metrics") or {},
        config_rows=_config_rows(experiment.summary["config"]),
        extra_rows=_config_rows({k: v for k, v in experiment.summary.items() if k not in SUMMARY_KEYS}),
        source_rows=source_rows,
        table1=Markup(experiment.table1_html) if experiment.table1_html else None,
        tables=experiment.tables,
        group_label=str(experiment.summary.get("group_label") or "Group"),
        source_files=[SUMMARY_FILE, *(t.file for t in experiment.tables)],
        css=_asset("report.css"),
        js=_asset("report.js"),
    )


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Renders one slice-report directory to ``out`` (default ``<dir>/report.html``)."""
    experiment = read_experiment(results_dir)
    path = Path(out) if out is not None else experiment.path / REPORT_FILE
    atomic_write_text(render_report(experiment), path)
    return path


def write_reports(results_root: str | os.PathLike, progress: bool = True) -> list[Path]:
    """A report per slice-report directory under ``results_root`` plus ``results_root/index.html``
    linking them (and showing Table 1). Returns the report paths (index last)."""
    root = Path(results_root)
    directories = experiment_dirs(root)
    if not directories:
        raise InputError(
            f"no slice-report directory under {root}: none holds a slice table ({SLICE_TABLE_GLOB}) "
            "and summary.json (see harness.report.contract for the contract)"
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
    index = _ENV.get_template("index.html.j2").render(
        root=root.name,
        table1=Markup(table1) if table1 else None,
        experiments=experiments,
        css=_asset("report.css"),
    )
    atomic_write_text(index, root / INDEX_FILE)
    return [*written, root / INDEX_FILE]
