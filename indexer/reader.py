"""Input enumeration: a folder, a manifest or a text file in, one `Record` per input item out.

Every input the user gave becomes exactly one record, so the run can account for all of them:
a manifest row without an image path is still a record (rejected later with its reason).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.data import clean_caption, is_remote, manifest_columns, read_caption, read_manifest_rows
from models.images import image_files

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class Record:
    """One input item. `source` is unique within a run: the path relative to the data root (or,
    for rows that name no file, a synthetic `row:N` key)."""

    source: str
    path: Path | None  # None: a text-only item (a label) or a row that names no image
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    problem: str | None = None  # a reason to reject it before reading anything


@dataclass(frozen=True)
class Source:
    """What `open_source` found: the data root, the kind of input, and its records."""

    root: Path
    kind: str  # "folder" | "manifest" | "labels"
    records: list[Record]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.root), "kind": self.kind, "records": len(self.records)}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()  # a manifest may point outside its folder; keep it readable


def read_folder(folder: Path) -> Source:
    """Every image under `folder` (recursive; hidden ones left out, see `models.images.image_files`);
    a same-name `.txt` gives its caption (first line). A file name that is not UTF-8 (a Latin-1 name
    from an old disk) is a record rejected as `bad_file_name`: no JSON file or HTTP answer can carry it."""
    root = folder.resolve()
    records = []
    for path in image_files(root):
        source = _relative(path, root)
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:  # Python holds the name's undecodable bytes as lone surrogates
            shown = os.fsencode(source).decode("utf-8", "backslashreplace")
            records.append(Record(shown, None, problem="bad_file_name"))
            continue
        records.append(Record(source, path, read_caption(path) or ""))
    return Source(root, "folder", records)


def read_manifest(path: Path, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """A CSV/TSV/JSONL/Parquet manifest; image paths are relative to the manifest's folder."""
    rows = read_manifest_rows(path)
    image_key, caption_key = manifest_columns(path, rows, image_column, caption_column)
    root = path.resolve().parent
    records: list[Record] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, 1):
        if row.get("__invalid__"):
            records.append(Record(f"row:{number}", None, problem="invalid_row"))
            continue
        name = str(row.get(image_key) or "").strip() if image_key else ""
        caption = clean_caption(row.get(caption_key)) if caption_key else ""
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
        if not name:
            records.append(Record(f"row:{number}", None, caption, extra, problem="missing_image_path"))
            continue
        if is_remote(name):
            records.append(Record(name, None, caption, extra, problem="remote_url"))
            continue
        image = (root / name).resolve()
        source = _relative(image, root)
        if source in seen:  # the same file listed twice: one record is enough, the other is counted
            records.append(Record(f"row:{number}", None, caption, extra, problem="repeated_row"))
            continue
        seen.add(source)
        records.append(Record(source, image, caption, extra))
    return Source(root, "manifest", records)


def read_labels(path: Path) -> Source:
    """A plain text file: each non-empty line is a label or sentence for the text side only."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: list[Record] = []
    seen: set[str] = set()
    for line in lines:
        label = " ".join(line.split())
        if label and label not in seen:
            seen.add(label)
            records.append(Record(f"label:{len(records)}", None, label))
    return Source(path.resolve().parent, "labels", records)


def open_source(data: Path, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """Dispatch on what `data` is. Raises FileNotFoundError / ValueError with what was expected."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"no such file or folder: {data}")
    if data.is_dir():
        return read_folder(data)
    suffix = data.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return read_manifest(data, image_column, caption_column)
    if suffix in TEXT_SUFFIXES:
        return read_labels(data)
    raise ValueError(
        f"{data}: expected a folder of images, a manifest ({', '.join(MANIFEST_SUFFIXES)}) "
        "or a text file of labels (.txt)"
    )


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fp:
        for line in fp:
            if line.strip():
                yield json.loads(line)
