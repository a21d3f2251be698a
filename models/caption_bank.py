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
        features = F.normalize(features.float(), dim=-1)
        bank = self.embeddings.to(features.device)
        similarity = features @ bank.T  # (B, N)
        values, indices = similarity.topk(min(self.config.top_k, len(self)), dim=-1)
        weights = torch.softmax(values / self.config.temperature, dim=-1)  # (B, k)
        mixture = F.normalize(torch.einsum("bk,bkd->bd", weights, bank[indices]), dim=-1)
        blend = self.config.blend
        return F.normalize(blend * features + (1.0 - blend) * mixture, dim=-1)

    def digest(self) -> str:
        """sha256 of the embeddings and settings: part of the model fingerprint."""
        digest = hashlib.sha256(repr(sorted(asdict(self.config).items())).encode())
        digest.update(self.embeddings.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Write the embeddings into `model_dir`; return the settings for the directory's config."""
        tensor = self.embeddings.detach().to("cpu", dtype).contiguous()
        atomic_write(model_dir / BANK_FILE, lambda tmp: save_file({"embeddings": tensor}, str(tmp)))
        return {**asdict(self.config), "size": len(self)}

    @classmethod
    def load(cls, model_dir: Path, meta: dict[str, Any]) -> CaptionBank | None:
        """The bank a model directory's config names, or None when it names none."""
        settings = meta.get(CONFIG_KEY)
        if not settings:
            return None
        path = model_dir / BANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} names a caption bank in its config, but {path} is missing")
        embeddings = load_file(str(path))["embeddings"]
        if embeddings.shape[0] != settings.get("size", embeddings.shape[0]):
            raise ValueError(f"{path} holds {embeddings.shape[0]} captions, its config says {settings['size']}")
        config = CaptionBankConfig(**{k: v for k, v in settings.items() if k != "size"})
        return cls(embeddings, config)
