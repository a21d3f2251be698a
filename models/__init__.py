"""clipsearch models: the contrastive dual encoder, its training and its retrieval evaluation.

Public API: `load_encoder` returns a `DualEncoder` whose `encode_images` / `encode_texts` give
float32, L2-normalised `(n, d)` arrays; `ModelFingerprint` identifies its embedding space.
Names are imported on first use, so `import models.cli` (and `clipsearch --help`) stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MODEL_DIR": "models.encoder",
    "DualEncoder": "models.encoder",
    "FingerprintMismatch": "models.encoder",
    "ModelFingerprint": "models.encoder",
    "load_encoder": "models.encoder",
    "resolve_device": "models.encoder",
    "ImageLimits": "models.images",
    "ImageRejected": "models.images",
    "decode_image": "models.images",
    "load_image": "models.images",
    "normalize_image": "models.images",
}

__all__ = [
    "DEFAULT_MODEL_DIR",
    "DualEncoder",
    "FingerprintMismatch",
    "ImageLimits",
    "ImageRejected",
    "ModelFingerprint",
    "decode_image",
    "load_encoder",
    "load_image",
    "normalize_image",
    "resolve_device",
]

if TYPE_CHECKING:
    from models.encoder import (
        DEFAULT_MODEL_DIR,
        DualEncoder,
        FingerprintMismatch,
        ModelFingerprint,
        load_encoder,
        resolve_device,
    )
    from models.images import ImageLimits, ImageRejected, decode_image, load_image, normalize_image


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
