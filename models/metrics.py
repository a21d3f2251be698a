"""Retrieval metrics: Recall@K in both directions for images that may each have several captions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best columns per row, best first, ties broken by lower index: the same
    answer on every machine. argpartition alone would choose among columns tied at the k-th
    place by its own algorithm, which differs with numpy's SIMD path; so every column at least as
    good as the k-th takes part in the final (score, index) sort."""
    k = min(k, scores.shape[1])
    negated = -scores
    kth = np.partition(negated, k - 1, axis=1)[:, k - 1]  # (R,) the k-th best score of each row, negated
    top = np.empty((len(scores), k), dtype=np.int64)
    for row, (values, bound) in enumerate(zip(negated, kth, strict=True)):
        candidates = np.flatnonzero(values <= bound)  # k of them, more when some tie at the k-th place
        top[row] = candidates[np.lexsort((candidates, values[candidates]))[:k]]
    return top


def retrieval_recall(
    image_features: np.ndarray,  # (I, D), unit norm
    text_features: np.ndarray,  # (T, D), unit norm
    text_to_image: np.ndarray,  # (T,) index of each text's image
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 1024,
    documents: np.ndarray | None = None,  # (T, D): the texts as image->text searches them
) -> dict[str, float]:
    """Recall@K text->image (a caption finds its image) and image->text (an image finds any of
    its captions), computed in row chunks so memory stays O(chunk x max(I, T)). `documents`: the
    same texts embedded as documents (`DualEncoder.encode_captions`), when they differ from the
    queries; image->text searches those."""
    documents = text_features if documents is None else documents
    # checked once on the embeddings, not on every score chunk: a NaN would rank nowhere in `_topk`
    if not all(np.isfinite(a).all() for a in (image_features, text_features, documents)):
        raise ValueError("the embeddings contain NaN or infinity: the model produced non-finite embeddings")
    kmax = max(ks)
    results: dict[str, float] = {}
    hits_t2i = np.zeros(len(ks))
    for start in range(0, len(text_features), chunk):
        scores = text_features[start : start + chunk] @ image_features.T
        top = _topk(scores, kmax)
        truth = text_to_image[start : start + chunk, None]
        for j, k in enumerate(ks):
            hits_t2i[j] += (top[:, :k] == truth).any(axis=1).sum()
    hits_i2t = np.zeros(len(ks))
    for start in range(0, len(image_features), chunk):
        scores = image_features[start : start + chunk] @ documents.T
        top = _topk(scores, kmax)
        owner = text_to_image[top]  # (chunk, kmax) image of each retrieved text
        mine = np.arange(start, start + len(scores))[:, None]
        for j, k in enumerate(ks):
            hits_i2t[j] += (owner[:, :k] == mine).any(axis=1).sum()
    for j, k in enumerate(ks):
        results[f"text_to_image_R@{k}"] = float(hits_t2i[j] / max(1, len(text_features)))
        results[f"image_to_text_R@{k}"] = float(hits_i2t[j] / max(1, len(image_features)))
    return results


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a recall measured on `n` queries: how far
    the figure may be from what a much larger set of the same kind would give. Unlike share +- z*SE,
    it stays inside [0, 1] and is sensible at 0 and 1 hits."""
    if n <= 0:
        return 0.0, 1.0
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    # rounding can put a bound a hair past the share itself (at 0 or 1 hits): keep it inside
    return max(0.0, min(share, (centre - spread) / scale)), min(1.0, max(share, (centre + spread) / scale))
