"""The shared AG News test split (7,600 news texts, 4 classes).

``../shared/data/agnews/test.csv`` has no header; columns are label (1-4), title and
description. ``classes.txt`` names the labels (World, Sports, Business, Sci/Tech).
The text of an example is ``"<title>. <description>"``, the description's literal
``\\`` line breaks replaced by spaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.data.splits import stratified_split  # noqa: F401  (re-exported: the AG News parts)
from harness.errors import InputError
from harness.paths import dataset_dir

AGNEWS = "agnews"


@dataclass(frozen=True)
class TextSet:
    """Texts, integer labels (0-based) and class names."""

    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> "TextSet":
        indices = np.asarray(indices, dtype=np.int64)
        return TextSet(tuple(self.texts[i] for i in indices), self.labels[indices], self.class_names, self.source)


def load_agnews(root: str | os.PathLike | None = None) -> TextSet:
    """The AG News test CSV as a :class:`TextSet` (labels 0-3 in ``classes.txt`` order)."""
    root = Path(root) if root is not None else dataset_dir(AGNEWS)
    csv, classes = root / "test.csv", root / "classes.txt"
    for path in (csv, classes):
        if not path.is_file():
            raise InputError(f"{path} is missing: {root} is not the AG News folder (see ../shared/data/README.md)")
    class_names = tuple(line.strip() for line in classes.read_text().splitlines() if line.strip())
    frame = pd.read_csv(csv, header=None, names=["label", "title", "description"], dtype={"label": "Int64"},
                        keep_default_na=False)
    if frame.empty:
        raise InputError(f"{csv} has no rows")
    labels = frame["label"].to_numpy(dtype=np.int64) - 1
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise InputError(f"{csv} has labels outside 1..{len(class_names)}")
    texts = (frame["title"].str.strip() + ". " + frame["description"].str.replace("\\", " ", regex=False).str.strip())
    return TextSet(tuple(texts), labels, class_names, str(csv))

