"""LiT-style locked towers: which parameters and state entries a locked tower freezes, and the
train/eval modes it keeps while the other tower trains."""

from __future__ import annotations

from typing import Any

import torch

from models.encoder import is_text_side


def text_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the text tower's parameters (everything but the image tower and the temperature)."""
    return [n for n, _ in model.named_parameters() if is_text_side(n)]


def lock_towers(model: torch.nn.Module, lock_text: bool, lock_image: bool) -> None:
    """Freeze whole towers (LiT). Locked towers also stay in eval mode (dropout, batch-norm stats)."""
    text_names = set(text_parameter_names(model))
    for name, param in model.named_parameters():
        if (lock_text and name in text_names) or (lock_image and name.startswith("visual.")):
            param.requires_grad_(False)


def locked_state_keys(model: torch.nn.Module, lock_text: bool, lock_image: bool) -> set[str]:
    """State-dict entries of the locked towers, weights and buffers alike: training never changes
    them (`lock_towers` freezes their weights, `set_train_mode` their batch-norm statistics)."""
    return {key for key in model.state_dict()
            if (lock_image and key.startswith("visual.")) or (lock_text and is_text_side(key))}


def set_train_mode(model: Any, lock_text: bool, lock_image: bool) -> None:
    """Training mode for the trained towers; a locked tower stays in eval mode (its dropout off,
    its batch-norm statistics unchanged)."""
    model.train()
    if lock_image:
        model.visual.eval()
    if lock_text:
        for name, module in model.named_children():
            if name not in ("visual",):
                module.eval()
