"""Inference-time image preprocessing: open_clip's transform plus one option of ours, a centre crop.

A model's preprocess settings are open_clip's `PreprocessCfg` fields (size, resize mode, fill,
normalisation) and, optionally, `crop_fraction`: resize to size / fraction, then keep the central
size x size, as timm's `crop_pct` does: it enlarges the object, for towers trained on random
crops (the default model does not use it: it lost on an inner split, README). open_clip drops keys
it does not know when it reads a model folder, so a folder with a crop fraction still loads in
open_clip itself, only without the crop.

The settings decide the embedding as much as the weights do, so `preprocess_digest` is part of the
model fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, replace
from typing import Any

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms

CROP_FRACTION = "crop_fraction"
_OPEN_CLIP_KEYS = frozenset(f.name for f in fields(PreprocessCfg))


def open_clip_config(config: Mapping[str, Any]) -> PreprocessCfg:
    """The fields of `config` that open_clip knows."""
    return PreprocessCfg(**{k: v for k, v in config.items() if k in _OPEN_CLIP_KEYS})


def crop_fraction(config: Mapping[str, Any]) -> float:
    """The configured centre-crop fraction (1.0: no crop). Raises ValueError outside (0, 1]."""
    fraction = float(config.get(CROP_FRACTION, 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{CROP_FRACTION} must be in (0, 1], got {fraction}")
    return fraction


def _square(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def inference_transform(config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised (3, H, W) tensor, as the model expects at search time."""
    fraction = crop_fraction(config)
    base = open_clip_config(config)
    if fraction == 1.0:
        return image_transform_v2(base, is_train=False)
    size = _square(base.size)
    enlarged = (round(size[0] / fraction), round(size[1] / fraction))
    # Cropping the normalised tensor equals cropping the pixels: normalisation is per channel.
    return transforms.Compose([image_transform_v2(replace(base, size=enlarged), is_train=False),
                               transforms.CenterCrop(size)])


def preprocess_digest(config: Mapping[str, Any]) -> str:
    """sha256 of the settings that shape the pixels, in one canonical form: open_clip's defaults
    filled in, sizes as (h, w), and no crop recorded when the fraction is 1."""
    canonical = asdict(open_clip_config(config))
    canonical["size"] = list(_square(canonical["size"]))
    fraction = crop_fraction(config)
    if fraction != 1.0:
        canonical[CROP_FRACTION] = fraction
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
