"""The on-disk index format, its publication and `load_index`: the only module `app/` imports.

An index directory `OUT/` holds published versions and a `current` symlink naming the live one:

    OUT/current -> versions/20261124T203000-1a2b3c
    OUT/versions/<version>/manifest.json      format, model fingerprint, counts, files + sha256
                           embeddings.npy     image vectors (N, D), float32 or float16, id order
                           metadata.jsonl     one row per id: source, duplicates, caption, size, sha256, extra
                           image.faiss        the image index (CPU form)
                           texts.jsonl        one row per text id: text, ids of the items it captions
                           text_embeddings.npy, text.faiss   the text side (image -> text search)
                           rejects.jsonl      inputs that were not indexed, with their reason
    OUT/work/                                 shards of a run in progress
    OUT/.trash-*/                             a directory being removed (see `remove_dir`)
    OUT/.lock                                 held by the one indexer writing OUT (see `writer_lock`)

A version is written completely (every file fsynced, the manifest last) and checked by loading it
before `current` is swapped to it with one atomic rename, so readers only ever see complete
indexes; nothing is ever rewritten in place (a server may have the old files mapped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models import folder_lock
from models.checkpoint import foreign_entries, fsync_dir
from models.encoder import ModelFingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"
WORK = "work"
# Everything an index directory holds besides `.trash-*` (see `remove_dir`): runs refuse a folder
# with anything else in it, as they prune `versions/` and replace `work/`.
INDEX_ENTRIES = frozenset({CURRENT, VERSIONS, WORK, folder_lock.LOCK_NAME, f".{CURRENT}.tmp"})
TRASH_PREFIX = ".trash-"
# what `new_version_dir` names a version: runs prune only folders so named
VERSION_NAME = re.compile(r"\d{8}T\d{6}-[0-9a-f]{6}")
FILES = ("embeddings.npy", "metadata.jsonl", "image.faiss", "texts.jsonl", "text_embeddings.npy",
         "text.faiss", "rejects.jsonl")


class InvalidIndex(ValueError):
    """An index directory that is missing, incomplete, corrupt or of an unknown format."""


# Another indexer is writing the same index directory (the name indexer callers know it by).
IndexBusy = folder_lock.FolderBusy
INDEX_WRITER = "indexer is writing this index"
# FAISS reads flat vector codes (Flat, and HNSW's stored vectors) by mapping the file instead of
# copying it: replicas of the server on one host share those pages through the page cache, and the
# indexer's read-back checks cost the graph, not another copy of every vector (1.5 GB a million).
FAISS_READ_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)  # FAISS >= 1.10; older ones read a copy


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def search_parameters(factory: str, search_params: dict[str, int],
                      selector: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """Per-call FAISS search parameters (thread-safe, unlike setting them on the shared index),
    with `selector` (the ids a filter allows) when given."""
    chosen: dict[str, Any] = {} if selector is None else {"sel": selector}
    if factory.startswith("HNSW") and "efSearch" in search_params:
        return faiss.SearchParametersHNSW(efSearch=int(search_params["efSearch"]), **chosen)  # type: ignore[attr-defined]
    if factory.startswith("IVF") and "nprobe" in search_params:
        return faiss.SearchParametersIVF(nprobe=int(search_params["nprobe"]), **chosen)  # type: ignore[call-arg]
    return faiss.SearchParameters(**chosen) if chosen else None


@dataclass
class LoadedIndex:
    """A published index in memory. Ids are row numbers of `embeddings` / `metadata`."""

    directory: Path
    manifest: dict[str, Any]
    image_index: faiss.Index
    text_index: faiss.Index
    embeddings: np.ndarray  # (N, D) memory-mapped
    metadata: list[dict[str, Any]]
    texts: list[dict[str, Any]]
    text_embeddings: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.manifest["model"])

    @property
    def version(self) -> str:
        return self.directory.name


def read_faiss(path: Path) -> faiss.Index:
    """A FAISS index from a file, its flat codes memory-mapped (see `FAISS_READ_FLAGS`)."""
    return faiss.read_index(str(path), FAISS_READ_FLAGS)


def resolve_version(path: Path) -> Path:
    """The version directory that `path` names: itself (a version) or its `current` link."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / CURRENT).exists():
        return (path / CURRENT).resolve()
    raise InvalidIndex(f"{path} holds no published index (no {MANIFEST} and no {CURRENT} link)")


def read_jsonl_rows(path: Path, rows_per_parse: int = 1000) -> list[dict[str, Any]]:
    """The rows of a JSONL file we wrote, parsed a thousand at a time as JSON arrays: one parser call
    shares each key's string among its rows, where a call per line gave every row its own copies (a
    million items' metadata: 750 MB instead of 1,268 MB in memory, read in 5.1 s instead of 6.8).
    Not the whole file in one call: a parser call holds the interpreter, and a server reloading
    its index must keep answering meanwhile (one call on a million rows held it for 4 s)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(lines), rows_per_parse):
        rows.extend(json.loads("[" + ",".join(lines[start:start + rows_per_parse]) + "]"))
    return rows


def load_index(path: Path, expected: ModelFingerprint | None = None, verify: bool = True) -> LoadedIndex:
    """Load a published index. Raises `InvalidIndex` naming the bad file, or `FingerprintMismatch`
    when `expected` (the serving model) is not the model the index was built with.

    `verify`: check every file's sha256 against the manifest (a flipped byte is caught).
    """
    directory = resolve_version(path)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidIndex(f"{directory / MANIFEST}: unreadable manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidIndex(f"{directory}: index format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    if expected is not None:
        expected.ensure_matches(ModelFingerprint.from_dict(manifest["model"]), f"index {directory}")
    for name, info in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise InvalidIndex(f"{file}: missing")
        if file.stat().st_size != info["size"] or (verify and file_digest(file) != info["sha256"]):
            raise InvalidIndex(f"{file}: content does not match the manifest (corrupt or changed)")
    try:
        loaded = LoadedIndex(
            directory=directory,
            manifest=manifest,
            image_index=read_faiss(directory / "image.faiss"),
            text_index=read_faiss(directory / "text.faiss"),
            embeddings=np.load(directory / "embeddings.npy", mmap_mode="r"),
            metadata=read_jsonl_rows(directory / "metadata.jsonl"),
            texts=read_jsonl_rows(directory / "texts.jsonl"),
            text_embeddings=np.load(directory / "text_embeddings.npy", mmap_mode="r"),
        )
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError) as exc:
        raise InvalidIndex(f"{directory}: cannot read index files ({exc})") from None
    counts = (loaded.image_index.ntotal, len(loaded.metadata), len(loaded.embeddings))
    if len(set(counts)) != 1 or loaded.text_index.ntotal != len(loaded.texts):
        raise InvalidIndex(f"{directory}: files disagree on the number of items {counts}")
    return loaded


# -- writing -------------------------------------------------------------------------------------
def foreign_to_index(out_dir: Path) -> str:
    """What in `out_dir` no indexer run wrote, for a message ('' when nothing): names beside the
    index's own, and folders in `versions/` not named as versions are (runs prune those)."""
    top = foreign_entries(out_dir, INDEX_ENTRIES, TRASH_PREFIX)
    versions = foreign_entries(out_dir / VERSIONS, lambda name: VERSION_NAME.fullmatch(name) is not None,
                               TRASH_PREFIX)
    return "; ".join(part for part in (top, versions and f"in {VERSIONS}/: {versions}") if part)


def new_version_dir(out_dir: Path) -> Path:
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()
    path = out_dir / VERSIONS / name
    path.mkdir(parents=True)
    return path


def write_faiss(index: faiss.Index, path: Path) -> None:
    """`faiss.write_index` truncates in place and only prints a failed close: write to a temp
    name, fsync, read back, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    with tmp.open("rb+") as fp:
        os.fsync(fp.fileno())
    if read_faiss(tmp).ntotal != index.ntotal:
        raise OSError(f"{tmp}: FAISS index did not read back whole")
    os.replace(tmp, path)


def finish_version(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Record every file's digest in the manifest and write it last (its presence = complete)."""
    from models.checkpoint import write_json

    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {
        name: {"size": (version_dir / name).stat().st_size, "sha256": file_digest(version_dir / name)}
        for name in FILES
    }
    fsync_dir(version_dir)
    write_json(version_dir / MANIFEST, manifest)


def ensure_not_busy(out_dir: Path) -> None:
    """Raise `IndexBusy` now if another indexer holds `out_dir`. Front ends call this before the
    model load (seconds) so a refused run is refused at once; the run still takes the lock itself."""
    folder_lock.ensure_not_busy(out_dir, INDEX_WRITER)


def writer_lock(out_dir: Path) -> AbstractContextManager[None]:
    """Hold `OUT/.lock` for one indexing run (`models.folder_lock`). Two runs on one directory would
    share (and wreck) its work shards; the second is refused at once with `IndexBusy`."""
    return folder_lock.folder_lock(out_dir, INDEX_WRITER)


def remove_dir(path: Path) -> None:
    """Remove a directory so that no reader ever sees it half deleted: rename it away in one step,
    then delete the renamed tree. A kill during the delete leaves only a `.trash-*` directory, which
    `sweep_trash` removes on the next run. (`shutil.rmtree` alone, killed midway, once left a work
    directory whose shard index survived its vectors, and the next run failed on it.)"""
    if not path.exists():
        return
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{os.urandom(4).hex()}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(directory: Path) -> None:
    """Finish the removals a killed run left behind (see `remove_dir`)."""
    if directory.is_dir():
        for trash in directory.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(trash, ignore_errors=True)


def publish(out_dir: Path, version_dir: Path, keep: int = 2) -> None:
    """Point `current` at `version_dir` atomically (after checking it loads); prune old versions."""
    # never publish what we cannot read back; the digests are not recomputed: `finish_version` took
    # them from these very files a moment ago (a second pass over gigabytes at a million items)
    load_index(version_dir, verify=False)
    link = out_dir / CURRENT
    tmp = out_dir / f".{CURRENT}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(VERSIONS) / version_dir.name)
    os.replace(tmp, link)
    fsync_dir(out_dir)
    live = version_dir.name
    others = sorted(p for p in (out_dir / VERSIONS).iterdir()
                    if p.is_dir() and p.name != live and VERSION_NAME.fullmatch(p.name))
    # a version without its manifest was cut short by a kill; it must not take the place of the
    # last complete one (the writer lock means no other run is still writing it)
    complete = [p for p in others if (p / MANIFEST).is_file()]
    stale = [p for p in others if p not in complete] + complete[: max(0, len(complete) - (keep - 1))]
    for old in stale:
        remove_dir(old)
