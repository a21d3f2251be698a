"""Which autocast dtype a device and a precision setting give, for training and inference alike.

`auto` is mixed precision on CUDA (bf16 where the GPU has it, else fp16) and float32 on the CPU,
so that a CPU's results do not depend on whether it has native bf16; `bf16` asks for bf16 autocast
on the CPU too (the default model's towers 2.7-2.9x faster on the AMD EPYC of README's figures, but
training was slower in bf16 on an Intel Xeon without AMX: time it on the CPU at hand), `fp32` turns
autocast off everywhere. Weights stay float32 in every case: the model fingerprint, which
names the weights, does not change with the precision.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is asked for: CLIs import this module to list PRECISIONS
    import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
INFERENCE_HELP = ("auto (default): mixed precision on CUDA, float32 on the CPU; bf16: bf16 autocast on the CPU "
                  "too (2-3x faster on some CPUs with native bf16, slower on others: time it; the same space, "
                  "cosine to float32 above 0.999); fp32: none")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on `device` (None: float32). Raises ValueError for an unknown
    setting or bf16 on a GPU without it."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16: use precision 'auto' (fp16)")
        if device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast is emulated "
                           "and likely slower than float32 here")
        return torch.bfloat16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
