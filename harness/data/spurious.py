"""Spurious signals injected into X-ray images (paper, section 4.4 and Figure 4).

Following the protocol the paper cites (Adebayo et al., 2021; Zhou et al., 2022), one
of three signals is added to every *training* image of one class: a hospital **tag**
(a bright box with text in a corner), a **stripe** (a bright vertical band over the whole
height) or a **blur** (Gaussian blur). The test set is left untouched.

Every injection is a deterministic callable on one image tensor ``(C, H, W)`` with
values in [0, 1]; positions and sizes are fractions of the image size, so the same
parameters give the same-looking signal at any resolution. No injection draws random
numbers: the same image always gets the same signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from harness.errors import InputError


def _check_image(image: torch.Tensor) -> None:
    if not torch.is_tensor(image) or image.dim() != 3 or not image.dtype.is_floating_point:
        raise InputError(
            f"injections take one float image tensor (C, H, W); got "
            f"{type(image).__name__} {tuple(image.shape) if torch.is_tensor(image) else ''}"
        )
    if image.numel() and (float(image.min()) < 0.0 or float(image.max()) > 1.0):
        raise InputError("injections expect pixel values in [0, 1]; rescale the image first")


def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value <= high:
        raise InputError(f"{name} must be in [{low}, {high}]; got {value}")


def _box(height: int, width: int, top: float, left: float, box_height: float, box_width: float) -> tuple[slice, slice]:
    """Pixel rows/columns of a box given in fractions of the image size (at least 1 pixel)."""
    row0, col0 = int(round(top * height)), int(round(left * width))
    rows = max(1, int(round(box_height * height)))
    cols = max(1, int(round(box_width * width)))
    return slice(row0, min(height, row0 + rows)), slice(col0, min(width, col0 + cols))


@dataclass(frozen=True)
class Tag:
    """A hospital tag: a filled box of intensity ``value`` with ``text`` drawn in
    ``text_value`` inside it (like the burnt-in labels of scanned radiographs).

    ``top``, ``left``, ``height``, ``width`` place the box as fractions of the image size
    (default: the top-left corner, 14% high, 34% wide). The text uses Pillow's built-in
    font scaled to 70% of the box height; at low resolution it blurs into a pattern,
    which still marks the image.
    """

    text: str = "HOSP"
    top: float = 0.04
    left: float = 0.04
    height: float = 0.14
    width: float = 0.34
    value: float = 1.0
    text_value: float = 0.0

    def __post_init__(self):
        for name in ("top", "left", "height", "width", "value", "text_value"):
            _check_fraction(name, getattr(self, name))
        if self.height == 0 or self.width == 0:
            raise InputError("Tag height and width must be > 0")

    def masks(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (H, W) masks of the whole box and of the text pixels inside it."""
        rows, cols = _box(height, width, self.top, self.left, self.height, self.width)
        box = torch.zeros(height, width, dtype=torch.bool)
        box[rows, cols] = True
        box_h, box_w = rows.stop - rows.start, cols.stop - cols.start
        canvas = Image.new("L", (box_w, box_h), 0)
        font = ImageFont.load_default(size=max(1, int(0.7 * box_h)))
        ImageDraw.Draw(canvas).text((box_w / 2, box_h / 2), self.text, fill=255, font=font, anchor="mm")
        text = torch.zeros(height, width, dtype=torch.bool)
        text[rows, cols] = torch.from_numpy(np.asarray(canvas) > 127)
        return box, text

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image)
        box, text = self.masks(image.shape[-2], image.shape[-1])
        out = image.clone()
        out[:, box] = self.value
        out[:, text] = self.text_value
        return out


@dataclass(frozen=True)
class Stripe:
    """A vertical band of intensity ``value`` over the full image height, ``width`` wide,
    its left edge at ``left`` (fractions of the image width; default: 4% wide at 80%)."""

    left: float = 0.80
    width: float = 0.04
    value: float = 1.0

    def __post_init__(self):
        for name in ("left", "width", "value"):
            _check_fraction(name, getattr(self, name))
        if self.width == 0:
            raise InputError("Stripe width must be > 0")

    def mask(self, height: int, width: int) -> torch.Tensor:
        rows, cols = _box(height, width, 0.0, self.left, 1.0, self.width)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[rows, cols] = True
        return mask

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image)
        out = image.clone()
        out[:, self.mask(image.shape[-2], image.shape[-1])] = self.value
        return out


@dataclass(frozen=True)
class Blur:
    """Gaussian blur with standard deviation ``sigma`` (a fraction of the image width;
    default 3%, i.e. about 2 pixels at 64 x 64). The kernel spans +-3 sigma. With
    ``region`` = (top, left, height, width) fractions only that box is blurred;
    ``None`` blurs the whole image (the default)."""

    sigma: float = 0.03
    region: tuple[float, float, float, float] | None = None

    def __post_init__(self):
        if not 0.0 < self.sigma <= 0.5:
            raise InputError(f"Blur sigma must be in (0, 0.5] (a fraction of the width); got {self.sigma}")
        if self.region is not None:
            if len(self.region) != 4:
                raise InputError(f"Blur region must be (top, left, height, width); got {self.region}")
            for value in self.region:
                _check_fraction("Blur region", value)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image)
        sigma_px = self.sigma * image.shape[-1]
        radius = max(1, math.ceil(3 * sigma_px))
        kernel = min(2 * radius + 1, 2 * (min(image.shape[-2:]) // 2) - 1)
        blurred = TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma_px, sigma_px])
        if self.region is None:
            return blurred
        rows, cols = _box(image.shape[-2], image.shape[-1], *self.region)
        out = image.clone()
        out[:, rows, cols] = blurred[:, rows, cols]
        return out


INJECTIONS = {"tag": Tag(), "stripe": Stripe(), "blur": Blur()}
"""The three signals with the parameters every experiment here uses."""


def injection(name: str):
    """The named default injection (``tag``, ``stripe`` or ``blur``)."""
    if name not in INJECTIONS:
        raise InputError(f"unknown signal {name!r}; choose one of {sorted(INJECTIONS)}")
    return INJECTIONS[name]


def inject_class(images: torch.Tensor, labels: torch.Tensor, target_class: int, signal) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W) with ``signal`` applied to every image of ``target_class``."""
    if images.dim() != 4 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise InputError(
            f"inject_class needs images (N, C, H, W) and labels (N,); got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    chosen = torch.nonzero(labels == target_class).flatten()
    if chosen.numel() == 0:
        raise InputError(f"no image has label {target_class}: nothing to inject into")
    out = images.clone()
    for i in chosen.tolist():
        out[i] = signal(images[i])
    return out


def figure_injections(image: torch.Tensor, title: str = "Injected signals (paper, Figure 4)") -> Figure:
    """A Figure-4-style panel: ``image`` as is and with each of the three signals."""
    panels = [("original", image)] + [(name, signal(image)) for name, signal in INJECTIONS.items()]
    figure = Figure(figsize=(2.6 * len(panels), 2.9), facecolor="0.8")  # a white stripe stays visible at the edge
    for ax, (name, shown) in zip(figure.subplots(1, len(panels)), panels):
        if shown.shape[0] == 3:  # photos in colour, X-rays in grey
            ax.imshow(shown.permute(1, 2, 0).numpy(), vmin=0, vmax=1)
        else:
            ax.imshow(shown.mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
