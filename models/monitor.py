"""The trainer's held-out monitor: captions embedded by the model being trained, and Recall@K both
ways over a held-out split, computed on the torch model itself after every epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.caption_bank import CaptionBank
from models.images import load_image
from models.metrics import retrieval_recall
from models.train_data import Examples


@torch.no_grad()  # not inference_mode: the caption bank takes part in the (image-side) backward pass
def embed_captions(model: Any, tokenizer: Any, captions: Sequence[str], device: torch.device,
                   batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit-norm text features of `captions`, in eval mode."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(list(captions[start : start + batch_size])).to(device)
        parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    model.train(was_training)
    if not parts:
        return torch.empty(0, 0, device=device)
    return torch.cat(parts)


@torch.inference_mode()
def evaluate_pairs(
    model: Any,
    tokenizer: Any,
    preprocess: Any,
    examples: Examples,
    cache: Sequence[Image.Image | None],
    device: torch.device,
    batch_size: int = 128,
    caption_bank: CaptionBank | None = None,
    caption_features: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 both ways over `examples` (images taken from `cache` when present).

    With a `caption_bank`, the recalls of the image embeddings it mixes are added under keys
    prefixed `caption_bank_`; the unprefixed ones stay those of the image tower alone.
    When some image has more than one caption, the recalls with one caption per image (its first
    in the manifest) are added too, under `first_caption_` (after `caption_bank_` for the bank's):
    what `clipsearch eval` reports on a manifest of those rows (image -> text without an image bank,
    which is built after training). A caption shared by many images
    ("a bird") is a query that cannot find its own image among them, so the figures over every
    caption can rank runs otherwise than the one-description score does.
    `caption_features`: the `examples.captions` already embedded (a locked text tower), else
    they are embedded here.
    """
    was_training = model.training
    model.eval()
    features = []
    for start in range(0, len(examples.images), batch_size):
        batch = []
        for i in range(start, min(start + batch_size, len(examples.images))):
            image = cache[i] if cache and cache[i] is not None else load_image(examples.images[i])
            batch.append(preprocess(image))
        pixels = torch.stack(batch).to(device, memory_format=torch.channels_last)
        features.append(F.normalize(model.encode_image(pixels).float(), dim=-1))
    model.train(was_training)
    image_features = torch.cat(features)
    text_features = (
        caption_features
        if caption_features is not None
        else embed_captions(model, tokenizer, examples.captions, device).cpu().numpy()
    )
    searched = {"": image_features.cpu().numpy()}
    if caption_bank is not None:
        searched["caption_bank_"] = caption_bank.project(image_features).cpu().numpy()
    query_sets = {"": _pair_queries(examples)}
    if len(examples.pairs) > len(examples.images):
        query_sets["first_caption_"] = _first_caption_queries(examples)
    recall: dict[str, float] = {}
    for bank_prefix, images in searched.items():
        for query_prefix, (caption_ids, owners) in query_sets.items():
            scores = retrieval_recall(images, text_features[caption_ids], owners)
            recall.update({f"{bank_prefix}{query_prefix}{k}": v for k, v in scores.items()})
    return recall


def _pair_queries(examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """Every pair as a query: (caption index, image index) arrays, one row per pair."""
    caption_ids = np.array([c for _, c in examples.pairs], dtype=np.int64)
    owners = np.array([i for i, _ in examples.pairs], dtype=np.int64)
    return caption_ids, owners


def _first_caption_queries(examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """One query per image, its first caption in manifest order: (caption index, image index)."""
    caption_ids = np.array([captions[0] for captions in examples.captions_of], dtype=np.int64)
    return caption_ids, np.arange(len(examples.images), dtype=np.int64)
