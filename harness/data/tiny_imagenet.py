"""Image folders: the shared Tiny-ImageNet 30-class subset and any ImageNet-style folder.

``tiny_imagenet(split)`` reads ``../shared/data/tiny-imagenet-subset/<split>/<wnid>/*.JPEG``
(64 x 64 JPEGs; class index = position of the wnid in the sorted ``wnids.txt``, as
torchvision's ImageFolder orders them). ``image_folder`` reads any ImageFolder layout,
e.g. an ImageNet validation folder for the canonical path. Images are decoded lazily
and converted to RGB (143 Tiny-ImageNet images are greyscale).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from harness.data.splits import per_class_subset
from harness.errors import InputError
from harness.paths import dataset_dir

TINY_IMAGENET = "tiny-imagenet-subset"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderSet(Dataset):
    """(normalised image tensor, class index) pairs from a list of (path, class) samples.

    ``thumbnail(i)`` gives the image as the model sees it before normalisation
    (H, W, 3 uint8), for figures.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], class_names: Sequence[str], geometry: transforms.Compose,
                 augment: transforms.Compose | None = None, source: str = ""):
        if len(samples) == 0:
            raise InputError(f"no images selected from {source or 'the folder'}")
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.geometry = geometry
        self.augment = augment
        self.normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        self.source = source

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return self.geometry(image.convert("RGB"))
        except OSError as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._image(index)
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image), self.samples[index][1]

    def thumbnail(self, index: int) -> np.ndarray:
        return np.asarray(self._image(index), dtype=np.uint8)

    def without_augmentation(self) -> "ImageFolderSet":
        return ImageFolderSet(self.samples, self.class_names, self.geometry, None, self.source)


def balanced_subset(samples: Sequence[tuple[str, int]], per_class: int | None, seed: int) -> list[tuple[str, int]]:
    """At most ``per_class`` samples of every class, drawn with ``seed``, in folder order."""
    return [samples[i] for i in per_class_subset([label for _, label in samples], per_class, seed)]


def tiny_imagenet_class_names(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(wnids in class-index order, first English name of each) from wnids.txt and words.txt."""
    root = Path(root) if root is not None else dataset_dir(TINY_IMAGENET)
    for name in ("wnids.txt", "words.txt"):
        if not (root / name).is_file():
            raise InputError(f"{root / name} is missing: {root} is not the Tiny-ImageNet subset folder")
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    words = {}
    for line in (root / "words.txt").read_text().splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.split(",")[0].strip()
    missing = [w for w in wnids if w not in words]
    if missing:
        raise InputError(f"words.txt in {root} has no name for {missing}")
    return wnids, [words[w] for w in wnids]


def tiny_imagenet(split: str, per_class: int | None = None, seed: int = 0, augment: bool = False,
                  root: str | os.PathLike | None = None) -> ImageFolderSet:
    """The ``train`` (500 per class) or ``val`` (50 per class) split of the 30-class subset.

    ``per_class`` keeps a seeded, class-balanced subset; ``augment`` adds, for training,
    a random 64 px crop of the image padded by 8 px (reflected) and a random horizontal flip.
    """
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val'; got {split!r}")
    root = Path(root) if root is not None else dataset_dir(TINY_IMAGENET)
    wnids, names = tiny_imagenet_class_names(root)
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"{folder} is missing: {root} is not the Tiny-ImageNet subset folder")
    classes, class_to_idx = find_classes(str(folder))
    if classes != wnids:
        raise InputError(f"the class folders of {folder} differ from wnids.txt")
    samples = balanced_subset(make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS), per_class, seed)
    augmentation = transforms.Compose([transforms.RandomCrop(64, padding=8, padding_mode="reflect"),
                                       transforms.RandomHorizontalFlip()]) if augment else None
    return ImageFolderSet(samples, names, transforms.Compose([]), augmentation, source=str(folder))


def image_folder(path: str | os.PathLike, class_names: Sequence[str] | None = None, per_class: int | None = None,
                 seed: int = 0, resize: int = 256, crop: int = 224) -> ImageFolderSet:
    """An ImageFolder-layout folder (e.g. the ImageNet validation set sorted into wnid
    folders), resized and centre-cropped as torchvision's ImageNet weights expect.

    ``class_names`` (e.g. the weights' 1000 categories) must have one name per class
    folder, in sorted folder order.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} not found")
    classes, class_to_idx = find_classes(str(folder))
    if class_names is not None and len(class_names) != len(classes):
        raise InputError(
            f"{folder} has {len(classes)} class folders but {len(class_names)} class names were given "
            "(the ImageNet weights expect all 1000 wnid folders)"
        )
    samples = balanced_subset(make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS), per_class, seed)
    geometry = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])
    return ImageFolderSet(samples, class_names or classes, geometry, None, source=str(folder))


def tiny_imagenet_arrays(size: int = 32, root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every image of both splits of the subset, RGB, resized to size x size: a dict with
    ``images`` (N, size, size, 3) uint8, ``labels`` (N,) class index, ``split`` (N,)
    0 = train / 1 = val, and ``class_names`` (30,)."""
    if size < 8:
        raise InputError(f"image size must be >= 8 pixels; got {size}")
    images, labels, splits = [], [], []
    names = None
    for number, split in enumerate(("train", "val")):
        folder = tiny_imagenet(split, root=root)
        names = folder.class_names
        for path, label in folder.samples:
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
            except OSError as exc:
                raise InputError(f"cannot read image {path}: {exc}") from exc
            labels.append(label)
            splits.append(number)
    return {"images": np.stack(images).astype(np.uint8), "labels": np.asarray(labels, dtype=np.int64),
            "split": np.asarray(splits, dtype=np.int64), "class_names": np.asarray(names)}
