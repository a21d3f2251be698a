"""Retrieval evaluation of any encoder on a captioned set: Recall@1/5/10 in both directions."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.data import PairSet, is_held_out, pair_split_key
from models.encoder import DualEncoder
from models.images import ImageRejected, load_image
from models.metrics import DEFAULT_KS, retrieval_recall, wilson_interval

logger = logging.getLogger(__name__)
DECODE_THREADS = 4  # image decoding releases the GIL: as the trainer's decode


@dataclass
class EvalReport:
    recall: dict[str, float]
    images: int
    texts: int
    skipped: Counter[str] = field(default_factory=Counter)

    def intervals(self) -> dict[str, list[float]]:
        """95 % Wilson interval of each recall: text->image is a share of the texts, image->text of
        the images. On a few hundred queries it spans about +-0.05, worth knowing before calling a
        0.01 difference between two models real."""
        out = {}
        for name, value in self.recall.items():
            n = self.texts if name.startswith("text_to_image") else self.images
            out[name] = [round(bound, 4) for bound in wilson_interval(value, n)]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"recall": self.recall, "recall_95ci": self.intervals(), "images": self.images, "texts": self.texts,
                "skipped": dict(self.skipped)}


def held_out_only(pair_set: PairSet, fraction: float, seed: int = 0) -> PairSet:
    """The pairs the trainer holds out with the same `fraction` and `seed`. Raises ValueError for a
    fraction outside (0, 1): the trainer holds out nothing at 0 and trains on nothing at 1."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    kept = [p for p in pair_set.pairs if is_held_out(pair_split_key(p, pair_set.root), fraction, seed)]
    return PairSet(kept, pair_set.root, Counter(pair_set.skipped))


def _decoded(path: Any) -> Image.Image | ImageRejected:
    try:
        return load_image(path)
    except ImageRejected as exc:
        return exc


def _embed_images(encoder: DualEncoder, paths: list[Any], progress: bool) -> tuple[np.ndarray, dict[Any, int], dict[Any, str]]:
    """(features of the readable images, their row by path, {unreadable path: reason}). Decoded
    (by `DECODE_THREADS` threads) and embedded a few batches at a time under one progress bar: a
    large set is never held decoded in memory at once. Chunks are whole batches of the encoder, in
    input order, so the rows equal one call's."""
    parts: list[np.ndarray] = []
    chunk: list[Image.Image] = []
    rows: dict[Any, int] = {}
    bad: dict[Any, str] = {}
    size = 4 * encoder.image_batch_size
    with ThreadPoolExecutor(DECODE_THREADS) as pool, tqdm(total=len(paths), desc="images",
                                                          disable=not progress) as bar:
        for start in range(0, len(paths), size):
            window = paths[start:start + size]
            for path, result in zip(window, pool.map(_decoded, window), strict=True):
                if isinstance(result, ImageRejected):
                    bad[path] = result.reason
                else:
                    chunk.append(result)
                    rows[path] = len(rows)
                if len(chunk) == size:
                    parts.append(encoder.encode_images(chunk))
                    chunk = []
            bar.update(len(window))
    if chunk:
        parts.append(encoder.encode_images(chunk))
    features = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    return features, rows, bad


def _embed_texts(encoder: DualEncoder, texts: list[str], progress: bool) -> np.ndarray:
    """The captions' query embeddings, a few whole batches at a time under a progress bar."""
    size = 4 * encoder.text_batch_size
    parts = [encoder.encode_texts(texts[start:start + size])
             for start in tqdm(range(0, len(texts), size), desc="captions", unit="chunk", disable=not progress)]
    return np.concatenate(parts)


def evaluate(
    encoder: DualEncoder, pair_set: PairSet, ks: tuple[int, ...] = DEFAULT_KS, progress: bool = True
) -> EvalReport:
    """Embed every image and caption of `pair_set` and score retrieval; bad images are skipped.
    The captions are text queries for text -> image and documents (`encode_captions`) for image -> text."""
    skipped: Counter[str] = Counter(pair_set.skipped)
    unique = list(dict.fromkeys(p.image for p in pair_set.pairs))
    image_features, image_ids, bad = _embed_images(encoder, unique, progress)
    texts: list[str] = []
    owners: list[int] = []
    for pair in pair_set.pairs:
        if pair.image in bad:
            skipped["bad_image:" + bad[pair.image]] += 1
            continue
        texts.append(pair.caption)
        owners.append(image_ids[pair.image])
    if not texts:
        reasons = f" (skipped: {dict(skipped)})" if skipped else ""
        raise ValueError(f"nothing to evaluate: no usable pairs{reasons}")
    text_features = _embed_texts(encoder, texts, progress)
    # image -> text searches the captions as documents (`encode_captions`), as a caption index does
    recall = retrieval_recall(image_features, text_features, np.asarray(owners), ks,
                              documents=encoder.as_captions(text_features))
    return EvalReport(recall, len(image_features), len(texts), skipped)
