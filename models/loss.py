"""Training losses: symmetric InfoNCE (CLIP), the caption-bank loss for locked text towers, its
semantic smoothing, and distillation from a trained model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# CLIP clamps the learned temperature so logits never exceed 100x the cosine similarity.
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(
    image_features: torch.Tensor,  # (B, D), unit norm
    text_features: torch.Tensor,  # (B, D), unit norm; row i pairs with image row i
    logit_scale: torch.Tensor,  # scalar, log of the inverse temperature
    label_smoothing: float = 0.0,
    caption_ids: torch.Tensor | None = None,  # (B,) equal ids mean equal caption text
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over the batch's similarity matrix.

    With `caption_ids`, rows that share a caption ("a bird") are all positives of one another
    (uniform soft targets) instead of one being the other's negative.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_features @ text_features.T  # (B, B)
    if caption_ids is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).float().to(logits.device)  # symmetric
        targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (
        F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)
    )


def caption_bank_loss(
    image_features: torch.Tensor,  # (B, D), unit norm
    bank: torch.Tensor,  # (N, D), unit norm: every distinct training caption, precomputed
    targets: torch.Tensor,  # (B, N), rows sum to 1: the captions that belong to each image
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Image->text cross-entropy against the whole caption bank with soft multi-caption targets.

    With a frozen text tower every caption's embedding is fixed, so each image can be contrasted
    with all N captions instead of the B in its batch: many more negatives for one extra matmul.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_features @ bank.T  # (B, N)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distillation_loss(
    image_features: torch.Tensor,  # (B, D), unit norm: the model in training
    teacher_features: torch.Tensor,  # (B, D), unit norm: a trained model on the same images
    bank: torch.Tensor,  # (N, D), unit norm: every distinct training caption
    temperature: float,
) -> torch.Tensor:
    """Cross-entropy of the model's distribution over the caption bank against the teacher's
    (knowledge distillation, Hinton et al. 2015; with a teacher of the same recipe, Born-Again
    networks, Furlanello et al. 2018). It differs from KL(teacher || model) by the teacher's
    entropy, a constant, so its gradient is the same.

    The teacher's soft targets say which other captions an image resembles ("a blackbird" is
    nearer "a hen" than "a fire engine"), which one-hot caption targets cannot. One fixed
    temperature for both sides, not the learned one: the targets must not sharpen as training does.
    """
    targets = F.softmax(teacher_features @ bank.T / temperature, dim=-1)  # (B, N)
    log_probs = F.log_softmax(image_features @ bank.T / temperature, dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean()


def semantic_smoothing(
    targets: torch.Tensor,  # (B, N), rows sum to 1: each image's own captions
    bank: torch.Tensor,  # (N, D), unit norm: every distinct training caption
    weight: float,
    temperature: float,
) -> torch.Tensor:
    """Caption-bank targets with `weight` of each row moved onto its captions' text neighbours: a
    softmax of each own caption's similarities to the whole bank (itself included, the largest
    share). Label smoothing that follows the text tower instead of spreading uniformly (the idea of
    DeViSE-style semantic targets for zero-shot transfer: an image of a blackbird should stay nearer
    "a hen" than "a fire engine", so that an unseen bird's caption still finds it).

    Only the batch's own captions get their neighbours computed: (C, N) per step, never (N, N),
    which a bank of 100,000 captions could not hold."""
    if weight == 0:
        return targets
    own = targets.any(dim=0).nonzero().squeeze(1)  # (C,) the captions this batch's targets name
    neighbours = F.softmax(bank[own] @ bank.T / temperature, dim=-1)  # (C, N)
    return (1.0 - weight) * targets + weight * targets[:, own] @ neighbours
