"""On-disk formats of models: project model directories and resumable training checkpoints.

A project model directory holds `open_clip_config.json` (open_clip's own `local-dir:` format plus
a `clipsearch` section) and either `open_clip_model.safetensors` (every weight; open_clip loads the
directory as `local-dir:DIR`) or `trained/parts.safetensors` (only the trained weights; the frozen
pretrained towers are loaded from their own source). Every file is written atomically.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "open_clip_config.json"
FULL_WEIGHTS_NAME = "open_clip_model.safetensors"
# Kept in a subfolder so open_clip's `local-dir:` loader does not mistake it for full weights.
PARTIAL_WEIGHTS_NAME = "trained/parts.safetensors"
TRAIN_STATE_PATTERN = "step_{step:08d}.pt"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; published artefacts are read by other users
        with open(tmp, "rb+") as fp:
            os.fsync(fp.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), so that
    neither name is ever missing. False where the system or file system cannot, and nothing moved."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or another libc
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without it
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def foreign_entries(folder: Path, ours: Collection[str] | Callable[[str], bool],
                    passing_prefix: str | None = None) -> str:
    """The names in `folder` that its writer does not write (not in `ours`, or not passing it when
    it is a test of a name; nor starting with `passing_prefix`), sorted and shortened for a message
    ("a, b, c, ..."); '' when there are none or no folder. Writers that prune or replace what they
    find call it before touching anything."""
    if not folder.is_dir():
        return ""
    known = ours if callable(ours) else ours.__contains__
    names = sorted(p.name for p in folder.iterdir()
                   if not known(p.name) and not (passing_prefix and p.name.startswith(passing_prefix)))
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def publish_dir(target: Path, build: Callable[[Path], object], marker: str) -> Path:
    """Build a directory with `build(staging)` beside `target`, then put it in `target`'s place.

    Readers never see a half-written directory: if `build` raises, `target` is left as it was and
    the staging folder is removed. On Linux the old and the new directory trade places in one
    atomic step, so `target` is never missing. Elsewhere the swap is two renames (old out, new in),
    with `target` missing between them; a kill there leaves the complete new directory as
    `TARGET.tmp`. What a killed publish leaves is cleared by the next one.

    Only a directory of the same kind is replaced: one holding `marker` (a data pack's
    `pack.json`, a model's config), or an empty one. Anything else at `target` (a file, a folder
    of photos given by mistake) raises FileExistsError before any work and is left alone; so does
    a file where the staging or retired folder goes.
    """
    staging = target.with_name(target.name + ".tmp")
    retired = target.with_name(target.name + ".old")
    if target.exists() and not (target.is_dir() and ((target / marker).is_file() or not any(target.iterdir()))):
        raise FileExistsError(f"{target} exists and is not what this writes (no {marker} in it): "
                              "choose another path, or remove it first")
    for stale in (staging, retired):  # left by a run killed mid-publish
        if stale.exists() and not stale.is_dir():
            raise FileExistsError(f"{stale} is a file where a working folder goes: move it away")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and exchange_dirs(staging, target):
        retired = staging  # now holds the old directory
    else:
        if target.exists():
            target.rename(retired)
        staging.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(retired, ignore_errors=True)
    return target


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_npy(path: Path, array: Any) -> None:
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fp:
            np.save(fp, array)

    atomic_write(path, write)


def write_npy_rows(path: Path, shape: tuple[int, int], dtype: Any, chunks: Iterable[Any]) -> None:
    """Write a 2-d `.npy` of `shape` and `dtype` from its rows in consecutive chunks, never holding
    the whole array (a million vectors of 384 dimensions: 1.5 GB); the file as `np.save` writes it.
    Raises `ValueError` when the chunks do not fill `shape` exactly."""
    import numpy as np

    kind = np.dtype(dtype)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fp:
            np.lib.format.write_array_header_1_0(
                fp, {"descr": np.lib.format.dtype_to_descr(kind), "fortran_order": False, "shape": shape})
            rows = 0
            for chunk in chunks:
                block = np.ascontiguousarray(chunk, dtype=kind)
                if block.ndim != 2 or block.shape[1] != shape[1]:
                    raise ValueError(f"{path}: a chunk of shape {block.shape} in an array of shape {shape}")
                fp.write(block.tobytes())
                rows += len(block)
            if rows != shape[0]:
                raise ValueError(f"{path}: {rows} rows written for an array of {shape[0]}")

    atomic_write(path, write)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model_dir(
    out_dir: Path,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    preprocess_config: dict[str, Any],
    meta: dict[str, Any],
    only: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a model directory. `only`: parameter-name prefixes to keep (a partial directory).

    `dtype` stores floating weights in a smaller type (e.g. float16 for a committed checkpoint);
    they are cast back to the model's dtype on load.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _contiguous(model.state_dict())
    if only is not None:
        prefixes = tuple(only)
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    name = FULL_WEIGHTS_NAME if only is None else PARTIAL_WEIGHTS_NAME
    atomic_write(out_dir / name, lambda tmp: save_file(state, str(tmp)))
    config = {
        "model_cfg": model_config,
        "preprocess_cfg": preprocess_config,
        "clipsearch": {**meta, "weights": "full" if only is None else "partial"},
    }
    write_json(out_dir / CONFIG_NAME, config)  # written last: its presence means "complete"
    return out_dir


def read_model_dir(model_dir: Path) -> tuple[dict[str, Any], Path]:
    """Return (config, weights file) of a model directory, or raise FileNotFoundError."""
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: {CONFIG_NAME} is missing")
    config = json.loads(config_path.read_text())
    for name in (FULL_WEIGHTS_NAME, PARTIAL_WEIGHTS_NAME):
        if (model_dir / name).is_file():
            return config, model_dir / name
    raise FileNotFoundError(f"{model_dir} has no weights ({FULL_WEIGHTS_NAME} or {PARTIAL_WEIGHTS_NAME})")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_train_state(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write a resumable training checkpoint and prune older ones, keeping the newest `keep`."""
    ckpt_dir = run_dir / "checkpoints"
    path = ckpt_dir / TRAIN_STATE_PATTERN.format(step=step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_train_state(run_dir: Path) -> Path | None:
    """Newest complete training checkpoint of a run, if any (temp files are never matched)."""
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_train_state(path: Path) -> dict[str, Any]:
    # Our own checkpoints hold optimizer state and RNG states, which are not plain tensors.
    return torch.load(path, map_location="cpu", weights_only=False)
