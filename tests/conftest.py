"""Shared fixtures: tiny open_clip models and generated, captioned image data (no network, no GPU)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square")
TINY = "clipsearch-tiny"


def draw_shape(color: str, shape: str, rng: random.Random, size: int = 48) -> Image.Image:
    """A coloured shape at a random place and size on a light, slightly noisy background."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size - 6)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent, y + extent)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)
    return image


def make_shapes_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """A folder of PNGs, each with a same-name `.txt` caption ("a red circle"), in class folders."""
    rng = random.Random(seed)
    for color in COLORS:
        for shape in SHAPES:
            folder = root / f"{color}_{shape}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(color, shape, rng).save(folder / f"{i:03d}.png")
                (folder / f"{i:03d}.txt").write_text(f"a {color} {shape}\nsecond line is ignored\n")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def tiny_encoder():
    import torch

    from models import load_encoder

    torch.manual_seed(0)
    return load_encoder(TINY, device="cpu", image_batch_size=4, text_batch_size=3)


@pytest.fixture()
def sample_images() -> list[Image.Image]:
    rng = random.Random(1)
    return [draw_shape(c, s, rng) for c in COLORS for s in SHAPES][:7]
