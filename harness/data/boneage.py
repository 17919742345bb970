"""RSNA Pediatric Bone Age (Halabi et al., 2019) in its public layout (paper, appendix G).

The Kaggle release (kmader/rsna-bone-age) ships a CSV with the columns ``id``,
``boneage`` (months) and ``male`` (True/False), and a folder of hand radiographs named
``<id>.png``. :func:`load_boneage` reads such a pair into tensors with one of the paper's
5 age groups per image.

**Age groups.** The paper names the 5 classes (Infancy/Toddler, Pre-Puberty, Early/Mid
Puberty, Late Puberty, Post Puberty) but not their boundaries. We use the sex-specific
skeletal-maturity stages of Gilsanz & Ratib's hand bone-age atlas (infancy and toddler
merged): girls < 2 y, 2-7 y, 7-13 y, 13-15 y, >= 15 y; boys < 3 y, 3-9 y, 9-14 y,
14-16 y, >= 16 y (each group includes its lower bound).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.data.covid import load_grayscale
from harness.errors import InputError

AGE_GROUPS = ("infancy/toddler", "pre-puberty", "early/mid-puberty", "late puberty", "post-puberty")
MID_PUBERTY = AGE_GROUPS.index("early/mid-puberty")
# Lower bounds (months) of groups 1..4, per sex.
GROUP_STARTS_MONTHS = {"female": (24, 84, 156, 180), "male": (36, 108, 168, 192)}
REQUIRED_COLUMNS = ("id", "boneage", "male")


def age_group(boneage_months: np.ndarray, male: np.ndarray) -> np.ndarray:
    """The age group (0..4, see :data:`AGE_GROUPS`) of each bone age in months."""
    months = np.asarray(boneage_months, dtype=float)
    male = np.asarray(male, dtype=bool)
    if months.shape != male.shape:
        raise InputError(f"boneage and male differ in shape: {months.shape} vs {male.shape}")
    if np.isnan(months).any() or (months < 0).any():
        raise InputError("bone ages must be non-negative numbers of months")
    female_group = np.searchsorted(GROUP_STARTS_MONTHS["female"], months, side="right")
    male_group = np.searchsorted(GROUP_STARTS_MONTHS["male"], months, side="right")
    return np.where(male, male_group, female_group).astype(np.int64)


def _parse_male(column: pd.Series, csv_path: Path) -> np.ndarray:
    text = column.astype(str).str.strip().str.lower()
    mapping = {"true": True, "false": False, "1": True, "0": False}
    unknown = sorted(set(text) - set(mapping))
    if unknown:
        raise InputError(f"{csv_path}: column 'male' must be True/False; found {unknown[:5]}")
    return text.map(mapping).to_numpy(dtype=bool)


def read_boneage_table(csv_path: str | os.PathLike, image_dir: str | os.PathLike) -> pd.DataFrame:
    """The CSV with an image ``path`` and age-group ``label`` per row; clear errors for a wrong layout."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise InputError(
            f"no bone-age CSV at {csv_path}. Expected the RSNA layout (kaggle.com/datasets/kmader/rsna-bone-age): "
            "a CSV with columns id, boneage, male and a folder of <id>.png images."
        )
    if not image_dir.is_dir():
        raise InputError(f"no bone-age image folder at {image_dir}")
    table = pd.read_csv(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{csv_path} lacks column(s) {missing}; the RSNA layout has {list(REQUIRED_COLUMNS)}")
    if table.empty:
        raise InputError(f"{csv_path} has no rows")
    paths = [image_dir / f"{image_id}.png" for image_id in table["id"]]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise InputError(f"{len(absent)} image(s) listed in {csv_path} are missing from {image_dir}, e.g. {absent[:3]}")
    male = _parse_male(table["male"], csv_path)
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "boneage": table["boneage"].to_numpy(dtype=float),
            "male": male,
            "label": age_group(table["boneage"].to_numpy(dtype=float), male),
        }
    )


def load_boneage(
    csv_path: str | os.PathLike, image_dir: str | os.PathLike, size: int, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) in [0, 1] (centre square, resized) and age-group labels (N,)."""
    table = read_boneage_table(csv_path, image_dir)
    images = load_grayscale(table["path"].tolist(), size, progress=progress)
    return images, torch.tensor(table["label"].to_numpy())
