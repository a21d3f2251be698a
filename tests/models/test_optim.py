"""The optimiser side of training: the warmup + cosine schedule, CLIP's weight-decay exemptions and
the precision settings per device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.config import TrainConfig
from models.optim import amp_settings, create_optimizer, warmup_cosine


def test_warmup_rises_linearly_then_the_cosine_falls_to_zero_and_stays_there() -> None:
    factor = warmup_cosine(warmup=4, total=14)
    assert [factor(step) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.5)  # halfway through the 10 cosine steps
    assert factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))
    decay = [factor(step) for step in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert factor(14) == pytest.approx(0.0, abs=1e-12)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)  # past the end: held at zero, not rising again


def test_no_warmup_starts_at_the_peak() -> None:
    factor = warmup_cosine(warmup=0, total=10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(5) == pytest.approx(0.5)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))


def test_gains_biases_norms_and_the_temperature_are_exempt_from_weight_decay(tmp_path: Path) -> None:
    model = _Tiny()
    optimizer = create_optimizer(model, TrainConfig(output_dir=tmp_path, lr=1e-3, weight_decay=0.3))
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 0.3 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in exempt["params"]} == {
        id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.logit_scale)}
    # a frozen (locked) parameter is in no group: the optimizer never touches it
    assert all(p is not model.frozen.weight for group in optimizer.param_groups for p in group["params"])
    assert decayed["lr"] == 1e-3


def test_precision_settings_per_device() -> None:
    """float32 on the CPU unless bf16 is asked for; an unknown precision is refused by name."""
    cpu = torch.device("cpu")
    assert amp_settings(cpu, "auto") == (None, None)
    assert amp_settings(cpu, "fp32") == (None, None)
    assert amp_settings(cpu, "bf16") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        amp_settings(cpu, "fp16")
