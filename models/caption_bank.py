"""The caption bank: image embeddings pulled toward the training captions they resemble.

An image tower trained from scratch on a few thousand pictures places an unseen object somewhere
between the concepts it knows, often beside an unrelated one that looks alike. ConSE (Norouzi et
al., "Zero-Shot Learning by Convex Combination of Semantic Embeddings", 2014) answers this with
the text tower's own geometry: take the image's closest training captions, mix their text
embeddings by softmax weight, and use that point of the text space. We blend the mixture with
the image's own embedding, so what the mixture cannot say (colour, pose, style) still counts.

The bank is the training captions' embeddings under a locked text tower, saved beside the image
weights of a model directory (`trained/caption_bank.safetensors`) with its three settings in the
directory's config. It works per image, so batching never changes a result.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.checkpoint import atomic_write
from models.config import CaptionBankConfig

BANK_FILE = "trained/caption_bank.safetensors"
CONFIG_KEY = "caption_bank"  # its settings, in the `clipsearch` section of the model config


def mix_toward(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               config: CaptionBankConfig) -> torch.Tensor:
    """Blend each row of `features` `(B, D)` with a softmax mixture of the `values` `(N, D)` whose
    `keys` `(N, D)` are its `top_k` nearest: `blend * feature + (1 - blend) * mixture`, unit norm.
    Row by row, so batching never changes a result. The caption bank mixes captions into images
    (keys and values alike the captions); the image bank (`models.image_bank`) mixes training
    images into captions (keys the captions, values their images)."""
    features = F.normalize(features.float(), dim=-1)
    keys, values = keys.to(features.device), values.to(features.device)
    similarity = features @ keys.T  # (B, N)
    top, indices = similarity.topk(min(config.top_k, keys.shape[0]), dim=-1)
    weights = torch.softmax(top / config.temperature, dim=-1)  # (B, k)
    mixture = F.normalize(torch.einsum("bk,bkd->bd", weights, values[indices]), dim=-1)
    return F.normalize(config.blend * features + (1.0 - config.blend) * mixture, dim=-1)


class CaptionBank:
    """Unit-norm caption embeddings `(N, D)` and the settings that mix them into image embeddings."""

    def __init__(self, embeddings: torch.Tensor, config: CaptionBankConfig, normalized: bool = False) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"a caption bank needs a non-empty (N, D) matrix, got shape {tuple(embeddings.shape)}")
        self.embeddings = embeddings.float() if normalized else F.normalize(embeddings.float(), dim=-1)
        self.config = config

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def to(self, device: torch.device | str) -> CaptionBank:
        # The same bits on every device: normalising again there would round differently on CUDA,
        # and the bank's digest (part of the model fingerprint) would then depend on the device,
        # so an index built on a GPU could not be served by a CPU replica.
        return CaptionBank(self.embeddings.to(device), self.config, normalized=True)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features `(B, D)` -> blended, unit-norm features `(B, D)`, row by row."""
        return mix_toward(features, self.embeddings, self.embeddings, self.config)

    def digest(self) -> str:
        """sha256 of the embeddings and settings: part of the model fingerprint."""
        return rows_digest(self.embeddings, self.config)

    def save(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Write the embeddings into `model_dir`; return the settings for the directory's config."""
        return save_rows(model_dir / BANK_FILE, self.embeddings, self.config, dtype)

    @classmethod
    def load(cls, model_dir: Path, meta: dict[str, Any]) -> CaptionBank | None:
        """The bank a model directory's config names, or None when it names none."""
        settings = meta.get(CONFIG_KEY)
        if not settings:
            return None
        embeddings = load_rows(model_dir, BANK_FILE, settings, "a caption bank")
        return cls(embeddings, CaptionBankConfig(**{k: v for k, v in settings.items() if k != "size"}))


# Stored banks (this one and `models.image_bank`): rows in a safetensors file, settings in the config.

def rows_digest(rows: torch.Tensor, config: CaptionBankConfig) -> str:
    """sha256 of a bank's rows and settings: part of the model fingerprint."""
    digest = hashlib.sha256(repr(sorted(asdict(config).items())).encode())
    digest.update(rows.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_rows(path: Path, rows: torch.Tensor, config: CaptionBankConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Write a bank's rows to `path` atomically; return its settings for the model config."""
    tensor = rows.detach().to("cpu", dtype).contiguous()
    atomic_write(path, lambda tmp: save_file({"embeddings": tensor}, str(tmp)))
    return {**asdict(config), "size": int(rows.shape[0])}


def load_rows(model_dir: Path, name: str, settings: dict[str, Any], what: str) -> torch.Tensor:
    """The rows a model config's `settings` name, checked against the size they record."""
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} names {what} in its config, but {path} is missing")
    rows = load_file(str(path))["embeddings"]
    if rows.shape[0] != settings.get("size", rows.shape[0]):
        raise ValueError(f"{path} holds {rows.shape[0]} rows, its config says {settings['size']}")
    return rows
