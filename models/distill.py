"""A trained model's image tower as the teacher of a training run (`TrainConfig.teacher`).

The teacher sees the very batch the model in training sees (the same crops and augmentations:
"consistent" teaching, Beyer et al. 2022) and is never trained. Its targets are only meaningful
in the embedding space the model learns, so it must share the model's text tower and pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.encoder import is_text_side, load_model_dir, state_digest

# The preprocess settings that decide what a batch tensor means to an image tower.
_PIXEL_SETTINGS = ("size", "mean", "std")


def same_text_tower(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    """Whether two models embed captions alike: equal text-tower tensors. Compared by value, not by
    digest: a tower built afresh and one loaded from a model directory may differ in the sign of a
    zero (the padding token's embedding row), equal values in other bytes."""
    ours = {k: v for k, v in one.state_dict().items() if is_text_side(k)}
    theirs = {k: v for k, v in other.state_dict().items() if is_text_side(k)}
    return ours.keys() == theirs.keys() and all(
        v.shape == theirs[k].shape and torch.equal(v.cpu(), theirs[k].cpu()) for k, v in ours.items())


@dataclass(frozen=True)
class Teacher:
    visual: torch.nn.Module  # eval mode, no gradients
    digest: str  # sha256 of its weights: a resumed run must be taught by the same teacher

    @classmethod
    def load(cls, model_dir: Path, student: torch.nn.Module, student_preprocess: Mapping[str, Any],
             device: torch.device) -> Teacher:
        """The image tower of the model in `model_dir`; ValueError when it cannot teach `student`."""
        loaded = load_model_dir(model_dir)
        if not same_text_tower(loaded.model, student):
            raise ValueError(f"the teacher {model_dir} has another text tower than the model in training: its "
                             "image embeddings live in another space; take a teacher trained against this text tower")
        theirs, ours = _pixels(loaded.preprocess_config), _pixels(student_preprocess)
        if theirs != ours:
            shown = ", ".join(f"{key} {theirs[key]} (the model in training: {ours[key]})"
                              for key in _PIXEL_SETTINGS if theirs[key] != ours[key])
            raise ValueError(f"the teacher {model_dir} expects other pixels: {shown}")
        visual: torch.nn.Module = loaded.model.visual  # type: ignore[assignment]  # open_clip types it loosely
        visual = visual.to(device).to(memory_format=torch.channels_last).eval()
        visual.requires_grad_(False)
        return cls(visual, state_digest(visual.state_dict()))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image embeddings, float32."""
        return F.normalize(self.visual(images).float(), dim=-1)


def _pixels(preprocess: Mapping[str, Any]) -> dict[str, tuple[float, ...] | None]:
    """The pixel settings as tuples: a size of 64 and one of [64, 64] mean the same input."""
    pixels: dict[str, tuple[float, ...] | None] = {}
    for key in _PIXEL_SETTINGS:
        value = preprocess.get(key)
        if isinstance(value, (int, float)):
            value = (value, value) if key == "size" else (value,)
        pixels[key] = None if value is None else tuple(float(v) for v in value)
    return pixels
