"""The embedding stage: records in, one `Outcome` per record out, in input order.

Reading, hashing, decoding and preprocessing run in a pool of worker threads (Pillow and torch
release the GIL for the heavy parts) while the main thread runs the model on full batches, so
decoding overlaps encoding. Files whose content hash is already known (an earlier index, or an
earlier file of this run) are never decoded again.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from indexer.reader import Record
from models.images import ImageLimits, ImageRejected, decode_image

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one record. `kind`: embedded | reused | duplicate | text | rejected."""

    record: Record
    kind: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    vector: np.ndarray | None = None  # (D,) float32 for embedded / reused
    reason: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Previous:
    """What the published index already holds, by file sha256: its row, width and height.

    Vectors stay in the index's memory-mapped `embeddings.npy` until a file is actually reused,
    so an incremental run over a large index does not hold every old vector in memory.
    """

    def __init__(self, embeddings: np.ndarray | None = None,
                 rows: dict[str, tuple[int, int, int]] | None = None) -> None:
        self.embeddings = embeddings
        self.rows = rows or {}

    def __contains__(self, sha: object) -> bool:
        return sha in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, sha: str) -> tuple[int, int]:
        """(width, height) of a known file, as recorded when it was decoded."""
        _, width, height = self.rows[sha]
        return width, height

    def take(self, sha: str) -> tuple[np.ndarray, int, int]:
        """(float32 vector, width, height) of a known file."""
        assert self.embeddings is not None
        row, width, height = self.rows[sha]
        return np.array(self.embeddings[row], dtype=np.float32), width, height


@dataclass
class Prepared:
    """A file read, hashed and (unless its hash was known) decoded + preprocessed."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None
    rejection: ImageRejected | None = None


def prepare_file(path: Path, preprocess: Callable[[Any], torch.Tensor], limits: ImageLimits,
                 known: Callable[[str], bool]) -> Prepared:
    """Read, hash and (unless `known(hash)`) decode + preprocess one file. Never raises."""
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageRejected("too_large", f"file is {size:,} bytes, over {limits.max_bytes:,}")
        data = path.read_bytes()
    except ImageRejected as exc:
        return Prepared(rejection=exc)
    except OSError as exc:
        return Prepared(rejection=ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}"))
    sha = hashlib.sha256(data).hexdigest()
    if known(sha):
        return Prepared(sha)
    try:
        image = decode_image(data, limits)
        return Prepared(sha, image.width, image.height, preprocess(image))
    except ImageRejected as exc:
        return Prepared(sha, rejection=exc)
    except Exception as exc:  # noqa: BLE001 - one odd file must never end the run
        logger.debug("unexpected error preparing %s", path, exc_info=True)
        return Prepared(sha, rejection=ImageRejected("invalid_image", f"cannot decode image: {exc}"))


def settle_without_file(record: Record) -> Outcome | None:
    """The outcome of a record that needs no reading (a bad manifest row, a text-only label)."""
    if record.problem is not None:
        return Outcome(record, "rejected", reason=record.problem,
                       message=_PROBLEMS.get(record.problem, record.problem))
    if record.path is None:
        return Outcome(record, "text")
    return None




def resolve(record: Record, sha: str, rejection: ImageRejected | None, fresh: bool, seen: dict[str, str],
            previous: Previous, max_pixels: int) -> Outcome | None:
    """The outcome of a read file unless it needs its new vector (None): rejected, a duplicate of a
    file seen earlier in this run, or reused from the published index. Records it in `seen`.
    A reused file is held to this run's pixel limit by its recorded size, as it is not decoded
    again: a run with a lower `--max-pixels` kept every large image of the previous version."""
    if rejection is not None:
        return Outcome(record, "rejected", sha, reason=rejection.reason, message=rejection.message)
    if sha in seen:
        return Outcome(record, "duplicate", sha, extra={"of": seen[sha]})
    if not fresh:  # known from the published index (a file seen earlier in this run is handled above)
        width, height = previous.size(sha)
        if width * height > max_pixels:
            return Outcome(record, "rejected", sha, reason="too_large",
                           message=f"image is {width}x{height} pixels, over the limit of {max_pixels:,}")
        seen[sha] = record.source
        vector, width, height = previous.take(sha)
        return Outcome(record, "reused", sha, width, height, vector)
    seen[sha] = record.source
    return None


Work = tuple[int, Record, Prepared]  # a record's position in the input, the record, what reading it gave
T = TypeVar("T")
R = TypeVar("R")


def _ordered(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """`pool.map` with at most `window` items in flight, so memory stays bounded on huge inputs."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class Embedder:
    """Turns records into outcomes with one encoder. `previous`: what the published index already
    holds (incremental runs); `seen`: sha256 -> source of the files indexed this run."""

    def __init__(self, encoder: Any, batch_size: int = 64, workers: int = 4,
                 limits: ImageLimits = ImageLimits(), previous: Previous | None = None) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.limits = limits
        self.previous = previous if previous is not None else Previous()
        self.seen: dict[str, str] = {}

    def _known(self, sha: str) -> bool:
        return sha in self.previous or sha in self.seen

    def run(self, records: Iterable[Record]) -> Iterator[Outcome]:
        """Outcomes in input order (one per record)."""
        batch: list[tuple[int, Record, Prepared]] = []
        ready: dict[int, Outcome] = {}
        next_out = 0

        def flush() -> None:
            pixels = torch.stack([p.pixels for _, _, p in batch if p.pixels is not None])
            vectors = self.encoder.encode_image_tensors(pixels)
            for (position, record, p), vector in zip(batch, vectors, strict=True):
                ready[position] = Outcome(record, "embedded", p.sha256, p.width, p.height, vector)
            batch.clear()

        def work(item: tuple[int, Record]) -> Work:
            position, record = item
            assert record.path is not None  # `_with_paths` passes on only records that name a file
            return position, record, prepare_file(record.path, self.encoder.preprocess, self.limits, self._known)

        # Each record carries its position from the input on: records settled without a file (a URL,
        # a label) are put in `ready` ahead of the reading, and a count kept here would drift from the
        # input's whenever one of them had already been handed on (a good image then took the place of
        # a rejected one, and was never handed on itself).
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            for position, record, prepared in _ordered(pool, work, self._with_paths(records, ready),
                                                       self.batch_size * 4):
                outcome = resolve(record, prepared.sha256, prepared.rejection, prepared.pixels is not None,
                                  self.seen, self.previous, self.limits.max_pixels)
                if outcome is None:
                    batch.append((position, record, prepared))
                    if len(batch) >= self.batch_size:
                        flush()
                else:
                    ready[position] = outcome
                while next_out in ready:
                    yield ready.pop(next_out)
                    next_out += 1
            if batch:
                flush()
            while next_out in ready:
                yield ready.pop(next_out)
                next_out += 1

    def _with_paths(self, records: Iterable[Record], ready: dict[int, Outcome]) -> Iterator[tuple[int, Record]]:
        """Pass on (position, record) for records that name a file; settle the others at once (in
        `ready`, by position)."""
        for position, record in enumerate(records):
            settled = settle_without_file(record)
            if settled is None:
                yield position, record
            else:
                ready[position] = settled


_PROBLEMS = {
    "bad_file_name": "the file name is not valid UTF-8 (an old encoding); rename the file (convmv does this)",
    "invalid_row": "manifest row is not a JSON object",
    "missing_image_path": "manifest row has no image path",
    "repeated_row": "manifest lists this image path again",
    "remote_url": "a URL, not a file: URLs are not downloaded; fetch the images first (img2dataset, say) "
                  "and list their local paths",
}
