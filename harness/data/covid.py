"""The COVID-19 chest X-ray collection (Cohen et al., 2020; paper, appendix H).

Two views of the same folder, which has the layout of a clone of
``ieee8023/covid-chestxray-dataset`` (``metadata.csv`` + ``images/``); by default the
shared copy ``covid-chestxray`` (images downscaled to a 256-pixel short side):

* :func:`load_covid19` — torchxrayvision's canonical ``COVID19_Dataset`` (the disease
  labels of Table 4), restricted to rows whose image file exists: the shared copy lists
  7 images it does not hold, and indexing one of them would fail.
* :func:`age_group_table` — the stand-in for the bone-age task (paper, section 4.4):
  every X-ray with a known age, in 5 age groups of (nearly) equal size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from harness.data.splits import patient_split  # noqa: F401  (re-exported: the X-ray studies split by patient)
from harness.errors import InputError
from harness.paths import dataset_dir

DATASET_NAME = "covid-chestxray"
VIEWS = ("PA", "AP", "AP Supine")
"""Frontal views kept (the data README's loader check: 527 rows, 520 with an image)."""


def covid_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset folder: ``root`` if given, else the shared copy. Clear error when absent."""
    path = dataset_dir(DATASET_NAME) if root is None else Path(root)
    missing = [name for name in ("metadata.csv", "images") if not (path / name).exists()]
    if missing:
        raise InputError(
            f"{path} is not a COVID-19 chest X-ray folder: missing {', '.join(missing)}. Expected the layout of a "
            "clone of https://github.com/ieee8023/covid-chestxray-dataset (metadata.csv and images/)."
        )
    return path


def require_torchxrayvision():
    try:
        import torchxrayvision
    except ImportError as exc:
        raise InputError(
            "the COVID-19 loader needs torchxrayvision: pip install 'torchxrayvision==1.5.7'"
        ) from exc
    return torchxrayvision


def load_covid19(root: str | os.PathLike | None = None, views: Sequence[str] = VIEWS, transform=None):
    """torchxrayvision's ``COVID19_Dataset`` over ``root``, rows without an image file removed.

    Items are dicts ``{"img": (1, H, W) float in [-1024, 1024], "lab": (n_pathologies,), "idx"}``;
    ``.pathologies`` names the label columns and ``.csv`` holds the metadata rows.
    """
    xrv = require_torchxrayvision()
    path = covid_root(root)
    dataset = xrv.datasets.COVID19_Dataset(
        imgpath=str(path / "images"), csvpath=str(path / "metadata.csv"), views=list(views), transform=transform
    )
    present = np.flatnonzero([(path / "images" / name).is_file() for name in dataset.csv["filename"]])
    if present.size == 0:
        raise InputError(f"none of the {len(dataset)} selected metadata rows has an image under {path / 'images'}")
    return xrv.datasets.SubsetDataset(dataset, present)


def age_group_table(root: str | os.PathLike | None = None, n_groups: int = 5) -> tuple[pd.DataFrame, list[str]]:
    """Every X-ray with an image file and a known age, with an age group 0..n_groups-1.

    Groups are age quantiles over the images (equal-sized up to ties), so that one of
    them can play the paper's "mid-puberty" class. Returns the table (columns ``path``,
    ``patientid``, ``age``, ``label``) and the group names (``"12-40"``, ...).
    """
    path = covid_root(root)
    meta = pd.read_csv(path / "metadata.csv")
    meta = meta[(meta["modality"] == "X-ray") & meta["age"].notna()].copy()
    meta["path"] = [str(path / "images" / name) for name in meta["filename"]]
    meta = meta[[Path(p).is_file() for p in meta["path"]]]
    if len(meta) < n_groups:
        raise InputError(f"only {len(meta)} X-rays with a known age under {path}; need at least {n_groups}")
    labels, edges = pd.qcut(meta["age"], n_groups, labels=False, retbins=True)
    # Ages are whole years: group g holds ages in (edges[g], edges[g+1]], the first one from its minimum.
    lows = [int(np.floor(edges[0]))] + [int(np.floor(e)) + 1 for e in edges[1:-1]]
    highs = [int(np.floor(e)) for e in edges[1:]]
    names = [f"{lo}-{hi}" for lo, hi in zip(lows, highs)]
    table = pd.DataFrame(
        {
            "path": meta["path"].to_numpy(),
            "patientid": meta["patientid"].astype(str).to_numpy(),
            "age": meta["age"].to_numpy(dtype=float),
            "label": labels.to_numpy(dtype=np.int64),
        }
    )
    return table, names


def load_grayscale(paths: Sequence[str], size: int, progress: bool = True) -> torch.Tensor:
    """Images as a (N, 1, size, size) float tensor in [0, 1]: centre-cropped to a square, then resized."""
    if size < 8:
        raise InputError(f"image size must be >= 8 pixels; got {size}")
    out = torch.empty(len(paths), 1, size, size)
    for i, path in enumerate(tqdm(paths, desc="load images", disable=not progress, leave=False)):
        try:
            with Image.open(path) as image:
                square = ImageOps.fit(image.convert("L"), (size, size), method=Image.Resampling.BILINEAR)
        except OSError as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
        out[i, 0] = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
    return out

