"""The three spurious-signal injections: deterministic, visible, and only where intended."""

from __future__ import annotations

import pytest
import torch

from harness.data.spurious import INJECTIONS, Blur, Stripe, Tag, figure_injections, inject_class, injection
from harness.errors import InputError


def textured(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth gradient plus pixel noise in [0.1, 0.7]: has both low and high frequencies."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.5, size).expand(size, size)
    return (ramp + 0.2 * torch.rand(size, size, generator=generator)).unsqueeze(0)


def high_frequency_energy(image: torch.Tensor) -> float:
    return float(image.diff(dim=-1).abs().mean() + image.diff(dim=-2).abs().mean())


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_injections_are_deterministic_and_leave_the_input_alone(name):
    image = textured()
    before = image.clone()
    first, second = injection(name)(image), injection(name)(image.clone())
    assert torch.equal(first, second)
    assert torch.equal(image, before)
    assert not torch.equal(first, image)
    assert first.shape == image.shape and first.dtype == image.dtype


@pytest.mark.parametrize("size", [32, 64, 97])
def test_stripe_changes_exactly_its_band(size):
    stripe = Stripe(left=0.8, width=0.05, value=1.0)
    image = textured(size)
    out = stripe(image)
    band = stripe.mask(size, size)
    assert band.any(1).all()  # spans the full height
    columns = band.any(0).nonzero().flatten()
    assert columns.min() == round(0.8 * size)
    assert torch.all(out[:, band] == 1.0)
    assert torch.equal(out[:, ~band], image[:, ~band])


def test_tag_is_a_bright_box_with_dark_text_in_the_corner_only():
    tag = Tag()
    image = textured(96)
    out = tag(image)
    box, text = tag.masks(96, 96)
    assert text.any() and (text & ~box).sum() == 0  # text lies inside the box
    assert 0 < text.sum() < box.sum()
    assert torch.all(out[:, box & ~text] == tag.value)
    assert torch.all(out[:, text] == tag.text_value)
    assert torch.equal(out[:, ~box], image[:, ~box])
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert rows.max() < 96 // 2 and cols.max() < 96 // 2  # top-left quadrant


def test_blur_removes_high_frequencies_and_keeps_brightness():
    image = textured()
    out = Blur(sigma=0.03)(image)
    assert high_frequency_energy(out) < 0.5 * high_frequency_energy(image)
    interior = (slice(None), slice(8, -8), slice(8, -8))
    assert abs(float(out[interior].mean() - image[interior].mean())) < 0.01


def test_blur_region_changes_only_the_region():
    image = textured()
    out = Blur(sigma=0.03, region=(0.5, 0.0, 0.5, 1.0))(image)
    assert torch.equal(out[:, :32], image[:, :32])
    assert high_frequency_energy(out[:, 32:]) < 0.5 * high_frequency_energy(image[:, 32:])


def test_inject_class_touches_only_the_target_class():
    images = torch.stack([textured(32, seed) for seed in range(6)])
    labels = torch.tensor([0, 2, 1, 2, 0, 2])
    out = inject_class(images, labels, 2, Stripe())
    for i, label in enumerate(labels.tolist()):
        assert torch.equal(out[i], Stripe()(images[i])) if label == 2 else torch.equal(out[i], images[i])


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        Stripe()(textured() * 3)
    with pytest.raises(InputError, match="C, H, W"):
        Tag()(torch.rand(8, 8))
    with pytest.raises(InputError, match="unknown signal"):
        injection("sparkle")
    with pytest.raises(InputError, match="width"):
        Stripe(width=1.5)
    with pytest.raises(InputError, match="sigma"):
        Blur(sigma=0.0)
    with pytest.raises(InputError, match="no image has label 4"):
        inject_class(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 4, Stripe())


def test_figure_shows_the_original_and_every_signal():
    figure = figure_injections(textured())
    assert [ax.get_title() for ax in figure.axes] == ["original", *INJECTIONS]


def test_figure_shows_photos_in_colour():
    photo = torch.stack([textured(seed=0)[0], textured(seed=1)[0], textured(seed=2)[0]])
    figure = figure_injections(photo)
    shown = figure.axes[0].get_images()[0].get_array()
    assert shown.shape == (64, 64, 3)
    assert torch.allclose(torch.as_tensor(shown, dtype=torch.float32), photo.permute(1, 2, 0))
