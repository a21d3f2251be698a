"""A uniform average of the weights of several model directories of one architecture.

Snapshots of one training run (the end of each cosine cycle) lie in one basin of the loss, so
their tensor-wise mean is a model too, often better than either, at no extra serving cost
(Izmailov et al., "Averaging Weights Leads to Wider Optima", 2018; Wortsman et al., "Model
soups", 2022). Batch-norm running statistics are averaged like the weights; integer buffers (a
step counter) are taken from the last source. The last source's directory supplies everything
else (config, preprocess, caption bank).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models import checkpoint


def average_model_dirs(sources: Sequence[Path], target: Path) -> Path:
    """Write the tensor-wise mean of `sources`' weights (summed in float64, stored in each tensor's
    own dtype) as the model directory `target`, replacing it whole. Raises ValueError when the
    sources differ in architecture, tensor names or shapes."""
    if len(sources) < 2:
        raise ValueError(f"averaging needs at least two model directories, got {len(sources)}")
    configs, states = zip(*(_read(source) for source in sources), strict=True)
    first_config, first_state = configs[0], states[0]
    for source, config, state in zip(sources[1:], configs[1:], states[1:], strict=True):
        if config["model_cfg"] != first_config["model_cfg"]:
            raise ValueError(f"{source} has another architecture than {sources[0]}")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in first_state.items()}:
            raise ValueError(f"{source} holds other tensors (names or shapes) than {sources[0]}")
    averaged = {
        name: (
            (sum(state[name].double() for state in states) / len(states)).to(tensor.dtype)
            if tensor.is_floating_point()
            else states[-1][name]
        ).contiguous()
        for name, tensor in first_state.items()
    }
    def build(staging: Path) -> None:
        shutil.copytree(sources[-1], staging)
        config, weights_path = checkpoint.read_model_dir(staging)
        checkpoint.atomic_write(weights_path, lambda tmp: save_file(averaged, str(tmp)))
        # The last source's step count would describe one snapshot only: each source's goes here.
        config["clipsearch"].pop("trained_steps", None)
        config["clipsearch"]["averaged_from"] = [
            {"model": str(source), "trained_steps": c.get("clipsearch", {}).get("trained_steps")}
            for source, c in zip(sources, configs, strict=True)
        ]
        checkpoint.write_json(staging / checkpoint.CONFIG_NAME, config)

    return checkpoint.publish_dir(target, build, marker=checkpoint.CONFIG_NAME)


def _read(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, weights_path = checkpoint.read_model_dir(model_dir)
    return config, checkpoint.load_weights(weights_path)
