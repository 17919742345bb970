"""UCR/UEA time series from ``../shared/data/timeseries`` (sktime ``.ts`` files).

``read_ts`` parses one file; ``pooled_ecg`` pools the single-lead ECG problems into one
collection of heartbeats resampled to a common length, with the fine class
``"<dataset>:<class>"`` and the recording source (the dataset) of every series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample

from harness.errors import InputError
from harness.paths import dataset_dir

# Single-lead ECG problems of the shared folder and the splits it holds.
ECG_DATASETS = {
    "ECG200": ("TRAIN", "TEST"),
    "ECG5000": ("TRAIN",),
    "ECGFiveDays": ("TRAIN", "TEST"),
    "TwoLeadECG": ("TRAIN", "TEST"),
}


@dataclass(frozen=True)
class SeriesSet:
    """Series (N, channels, length) float32, string class labels (N,), source per series (N,)."""

    series: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    description: str


def read_ts(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``.ts`` file -> (series (N, channels, length) float32, labels (N,) str)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no .ts file at {path}")
    series, labels, in_data = [], [], False
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower() == "@data"
                continue
            *channels, label = line.split(":")
            try:
                series.append([np.array(c.split(","), dtype=np.float32) for c in channels])
            except ValueError as exc:
                raise InputError(f"{path}:{number}: not a comma-separated series ({exc})") from exc
            labels.append(label)
    if not series:
        raise InputError(f"{path} holds no series after @data")
    lengths = {len(c) for s in series for c in s}
    if len(lengths) != 1:
        raise InputError(f"{path}: series of unequal lengths {sorted(lengths)[:5]} are not supported")
    return np.asarray(series, dtype=np.float32), np.asarray(labels)


def load_ucr(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``load_ucr("ECG200", "TRAIN")`` -> (series, labels) of the shared folder."""
    return read_ts(dataset_dir("timeseries") / name / f"{name}_{split}.ts")


def pooled_ecg(length: int = 96) -> SeriesSet:
    """Every single-lead ECG series of the shared folder, each resampled (FFT) to ``length``
    and z-normalised, labelled ``"<dataset>:<class>"``, with its dataset as source."""
    if length < 8:
        raise InputError(f"length must be >= 8; got {length}")
    series, labels, sources = [], [], []
    for name, splits in ECG_DATASETS.items():
        for split in splits:
            x, y = load_ucr(name, split)
            x = resample(x, length, axis=-1)
            x = (x - x.mean(axis=-1, keepdims=True)) / (x.std(axis=-1, keepdims=True) + 1e-8)
            series.append(x.astype(np.float32))
            labels.extend(f"{name}:{label}" for label in y)
            sources.extend([name] * len(y))
    return SeriesSet(np.concatenate(series), np.asarray(labels), np.asarray(sources),
                     f"pooled single-lead ECG ({', '.join(ECG_DATASETS)}), resampled to {length}")
