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
    caption_ids = np.array([c for _, c in examples.pairs], dtype=np.int64)
    owners = np.array([i for i, _ in examples.pairs], dtype=np.int64)
    recall = retrieval_recall(image_features.cpu().numpy(), text_features[caption_ids], owners)
    if caption_bank is not None:
        mixed = caption_bank.project(image_features).cpu().numpy()
        recall.update({f"caption_bank_{k}": v for k, v in retrieval_recall(mixed, text_features[caption_ids],
                                                                           owners).items()})
    return recall
