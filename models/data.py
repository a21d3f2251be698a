"""Image-caption pairs: read from CSV / JSONL manifests, captioned folders and Karpathy-split JSON.

Readers never raise for a bad row: rows without an image path or with an empty caption are
skipped and counted in `PairSet.skipped` by reason, so every input row is accounted for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.images import image_files

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "filename", "url")
CAPTION_COLUMNS = ("caption", "text", "title", "label", "description")


@dataclass(frozen=True)
class Pair:
    """One training / evaluation example. `image` is an absolute path."""

    image: Path
    caption: str
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class PairSet:
    """Pairs read from one source, plus the count of rows skipped and why."""

    pairs: list[Pair]
    root: Path
    skipped: Counter[str] = field(default_factory=Counter)
    split_of: dict[Path, str] = field(default_factory=dict)  # Karpathy: image -> train/val/test

    @property
    def rows(self) -> int:
        return len(self.pairs) + sum(self.skipped.values())


def is_remote(name: str) -> bool:
    """An image named by URL ("https://...", "s3://..."): nothing here downloads, and as a path it
    would turn into a file name that does not exist ("http:/host/a.png")."""
    # a scheme as RFC 3986 spells it, two characters at least: "C://x" is a drive, not a scheme
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", name) is not None


def clean_caption(text: Any) -> str:
    """First line of a caption, whitespace collapsed; '' for missing values."""
    if text is None:
        return ""
    lines = str(text).strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def pick_column(columns: list[str], wanted: tuple[str, ...], explicit: str | None, what: str) -> str | None:
    if explicit:
        if explicit not in columns:
            raise ValueError(f"manifest has no {what} column {explicit!r}; columns: {columns}")
        return explicit
    lowered = {c.lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


_SURROGATES = re.compile("[\ud800-\udfff]")


def without_surrogates(value: Any) -> Any:
    """`value` with every lone UTF-16 surrogate replaced by U+FFFD, in nested lists and dicts too.
    JSON may spell them (`"\\udce9"`: Python's json.dumps writes an undecodable file name so), and no
    UTF-8 file or HTTP answer can hold one; U+FFFD is what undecodable bytes read as elsewhere."""
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, list):
        return [without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    return value


def _manifest_text(path: Path) -> str:
    """A text manifest's content. A byte-order mark (Excel's "CSV UTF-8") is dropped; text in
    another encoding is a ValueError that says what to do."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8 (Excel: 'CSV UTF-8'), or convert it: iconv -f latin1 -t utf-8") from None


def read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV/JSONL/Parquet file as dicts; a JSONL line that is not an object becomes
    `{"__invalid__": True}` so the caller can count it."""
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix == ".tsv":
        text = _manifest_text(path)
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows: list[dict[str, Any]] = []
        for number, line in enumerate(_manifest_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                logger.warning("%s:%d: not JSON (%s); row skipped", path, number, exc.msg)
                rows.append({"__invalid__": True})
                continue
            rows.append(without_surrogates(row) if isinstance(row, dict) else {"__invalid__": True})
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # optional: only parquet manifests need it

        return list(pq.read_table(path).to_pylist())
    raise ValueError(f"unsupported manifest type {path.suffix!r} (use .csv, .tsv, .jsonl or .parquet)")


def manifest_columns(
    path: Path, rows: list[dict[str, Any]], image_column: str | None, caption_column: str | None
) -> tuple[str | None, str | None]:
    """(image column, caption column) of a manifest: the named ones, else the first known names.
    Raises ValueError when a named column is absent or no image column can be found."""
    columns = sorted({key for row in rows for key in row if key != "__invalid__"})
    image_key = pick_column(columns, IMAGE_COLUMNS, image_column, "image")
    caption_key = pick_column(columns, CAPTION_COLUMNS, caption_column, "caption")
    if rows and image_key is None:
        raise ValueError(f"{path}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); columns: {columns}")
    return image_key, caption_key


def read_manifest(
    path: Path, image_column: str | None = None, caption_column: str | None = None
) -> PairSet:
    """Read a CSV/TSV/JSONL/Parquet manifest; image paths are relative to the manifest's folder."""
    rows = read_manifest_rows(path)
    image_key, caption_key = manifest_columns(path, rows, image_column, caption_column)
    root = path.resolve().parent
    result = PairSet(pairs=[], root=root)
    for row in rows:
        if row.get("__invalid__"):
            result.skipped["invalid_row"] += 1
            continue
        image = str(row.get(image_key) or "").strip() if image_key else ""
        caption = clean_caption(row.get(caption_key)) if caption_key else ""
        if not image:
            result.skipped["missing_image_path"] += 1
            continue
        if is_remote(image):
            result.skipped["remote_url"] += 1
            continue
        if not caption:
            result.skipped["empty_caption"] += 1
            continue
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
        result.pairs.append(Pair((root / image).resolve(), caption, extra))
    return result


def caption_file(image: Path) -> Path | None:
    """The image's same-name caption file, `.txt` or `.TXT` (datasets made on Windows), if any."""
    for suffix in (".txt", ".TXT"):
        if (text_file := image.with_suffix(suffix)).is_file():
            return text_file
    return None


def read_caption(image: Path) -> str | None:
    """The first line of the image's caption file (`caption_file`), cleaned; None when it has none."""
    text_file = caption_file(image)
    return None if text_file is None else clean_caption(text_file.read_text(encoding="utf-8", errors="replace"))


def read_captioned_folder(folder: Path) -> PairSet:
    """Every image under `folder` (recursive; hidden ones left out, see `images.image_files`) whose
    same-name `.txt` has a non-empty first line."""
    root = folder.resolve()
    result = PairSet(pairs=[], root=root)
    for image in image_files(root):
        caption = read_caption(image)
        if caption is None:
            result.skipped["missing_caption"] += 1
            continue
        if not caption:
            result.skipped["empty_caption"] += 1
            continue
        result.pairs.append(Pair(image, caption))
    return result


def read_karpathy(path: Path, images_root: Path, split: str | Sequence[str] | None = "test") -> PairSet:
    """Karpathy-split JSON (Flickr30k / COCO): every sentence of every image in `split`, one name or
    several ("train", "restval"); None: all. Raises ValueError when the file is not such a JSON, or
    when no image is in `split` (naming the splits it has); an entry without a file name is skipped
    and counted (`invalid_row`)."""
    wanted = None if split is None else {split} if isinstance(split, str) else set(split)
    if not images_root.is_dir():
        raise FileNotFoundError(f"--images-root {images_root} is not a folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a Karpathy-split JSON: it needs an \"images\" list "
                         '(entries with "filename", "split" and "sentences")')
    root = images_root.resolve()
    result = PairSet(pairs=[], root=root)
    splits: Counter[str] = Counter()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            result.skipped["invalid_row"] += 1
            continue
        splits[str(entry.get("split"))] += 1
        if wanted is not None and entry.get("split") not in wanted:
            continue
        image = (root / str(entry.get("filepath", "")) / entry["filename"]).resolve()
        result.split_of[image] = str(entry.get("split"))
        for sentence in entry.get("sentences") or []:
            if not isinstance(sentence, dict):
                result.skipped["invalid_row"] += 1
                continue
            caption = clean_caption(str(sentence.get("raw") or " ".join(map(str, sentence.get("tokens") or []))))
            if caption:
                result.pairs.append(Pair(image, caption))
            else:
                result.skipped["empty_caption"] += 1
    if wanted is not None and splits and not any(splits[name] for name in wanted):
        raise ValueError(f"{path} has no image in split {' or '.join(sorted(wanted))!r}; its splits: "
                         + ", ".join(f"{name} ({n})" for name, n in sorted(splits.items())))
    return result


def read_pairs(
    source: Path,
    image_column: str | None = None,
    caption_column: str | None = None,
    images_root: Path | None = None,
    karpathy_split: str | Sequence[str] | None = "test",
) -> PairSet:
    """Read pairs from a folder, a manifest, or (with `images_root`) a Karpathy JSON."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {source}")
    if source.is_dir():
        return read_captioned_folder(source)
    if source.suffix.lower() == ".json":
        if images_root is None:
            raise ValueError("a Karpathy-split JSON needs --images-root (the folder holding its images)")
        return read_karpathy(source, images_root, karpathy_split)
    return read_manifest(source, image_column, caption_column)


def split_key(image: Path, root: Path) -> str:
    """Key deciding an image's held-out membership: its path relative to the data root.

    A `_mirror` variant shares its original's key, so the two never straddle the split.
    """
    try:
        relative = image.relative_to(root)
    except ValueError:
        relative = image
    stem = relative.stem.removesuffix("_mirror")
    return str(relative.with_name(stem))


def pair_split_key(pair: Pair, root: Path) -> str:
    """A pair's split key: its `group` column when set (rows of one group, such as two drawings
    of one object, always land on the same side), else its image's `split_key`."""
    group = pair.extra.get("group")
    return str(group) if group else split_key(pair.image, root)


def is_held_out(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic membership of the held-out split, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_pairs(pair_set: PairSet, fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by image (or by `group`, see `pair_split_key`), so all captions of one
    image land on the same side.

    A row whose `split` column says "train" is always trained on (extra data that is never part
    of the evaluation set).
    """
    train: list[Pair] = []
    held: list[Pair] = []
    for pair in pair_set.pairs:
        key = pair_split_key(pair, pair_set.root)
        pinned = pair.extra.get("split") == "train"
        (held if not pinned and is_held_out(key, fraction, seed) else train).append(pair)
    return train, held
