"""Search-time preprocessing: the centre-crop option against a plain reference, and its digest."""

from __future__ import annotations

import random

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from models.preprocess import CROP_FRACTION, crop_fraction, inference_transform, preprocess_digest

from ..conftest import draw_shape

BASE = {"size": [64, 64], "resize_mode": "longest", "fill_color": 255, "interpolation": "bicubic",
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def _images() -> list[Image.Image]:
    rng = random.Random(3)
    wide = draw_shape("red", "circle", rng, size=90).crop((0, 20, 90, 70))  # 90 x 50, padded by "longest"
    return [draw_shape("blue", "square", rng, size=120), wide, draw_shape("green", "circle", rng, size=33)]


def test_no_crop_is_open_clip_itself() -> None:
    reference = image_transform_v2(PreprocessCfg(**BASE), is_train=False)
    for config in (BASE, {**BASE, CROP_FRACTION: 1.0}):
        ours = inference_transform(config)
        for image in _images():
            assert torch.equal(ours(image), reference(image))


@pytest.mark.parametrize("fraction, enlarged, start", [(0.875, 73, 4), (0.8, 80, 8), (0.5, 128, 32)])
def test_crop_is_the_centre_of_a_larger_rendering(fraction: float, enlarged: int, start: int) -> None:
    # the reference: open_clip's transform at size / fraction, then the central 64 x 64 sliced out
    larger = image_transform_v2(PreprocessCfg(**{**BASE, "size": enlarged}), is_train=False)
    ours = inference_transform({**BASE, CROP_FRACTION: fraction})
    for image in _images():
        pixels = ours(image)
        assert pixels.shape == (3, 64, 64)
        assert torch.equal(pixels, larger(image)[:, start : start + 64, start : start + 64])


def test_crop_fraction_is_checked() -> None:
    assert crop_fraction(BASE) == 1.0
    for bad in (0.0, -0.5, 1.2):
        with pytest.raises(ValueError, match="crop_fraction must be in"):
            inference_transform({**BASE, CROP_FRACTION: bad})


def test_digest_tells_apart_only_what_changes_pixels() -> None:
    digest = preprocess_digest(BASE)
    assert preprocess_digest({**BASE, "size": 64}) == digest  # one size, two spellings
    assert preprocess_digest({**BASE, "size": (64, 64), "mean": tuple(BASE["mean"])}) == digest
    assert preprocess_digest({**BASE, CROP_FRACTION: 1.0}) == digest  # 1.0 is no crop
    assert preprocess_digest({**BASE, "unknown_key": 3}) == digest  # ignored by the transform too
    others = {preprocess_digest({**BASE, CROP_FRACTION: 0.875}), preprocess_digest({**BASE, "size": 72}),
              preprocess_digest({**BASE, "resize_mode": "shortest"}), preprocess_digest({**BASE, "fill_color": 0})}
    assert len(others) == 4 and digest not in others
