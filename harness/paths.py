"""Where data and generated heavy files live.

The data folder is ``INFEMBED_DATA`` if set, else ``../shared/data`` next to the repository
if it exists, else the git-ignored ``data/`` in the repository (where ``make data`` puts the
datasets on a fresh clone). ``INFEMBED_DOWNLOAD=1`` lets :func:`dataset_dir` download a
missing dataset from its public source on first use (:mod:`harness.data.download`).
``INFEMBED_CACHE`` overrides the git-ignored cache (default: ``.cache`` in the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def data_dir() -> Path:
    if "INFEMBED_DATA" in os.environ:
        return Path(os.environ["INFEMBED_DATA"])
    return SHARED_DATA if SHARED_DATA.is_dir() else REPO_ROOT / "data"


def download_on_first_use() -> bool:
    return os.environ.get("INFEMBED_DOWNLOAD", "").strip().lower() in ("1", "true", "yes")


def dataset_dir(name: str) -> Path:
    """The folder of one dataset; downloaded first when absent and ``INFEMBED_DOWNLOAD=1``,
    else a clear error saying how to get it."""
    path = data_dir() / name
    if path.is_dir():
        return path
    if download_on_first_use():
        from harness.data.download import fetch_named

        return fetch_named(name)
    raise InputError(
        f"dataset {name!r} not found at {path}. Fetch it with `make data` (or `python -m harness.data.download "
        f"{name}`, or INFEMBED_DOWNLOAD=1 to fetch on first use), or set INFEMBED_DATA to the folder holding it "
        "(README.md, section Data)."
    )


def has_dataset(name: str) -> bool:
    """Whether the dataset folder is present (never downloads: tests use it to skip)."""
    return (data_dir() / name).is_dir()


def dataset_available(name: str) -> bool:
    """Present, or fetched now because ``INFEMBED_DOWNLOAD=1`` (a failed fetch raises InputError)."""
    return has_dataset(name) or (download_on_first_use() and dataset_dir(name).is_dir())


def cache_dir(*parts: str) -> Path:
    path = Path(os.environ.get("INFEMBED_CACHE", REPO_ROOT / ".cache")).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
