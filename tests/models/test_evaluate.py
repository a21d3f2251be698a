"""`evaluate` decodes and embeds a few batches at a time (a large set is never held decoded at
once): its report equals a plain one-pass reference, bad images skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data import PairSet, read_pairs
from models.evaluate import evaluate
from models.images import ImageRejected, load_image
from models.metrics import retrieval_recall


def test_chunked_evaluation_equals_one_pass(tiny_encoder, shapes_folder: Path, tmp_path: Path) -> None:
    pair_set = read_pairs(shapes_folder)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    broken = type(pair_set.pairs[0])(tmp_path / "broken.png", "a broken file")
    pairs = PairSet([*pair_set.pairs[:50], broken, *pair_set.pairs[50:]], pair_set.root)
    # 192 images: 12 chunks of 4 batches of 4 for this encoder
    report = evaluate(tiny_encoder, pairs, progress=False)

    images, texts, owners = [], [], []
    for pair in pairs.pairs:
        try:
            images.append(load_image(pair.image))
        except ImageRejected:
            continue
        texts.append(pair.caption)
        owners.append(len(images) - 1)
    text_features = tiny_encoder.encode_texts(texts)
    expected = retrieval_recall(tiny_encoder.encode_images(images), text_features, np.asarray(owners), (1, 5, 10),
                                documents=tiny_encoder.as_captions(text_features))
    assert report.recall == expected
    assert (report.images, report.texts) == (192, 192) and report.skipped == {"bad_image:unsupported_format": 1}
