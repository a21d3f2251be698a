"""Held-out images that are byte-for-byte copies of training images, which a split by path cannot see.

The split is by path (or `group`): two copies of one file under two names land on either side by
chance, and the held-out copy is then found from memory, not by generalising. Files are compared
by size first, so only the few held-out images that share a training image's size are hashed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # gone since it was decoded: it cannot be compared, and is no copy to report
        return None


def _digest(path: Path) -> bytes | None:
    try:
        with path.open("rb") as fp:
            return hashlib.file_digest(fp, "blake2b").digest()
    except OSError:
        return None


def copies_across_split(train: Iterable[Path], held: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(held-out image, a training image with the same bytes), for each held-out image that has one,
    in the order of `held`. A path on both sides is not a copy (it is one file)."""
    held_by_size: dict[int, list[Path]] = defaultdict(list)
    held_paths = list(dict.fromkeys(held))
    held_set = set(held_paths)
    for path in held_paths:
        size = _size(path)
        if size is not None:
            held_by_size[size].append(path)
    train_by_digest: dict[bytes, Path] = {}
    for path in dict.fromkeys(train):
        size = _size(path)
        if size is None or size not in held_by_size or path in held_set:
            continue
        digest = _digest(path)
        if digest is not None:
            train_by_digest.setdefault(digest, path)
    if not train_by_digest:
        return []
    copies = []
    for paths in held_by_size.values():
        for path in paths:
            digest = _digest(path)
            if digest is not None and digest in train_by_digest:
                copies.append((path, train_by_digest[digest]))
    order = {path: i for i, path in enumerate(held_paths)}
    return sorted(copies, key=lambda pair: order[pair[0]])


def warn_copies(copies: list[tuple[Path, Path]], held_images: int) -> None:
    """Log what `copies_across_split` found, with an example and the remedy."""
    if not copies:
        return
    held, train = copies[0]
    logger.warning(
        "%d of %d held-out images are byte-for-byte copies of training images (e.g. %s = %s): their "
        "held-out recall measures memory, not generalisation. Give the copies one `group` value in the "
        "manifest to keep them on one side of the split", len(copies), held_images, held, train)
