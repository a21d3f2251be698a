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
from typing import Any

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


@dataclass
class _Prepared:
    record: Record
    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None
    rejection: ImageRejected | None = None


def _prepare(record: Record, preprocess: Callable[[Any], torch.Tensor], limits: ImageLimits,
             known: Callable[[str], bool]) -> _Prepared:
    """Read, hash and (unless the hash is known) decode + preprocess one file. Never raises."""
    assert record.path is not None
    try:
        size = record.path.stat().st_size
        if size > limits.max_bytes:
            raise ImageRejected("too_large", f"file is {size:,} bytes, over {limits.max_bytes:,}")
        data = record.path.read_bytes()
    except ImageRejected as exc:
        return _Prepared(record, rejection=exc)
    except OSError as exc:
        return _Prepared(record, rejection=ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}"))
    sha = hashlib.sha256(data).hexdigest()
    if known(sha):
        return _Prepared(record, sha)
    try:
        image = decode_image(data, limits)
        return _Prepared(record, sha, image.width, image.height, preprocess(image))
    except ImageRejected as exc:
        return _Prepared(record, sha, rejection=exc)
    except Exception as exc:  # noqa: BLE001 - one odd file must never end the run
        logger.debug("unexpected error preparing %s", record.source, exc_info=True)
        return _Prepared(record, sha, rejection=ImageRejected("invalid_image", f"cannot decode image: {exc}"))


def _ordered(pool: ThreadPoolExecutor, work: Callable[[Record], _Prepared], records: Iterable[Record],
             window: int) -> Iterator[_Prepared]:
    """`pool.map` with at most `window` items in flight, so memory stays bounded on huge inputs."""
    pending: deque[Future[_Prepared]] = deque()
    for record in records:
        pending.append(pool.submit(work, record))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# sha256 of a file -> (its vector, width, height), taken from the published index
Previous = dict[str, tuple[np.ndarray, int, int]]


class Embedder:
    """Turns records into outcomes with one encoder. `previous`: what the published index already
    holds (incremental runs); `seen`: sha256 -> source of the files indexed this run."""

    def __init__(self, encoder: Any, batch_size: int = 64, workers: int = 4,
                 limits: ImageLimits = ImageLimits(), previous: Previous | None = None) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.limits = limits
        self.previous = previous or {}
        self.seen: dict[str, str] = {}

    def _known(self, sha: str) -> bool:
        return sha in self.previous or sha in self.seen

    def _finish(self, prepared: _Prepared) -> Outcome | None:
        """Outcome for anything but a fresh image (None: it needs the model)."""
        record = prepared.record
        if prepared.rejection is not None:
            return Outcome(record, "rejected", prepared.sha256, reason=prepared.rejection.reason,
                           message=prepared.rejection.message)
        if prepared.sha256 in self.seen:
            return Outcome(record, "duplicate", prepared.sha256, extra={"of": self.seen[prepared.sha256]})
        self.seen[prepared.sha256] = record.source
        if prepared.pixels is None:  # known from the published index: reuse its vector
            vector, width, height = self.previous[prepared.sha256]
            return Outcome(record, "reused", prepared.sha256, width, height, vector)
        return None

    def run(self, records: Iterable[Record]) -> Iterator[Outcome]:
        """Outcomes in input order (one per record)."""
        batch: list[tuple[int, _Prepared]] = []
        ready: dict[int, Outcome] = {}
        next_out = 0

        def flush() -> None:
            pixels = torch.stack([p.pixels for _, p in batch if p.pixels is not None])
            vectors = self.encoder.encode_image_tensors(pixels)
            for (position, p), vector in zip(batch, vectors, strict=True):
                ready[position] = Outcome(p.record, "embedded", p.sha256, p.width, p.height, vector)
            batch.clear()

        def work(record: Record) -> _Prepared:
            return _prepare(record, self.encoder.preprocess, self.limits, self._known)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            position = 0
            for prepared in _ordered(pool, work, self._with_paths(records, ready), self.batch_size * 4):
                while position in ready:  # rows that needed no reading (text, bad rows)
                    position += 1
                outcome = self._finish(prepared)
                if outcome is None:
                    batch.append((position, prepared))
                    if len(batch) >= self.batch_size:
                        flush()
                else:
                    ready[position] = outcome
                position += 1
                while next_out in ready:
                    yield ready.pop(next_out)
                    next_out += 1
            while position in ready:
                position += 1
            if batch:
                flush()
            while next_out in ready:
                yield ready.pop(next_out)
                next_out += 1

    def _with_paths(self, records: Iterable[Record], ready: dict[int, Outcome]) -> Iterator[Record]:
        """Pass on records that name a file; settle the others at once (in `ready`, by position)."""
        position = 0
        for record in records:
            if record.problem is not None:
                ready[position] = Outcome(record, "rejected", reason=record.problem,
                                          message=_PROBLEMS.get(record.problem, record.problem))
            elif record.path is None:
                ready[position] = Outcome(record, "text")
            else:
                yield record
            position += 1


_PROBLEMS = {
    "invalid_row": "manifest row is not a JSON object",
    "missing_image_path": "manifest row has no image path",
    "repeated_row": "manifest lists this image path again",
}
