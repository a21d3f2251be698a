"""The optimiser side of a training run: AdamW with CLIP's weight-decay exemptions, the warmup +
cosine learning-rate schedule, and the mixed-precision settings of a device."""

from __future__ import annotations

import math
from typing import Any

import torch

from models.config import TrainConfig
from models.precision import autocast_dtype


def create_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; gains, biases, norms and the temperature are exempt from weight decay (as in CLIP)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "logit_scale" in name or "norm" in name or name.endswith(".bias")
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(warmup: int, total: int) -> Any:
    """The learning-rate factor of each step, for `LambdaLR`: a linear ramp to 1 over `warmup` steps,
    then half a cosine down to 0 at step `total`, held at 0 past it."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def amp_settings(device: torch.device, precision: str = "auto") -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The autocast dtype (None: float32; see `models.precision`) and, for float16, the gradient
    scaler a run uses. `auto` keeps the CPU in float32, so a recipe's trajectory does not depend on
    whether the CPU has native bf16 (the embedded default model is trained this way)."""
    dtype = autocast_dtype(device, precision)
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
