"""The training input pipeline: pairs as indices, one decode per image, augmentation, a resumable order.

Every image is decoded once up front (unusable ones are dropped and counted by reason, never a
crash), kept as a small copy when caching, and augmented per step. The sampler's permutation is a
function of (seed, epoch), so a run resumed mid-epoch sees the same order as an uninterrupted one.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from tqdm import tqdm

from models.config import AugmentConfig
from models.data import Pair, PairSet
from models.images import ImageRejected, load_image


@dataclass(eq=False)
class Examples:
    """Pairs as indices into unique images and unique captions."""

    images: list[Path]
    captions: list[str]
    pairs: list[tuple[int, int]]  # (image index, caption index)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair]) -> Examples:
        image_ids: dict[Path, int] = {}
        caption_ids: dict[str, int] = {}
        rows = [
            (image_ids.setdefault(p.image, len(image_ids)), caption_ids.setdefault(p.caption, len(caption_ids)))
            for p in pairs
        ]
        return cls(list(image_ids), list(caption_ids), rows)

    def as_pairs(self) -> list[Pair]:
        """The pairs again, one per row (what an image bank is built from after training)."""
        return [Pair(self.images[i], self.captions[c]) for i, c in self.pairs]

    @functools.cached_property
    def captions_of(self) -> list[list[int]]:
        """For each image, the indices of its distinct captions (a repeated manifest row counts once)."""
        owned: list[dict[int, None]] = [{} for _ in self.images]
        for image_id, caption_id in self.pairs:
            owned[image_id][caption_id] = None
        return [list(captions) for captions in owned]


def cache_side(preprocess_config: dict[str, Any]) -> int:
    """The longest side of the copy the trainer keeps of each image: twice the model's input, room
    for random-resized crops to zoom in without decoding the file again."""
    size = preprocess_config.get("size", 224)
    return 2 * (size if isinstance(size, int) else max(size))


def small_copy(image: Image.Image, max_side: int) -> Image.Image:
    """The image shrunk (bicubic, aspect kept) to at most `max_side` a side; smaller ones as they are."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def scan_images(
    paths: Sequence[Path], keep_side: int | None, progress: bool, workers: int = 4
) -> tuple[list[Image.Image | None], dict[Path, str]]:
    """Decode every image once: (small copies or None when not kept, {rejected path: reason})."""

    def one(path: Path) -> Image.Image | str | None:
        try:
            image = load_image(path)
        except ImageRejected as exc:
            return f"{exc.reason}: {exc.message}"
        return small_copy(image, keep_side) if keep_side else None

    kept: list[Image.Image | None] = []
    rejected: dict[Path, str] = {}
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, paths)
        for path, result in tqdm(
            zip(paths, results, strict=True), total=len(paths), desc="decode", disable=not progress
        ):
            if isinstance(result, str):
                rejected[path] = result
                kept.append(None)
            else:
                kept.append(result)
    return kept, rejected


class PadToSquare:
    """Pad to a square with a fixed colour, matching open_clip's `resize_mode="longest"`."""

    def __init__(self, fill: int) -> None:
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        side = max(image.size)
        return ImageOps.pad(image, (side, side), color=(self.fill,) * 3)


def train_transform(preprocess_config: dict[str, Any], augment: AugmentConfig,
                    random_erasing: float = 0.0) -> transforms.Compose:
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    size = preprocess_config.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    steps: list[Any] = []
    if preprocess_config.get("resize_mode") == "longest":
        steps.append(PadToSquare(int(preprocess_config.get("fill_color", 0))))
    steps.append(
        transforms.RandomResizedCrop(
            size, scale=augment.scale, ratio=augment.ratio, interpolation=transforms.InterpolationMode.BICUBIC
        )
    )
    if augment.hflip:
        steps.append(transforms.RandomHorizontalFlip(augment.hflip))
    if augment.color_jitter:
        j = augment.color_jitter
        steps.append(transforms.ColorJitter(j, j, j, min(0.5, j / 4)))
    if augment.grayscale:
        steps.append(transforms.RandomGrayscale(augment.grayscale))
    if augment.trivial_augment:
        fill = int(preprocess_config.get("fill_color", 0))
        steps.append(transforms.TrivialAugmentWide(fill=[fill] * 3))  # rotations/shears expose this colour
    steps += [
        transforms.ToTensor(),
        transforms.Normalize(preprocess_config["mean"], preprocess_config["std"]),
    ]
    if random_erasing:  # on the normalised tensor: "random" fills with standard normal noise
        steps.append(transforms.RandomErasing(random_erasing, scale=(0.02, 0.33), ratio=(0.3, 3.3), value="random"))
    return transforms.Compose(steps)


class PairDataset(Dataset[tuple[torch.Tensor, int, int]]):
    def __init__(
        self, examples: Examples, cache: list[Image.Image | None], transform: transforms.Compose
    ) -> None:
        self.examples = examples
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image_id, caption_id = self.examples.pairs[index]
        image = self.cache[image_id] if self.cache else None
        if image is None:
            image = load_image(self.examples.images[image_id])
        return self.transform(image), image_id, caption_id


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through (after a resume)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.skip :])

    def __len__(self) -> int:
        return self.size - self.skip


def decode_pairs(
    pair_set: PairSet, keep_side: int | None, progress: bool
) -> tuple[list[Pair], dict[Path, Image.Image | None], Counter[str], list[dict[str, str]]]:
    """Decode each image once; drop pairs whose image is unusable, counting them by reason."""
    unique = list(dict.fromkeys(p.image for p in pair_set.pairs))
    copies, rejected = scan_images(unique, keep_side, progress)
    cache = dict(zip(unique, copies, strict=True))
    skipped: Counter[str] = Counter(pair_set.skipped)
    kept: list[Pair] = []
    for pair in pair_set.pairs:
        if pair.image in rejected:
            skipped["bad_image:" + rejected[pair.image].split(":", 1)[0]] += 1
        else:
            kept.append(pair)
    rejects = [{"image": str(path), "reason": reason} for path, reason in rejected.items()]
    return kept, cache, skipped, rejects
