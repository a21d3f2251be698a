"""The embedded default model: loads offline in one line, embeds, and answers everyday queries."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import DEFAULT_MODEL_DIR, load_encoder
from models.caption_bank import BANK_FILE
from models.checkpoint import CONFIG_NAME, PARTIAL_WEIGHTS_NAME

STAMPS = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="module")
def default_encoder():
    return load_encoder()


def test_committed_checkpoint_is_small_and_partial() -> None:
    weights = DEFAULT_MODEL_DIR / PARTIAL_WEIGHTS_NAME
    assert (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file() and weights.is_file()
    assert weights.stat().st_size < 25 * 1024 * 1024


def test_loads_and_embeds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the default model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    encoder = load_encoder()
    text = encoder.encode_texts(["a bird"])
    image = encoder.encode_images([Image.new("RGB", (40, 30), (200, 30, 30))])
    assert text.shape == image.shape == (1, 384)
    assert encoder.fingerprint.architecture == "clipsearch-minilm-cnn"


def test_fingerprint_is_stable(default_encoder) -> None:
    assert load_encoder().fingerprint == default_encoder.fingerprint


def test_ships_a_caption_bank_that_moves_only_images(default_encoder) -> None:
    assert (DEFAULT_MODEL_DIR / BANK_FILE).stat().st_size < 5 * 1024 * 1024
    bank = default_encoder.caption_bank
    assert bank is not None and len(bank) > 1000 and bank.embeddings.shape[1] == default_encoder.dim
    raw = load_encoder(caption_bank=False)
    assert raw.fingerprint != default_encoder.fingerprint
    image = [Image.new("RGB", (40, 30), (200, 30, 30))]
    np.testing.assert_array_equal(raw.encode_texts(["a bird"]), default_encoder.encode_texts(["a bird"]))
    mixed, alone = default_encoder.encode_images(image), raw.encode_images(image)
    assert not np.allclose(mixed, alone)
    # the image embedding is the bank's mixing of what the image tower alone gives
    np.testing.assert_allclose(mixed, bank.project(torch.from_numpy(alone)).numpy(), atol=1e-5)


def _gallery(encoder) -> tuple[list[Path], np.ndarray]:
    from models.images import load_image

    assert STAMPS.is_dir(), "the stamps gallery is missing: run `make install` (Debian tuxpaint-stamps-default)"
    paths = sorted(STAMPS.rglob("*.png"))
    return paths, encoder.encode_images([load_image(p) for p in paths])


@pytest.mark.slow
def test_everyday_queries_find_their_category(default_encoder) -> None:
    paths, embeddings = _gallery(default_encoder)
    queries = {"a bird": "birds", "a piece of fruit": "fruit", "a musical instrument": "music",
               "a road sign": "roadsigns", "a flower": "flowers", "a car": "vehicles"}
    scores = default_encoder.encode_texts(list(queries)) @ embeddings.T
    for row, (query, folder) in enumerate(queries.items()):
        top = [paths[i] for i in np.argsort(-scores[row])[:5]]
        hits = sum(folder in p.relative_to(STAMPS).parts for p in top)
        assert hits >= 3, (query, [str(p.relative_to(STAMPS)) for p in top])
