"""Numbered shards of outcomes in a work directory: what makes an indexing run resumable.

A shard is `shard_NNNNN.npy` (the vectors of its embedded/reused rows, float32 `(m, D)`) and
`shard_NNNNN.jsonl` (one row per record, in input order). Both are written atomically and the
`.jsonl` last, so a shard exists only when complete; a run killed at any point loses at most the
shard it was filling, and the next run skips every record that a complete shard accounts for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.artifacts import remove_dir
from indexer.embed import Outcome
from models.checkpoint import write_json, write_jsonl, write_npy

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass(frozen=True)
class ShardRow:
    """A record's outcome as stored in a shard (the vector lives in the shard's `.npy`)."""

    source: str
    kind: str
    sha256: str
    caption: str
    width: int
    height: int
    extra: dict[str, Any]
    reason: str
    message: str
    row: int  # row in the shard's vectors, -1 when the outcome has none

    @classmethod
    def from_outcome(cls, outcome: Outcome, row: int) -> ShardRow:
        record = outcome.record
        extra = dict(record.extra)
        extra.update(outcome.extra)
        return cls(record.source, outcome.kind, outcome.sha256, record.caption, outcome.width, outcome.height,
                   extra, outcome.reason, outcome.message, row)


class ShardWriter:
    """Collects outcomes and writes a shard every `shard_size` records."""

    def __init__(self, work_dir: Path, shard_size: int, start_index: int) -> None:
        self.work_dir = work_dir
        self.shard_size = shard_size
        self.next_index = start_index
        self.rows: list[ShardRow] = []
        self.vectors: list[np.ndarray] = []

    def add(self, outcome: Outcome) -> None:
        row = -1
        if outcome.vector is not None:
            row = len(self.vectors)
            self.vectors.append(np.asarray(outcome.vector, dtype=np.float32))
        self.rows.append(ShardRow.from_outcome(outcome, row))
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        stem = self.work_dir / f"shard_{self.next_index:05d}"
        vectors = np.stack(self.vectors) if self.vectors else np.zeros((0, 0), np.float32)
        write_npy(stem.with_suffix(".npy"), vectors)
        write_jsonl(stem.with_suffix(".jsonl"), (row.__dict__ for row in self.rows))
        self.next_index += 1
        self.rows, self.vectors = [], []


def iter_shards(work_dir: Path) -> Iterator[tuple[list[ShardRow], np.ndarray]]:
    """Complete shards in order: (rows, vectors), the vectors memory-mapped from their file."""
    for jsonl in sorted(work_dir.glob("shard_*.jsonl")):
        yield _shard_rows(jsonl), np.load(jsonl.with_suffix(".npy"), mmap_mode="r")


def iter_shard_vectors(work_dir: Path) -> Iterator[np.ndarray]:
    """The vectors of the complete shards in order, memory-mapped, their rows left unread."""
    for jsonl in sorted(work_dir.glob("shard_*.jsonl")):
        yield np.load(jsonl.with_suffix(".npy"), mmap_mode="r")


def iter_shard_rows(work_dir: Path) -> Iterator[list[ShardRow]]:
    """The rows of the complete shards in order, their vectors left on disk."""
    for jsonl in sorted(work_dir.glob("shard_*.jsonl")):
        yield _shard_rows(jsonl)


def _shard_rows(jsonl: Path) -> list[ShardRow]:
    with jsonl.open(encoding="utf-8") as fp:
        return [ShardRow(**json.loads(line)) for line in fp if line.strip()]


def _complete_shards(work_dir: Path) -> bool:
    """Whether every shard index has its vectors and the shards are numbered 0..n-1 without gaps."""
    indexes = sorted(work_dir.glob("shard_*.jsonl"))
    expected = [f"shard_{i:05d}.jsonl" for i in range(len(indexes))]
    return [p.name for p in indexes] == expected and all(p.with_suffix(".npy").is_file() for p in indexes)


def prepare_work_dir(work_dir: Path, run_key: dict[str, Any], sources: set[str] | None = None) -> tuple[int, set[str]]:
    """Open the work directory for a run: keep its shards if they belong to the same run (same
    data, model and settings), are whole and, when `sources` (this run's inputs) is given, hold
    nothing but those; else start afresh. Returns (next shard number, sources done)."""
    run_file = work_dir / RUN_FILE
    if work_dir.exists():
        try:
            same = json.loads(run_file.read_text()) == run_key
        except (OSError, json.JSONDecodeError):  # no run key: shards of unknown origin
            same = False
        if not same:
            logger.info("work directory %s belongs to another run: starting afresh", work_dir)
            remove_dir(work_dir)
        elif not _complete_shards(work_dir):
            logger.warning("work directory %s has incomplete shards: starting afresh", work_dir)
            remove_dir(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run_key)
    for stray in work_dir.glob(".*.tmp"):  # a write interrupted by a kill
        stray.unlink(missing_ok=True)
    done: set[str] = set()
    count = 0
    for rows in iter_shard_rows(work_dir):
        done.update(row.source for row in rows)
        count += 1
    gone = done - sources if sources is not None else set()
    if gone:
        # files deleted (or renamed) since the interrupted run: its shards would publish them, and a
        # copy's row may point at one of them; embedding afresh is the simple, safe answer
        logger.info("the data changed since the interrupted run (%d of its files are gone, e.g. %s): "
                    "starting afresh", len(gone), min(gone))
        remove_dir(work_dir)
        work_dir.mkdir(parents=True)
        write_json(run_file, run_key)
        return 0, set()
    if count:
        logger.info("resuming: %d complete shards hold %d records", count, len(done))
    return count, done
