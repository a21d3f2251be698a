"""Indexer fixtures: a saved tiny model (identical in every process) and a messy image folder."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch

from models.checkpoint import save_model_dir
from models.encoder import create_model

from ..conftest import COLORS, SHAPES, TINY, draw_shape


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model", loaded.model, loaded.model_config,
                          loaded.preprocess_config, {"architecture": TINY})


BAD_FILES = {  # name -> (bytes, expected reason)
    "zero.png": (b"", "empty"),
    "random.jpg": (bytes(random.Random(3).randbytes(3000)), "unsupported_format"),
    "page.png": (b"<html><body>not an image</body></html>", "unsupported_format"),
    "doc.gif": (b"%PDF-1.4\n%%EOF\n", "unsupported_format"),
}


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    draw_shape("red", "circle", random.Random(0), size=200).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()[:1500]


def make_messy_folder(root: Path, good: int, bad: int, seed: int = 0) -> dict[str, str]:
    """`good` decodable images (some with captions) and `bad` broken files; returns {bad: reason}."""
    rng = random.Random(seed)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(good):
        color, shape = classes[i % len(classes)]
        folder = root / f"{color}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        image = draw_shape(color, shape, rng, size=rng.choice([24, 32, 40]))
        suffix = [".png", ".jpg", ".webp", ".bmp"][i % 4]
        image.save(folder / f"img{i:05d}{suffix}")
        if i % 3 == 0:
            (folder / f"img{i:05d}.txt").write_text(f"a {color} {shape}\n")
    expected: dict[str, str] = {}
    (root / "bad").mkdir(parents=True, exist_ok=True)
    kinds = list(BAD_FILES.items()) + [("cut.jpg", (_truncated_jpeg(), "truncated"))]
    for i in range(bad):
        name, (data, reason) = kinds[i % len(kinds)]
        path = root / "bad" / f"{i:03d}_{name}"
        path.write_bytes(data)
        expected[f"bad/{path.name}"] = reason
    return expected
