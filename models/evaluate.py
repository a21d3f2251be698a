"""Retrieval evaluation of any encoder on a captioned set: Recall@1/5/10 in both directions."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from models.data import PairSet, is_held_out, pair_split_key
from models.encoder import DualEncoder
from models.images import ImageRejected, load_image
from models.metrics import DEFAULT_KS, retrieval_recall, wilson_interval

logger = logging.getLogger(__name__)


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


def evaluate(
    encoder: DualEncoder, pair_set: PairSet, ks: tuple[int, ...] = DEFAULT_KS, progress: bool = True
) -> EvalReport:
    """Embed every image and caption of `pair_set` and score retrieval; bad images are skipped.
    The captions are text queries for text -> image and documents (`encode_captions`) for image -> text."""
    skipped: Counter[str] = Counter(pair_set.skipped)
    image_ids: dict[Any, int] = {}
    images = []
    texts: list[str] = []
    owners: list[int] = []
    bad: dict[Any, str] = {}
    unique = list(dict.fromkeys(p.image for p in pair_set.pairs))
    for path in tqdm(unique, desc="decode", disable=not progress):
        try:
            images.append(load_image(path))
            image_ids[path] = len(image_ids)
        except ImageRejected as exc:
            bad[path] = exc.reason
    for pair in pair_set.pairs:
        if pair.image in bad:
            skipped["bad_image:" + bad[pair.image]] += 1
            continue
        texts.append(pair.caption)
        owners.append(image_ids[pair.image])
    if not texts:
        reasons = f" (skipped: {dict(skipped)})" if skipped else ""
        raise ValueError(f"nothing to evaluate: no usable pairs{reasons}")
    image_features = encoder.encode_images(images)
    text_features = encoder.encode_texts(texts)
    # image -> text searches the captions as documents (`encode_captions`), as a caption index does
    recall = retrieval_recall(image_features, text_features, np.asarray(owners), ks,
                              documents=encoder.as_captions(text_features))
    return EvalReport(recall, len(images), len(texts), skipped)
