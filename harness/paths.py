"""Where data and generated heavy files live.

``INFEMBED_DATA`` overrides the shared data folder (default: ``../shared/data`` next to
the repository); ``INFEMBED_CACHE`` overrides the git-ignored cache (default: ``.cache``
in the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("INFEMBED_DATA", REPO_ROOT.parent / "shared" / "data"))


def dataset_dir(name: str) -> Path:
    """The folder of one shared dataset; a clear error when it is absent."""
    path = data_dir() / name
    if not path.is_dir():
        raise InputError(
            f"dataset {name!r} not found at {path}. Set INFEMBED_DATA to the folder holding the shared data "
            "(see ../shared/data/README.md for sources and md5s)."
        )
    return path


def has_dataset(name: str) -> bool:
    return (data_dir() / name).is_dir()


def cache_dir(*parts: str) -> Path:
    path = Path(os.environ.get("INFEMBED_CACHE", REPO_ROOT / ".cache")).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
