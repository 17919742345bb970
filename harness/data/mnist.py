"""The shared MNIST test set (10,000 digits) and stroke attributes measured from its pixels.

``load_mnist`` reads the IDX files of ``../shared/data/mnist`` (see its README for the
md5s). ``stroke_attributes`` measures two real per-image properties that are not a
function of the digit class: ink (stroke thickness) and slant. They serve as spurious
attributes in the mini-dcbench correlation problems.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.errors import InputError
from harness.paths import dataset_dir

MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
# IDX headers: magic number, then one big-endian uint32 per dimension.
_IDX_MAGIC = {3: 2051, 1: 2049}
_MNIST_SIZE, _MNIST_BOX = 28, 20  # MNIST digits fill a 20x20 box centred in 28x28


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W) uint8 (or (N, C, H, W)), integer labels (N,), class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str


def _read_idx(path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != _IDX_MAGIC[ndim]:
        raise InputError(f"{path} is not an IDX file with {ndim} dimensions (magic {int(header[0])})")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_mnist() -> ImageSet:
    """The MNIST test set from the shared data folder: 10,000 28x28 uint8 images."""
    folder = dataset_dir("mnist")
    images = _read_idx(folder / MNIST_IMAGES, 3)
    labels = _read_idx(folder / MNIST_LABELS, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"MNIST images ({images.shape[0]}) and labels ({labels.shape[0]}) disagree in number")
    return ImageSet(images, labels, tuple(str(d) for d in range(10)), "MNIST test set (shared data)")


def load_sklearn_digits() -> ImageSet:
    """Fallback when the shared data is absent: scikit-learn's 1,797 8x8 digits (shipped with
    the package), brought to MNIST's geometry so MNIST's models take them unchanged: each
    digit is upsampled bilinearly to MNIST's 20x20 digit box and padded by 4 blank pixels to
    28x28 (MNIST centres its 20x20 digits in a 28x28 frame)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    boxed = np.stack([np.asarray(Image.fromarray(d).resize((_MNIST_BOX, _MNIST_BOX), Image.BILINEAR)) for d in small])
    pad = (_MNIST_SIZE - _MNIST_BOX) // 2
    images = np.pad(boxed, ((0, 0), (pad, pad), (pad, pad)))
    return ImageSet(images, digits.target.astype(np.int64), tuple(str(d) for d in range(10)),
                    "scikit-learn digits 8x8, upsampled to MNIST's 28x28 (fallback: no MNIST in the data folder)")


def stroke_attributes(images: np.ndarray) -> pd.DataFrame:
    """Per-image ``ink`` (mean intensity, a stroke-thickness proxy) and ``slant`` (shear
    mu11 / mu02 of the intensity moments: > 0 leans right)."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise InputError(f"images must have shape (N, H, W); got {images.shape}")
    mass = images.sum(axis=(1, 2))
    if (mass <= 0).any():
        raise InputError("an image is blank: stroke attributes need some ink")
    rows, cols = np.indices(images.shape[1:], dtype=np.float64)
    mean_row = (images * rows).sum(axis=(1, 2)) / mass
    mean_col = (images * cols).sum(axis=(1, 2)) / mass
    d_row = rows[None] - mean_row[:, None, None]
    d_col = cols[None] - mean_col[:, None, None]
    mu11 = (images * d_row * d_col).sum(axis=(1, 2)) / mass
    mu02 = (images * d_row**2).sum(axis=(1, 2)) / mass
    # Rows grow downwards, so a right-leaning stroke has negative row-column covariance.
    return pd.DataFrame({"ink": images.mean(axis=(1, 2)) / 255.0, "slant": -mu11 / mu02})
