"""A data pack: a small, self-contained copy of a training set that trains exactly as the original.

Every image is stored as the trainer keeps it in memory (`train_data.small_copy`: at most
`cache_side` pixels a side, lossless PNG), so a run on the pack sees the same pixels as a run on
the original files. Each manifest row keeps its caption and columns and gains a `group` column
holding its original split key (`data.pair_split_key`), so the pack holds out the same images.
The default model's data set packs into about 14 MB instead of the stamps' 230 MB: small enough to
travel to a machine without the Debian packages, such as a lent GPU (README, "Training").

Layout: `images/NNNNN-STEM.png`, the manifests (as JSONL, named after the source's), and `pack.json`,
written last, whose presence means "complete". Images that do not decode are left out and listed
in `pack.json` with their reason, as the trainer would skip them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models import checkpoint
from models.data import PairSet, pair_split_key, read_manifest
from models.images import ImageRejected, load_image
from models.train_data import small_copy

logger = logging.getLogger(__name__)

PACK_MARKER = "pack.json"
PACK_FORMAT = 1


def is_pack(folder: Path) -> bool:
    return (folder / PACK_MARKER).is_file()


def write_pack(manifests: Sequence[Path], out_dir: Path, side: int, progress: bool = True) -> dict[str, Any]:
    """Pack the images and rows of `manifests` (any format `read_manifest` reads) into `out_dir`; returns
    what `pack.json` records. `side`: the trainer's cache side for the model to be trained
    (`train_data.cache_side`); a pack trains exactly as its source only for models with that side."""
    if side < 1:
        raise ValueError(f"a pack's image side must be positive, got {side}")
    names = [path.with_suffix(".jsonl").name for path in manifests]
    if len(set(names)) != len(names):
        raise ValueError(f"manifests to pack need distinct file names, got {[p.name for p in manifests]}")
    sources = [read_manifest(path) for path in manifests]
    images: dict[Path, str | None] = {}  # original -> its file in the pack, None when rejected
    for pair_set in sources:
        images.update(dict.fromkeys(p.image for p in pair_set.pairs))
    record: dict[str, Any] = {"format": PACK_FORMAT, "side": side, "manifests": names}

    def build(staging: Path) -> None:
        rejected: dict[str, str] = {}
        (staging / "images").mkdir(parents=True)
        for number, original in enumerate(tqdm(list(images), desc="pack", disable=not progress)):
            try:
                image = small_copy(load_image(original), side)
            except ImageRejected as exc:
                rejected[str(original)] = f"{exc.reason}: {exc.message}"
                continue
            name = f"images/{number:05d}-{original.stem}.png"
            image.save(staging / name, format="PNG")
            images[original] = name
        skipped: Counter[str] = Counter()
        for name, pair_set in zip(names, sources, strict=True):
            checkpoint.write_jsonl(staging / name, _packed_rows(pair_set, images, skipped))
        record.update(images=sum(1 for name in images.values() if name), rejected=rejected,
                      rows_skipped=dict(skipped))
        checkpoint.write_json(staging / PACK_MARKER, record)  # last: its presence means "complete"

    checkpoint.publish_dir(out_dir, build, marker=PACK_MARKER)
    logger.info("packed %d images into %s (%d rejected)", record["images"], out_dir, len(record["rejected"]))
    return record


def _packed_rows(pair_set: PairSet, images: dict[Path, str | None], skipped: Counter[str]) -> list[dict[str, Any]]:
    """The manifest's usable rows, pointing into the pack, each with its original split key; the
    rest counted in `skipped` by reason."""
    packed = []
    skipped.update(pair_set.skipped)  # rows the reader skipped (no image path, empty caption)
    for pair in pair_set.pairs:
        name = images[pair.image]
        if name is None:
            skipped["bad_image"] += 1
            continue
        packed.append({**pair.extra, "image": name, "caption": pair.caption,
                       "group": pair_split_key(pair, pair_set.root)})
    return packed


def read_pack_record(folder: Path) -> dict[str, Any]:
    """`pack.json` of a pack folder; FileNotFoundError when the folder is not a complete pack."""
    marker = folder / PACK_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{folder} is not a data pack: {PACK_MARKER} is missing")
    record: dict[str, Any] = json.loads(marker.read_text())
    return record
