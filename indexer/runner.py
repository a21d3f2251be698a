"""One indexing run: source -> embedder -> shards -> FAISS build -> published version.

Incremental: vectors of files whose content hash the published index already holds are reused, so
a re-run embeds only new or changed files, and deleted files simply drop out. Resumable: complete
shards of an interrupted run are kept (see `indexer.writer`). Accounted: every input record ends
as exactly one of indexed (embedded or reused), duplicate, rejected (by reason) or text-only. A
run whose every input is rejected publishes nothing and leaves the served index as it was.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer import artifacts
from indexer.build import build_index
from indexer.embed import Embedder, Previous
from indexer.ray_backend import RayOptions, run_ray
from indexer.reader import Source
from indexer.writer import (
    ShardRow,
    ShardWriter,
    iter_shard_rows,
    iter_shard_vectors,
    iter_shards,
    prepare_work_dir,
)
from models.checkpoint import write_jsonl, write_npy, write_npy_rows
from models.images import ImageLimits

logger = logging.getLogger(__name__)

SHOWN_REJECTS = 20  # files named in the log when a run publishes nothing
FLOAT16_CHUNK = 65_536  # rows converted at a time for --float16
CAPTION_CHUNK = 4096  # captions embedded per progress step


@dataclass(frozen=True)
class IndexConfig:
    """Settings of one run, built by the CLI and passed down."""

    out_dir: Path
    batch_size: int = 64
    workers: int = 4
    shard_size: int = 2048
    index_type: str | None = None  # a FAISS factory string; None: chosen by size
    float16: bool = False
    memory_budget_bytes: int = 8 << 30
    use_gpu: bool = True
    limits: ImageLimits = field(default_factory=ImageLimits)
    progress: bool = True
    backend: str = "local"  # "local" | "ray"
    ray: RayOptions | None = None  # with backend "ray": where, and which model the workers load

    def __post_init__(self) -> None:
        """Refuse settings no run can use before the model loads (a batch size of 0 failed deep in
        the embedder; 0 workers or shards of 0 records passed unseen)."""
        for name, value in (("batch_size", self.batch_size), ("workers", self.workers),
                            ("shard_size", self.shard_size), ("memory_budget_bytes", self.memory_budget_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"the index directory {self.out_dir} is a file, not a folder")
        foreign = artifacts.foreign_to_index(self.out_dir)
        if foreign:  # runs prune OUT/versions and replace OUT/work: never in a folder of other things
            raise ValueError(f"{self.out_dir} holds other things than an index ({foreign}): "
                             "index into a new or empty folder")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.ray is not None and self.ray.actors < 1:
            raise ValueError(f"ray actors must be at least 1, got {self.ray.actors}")


@dataclass
class Summary:
    inputs: int = 0
    indexed: int = 0
    embedded: int = 0
    reused: int = 0
    duplicates: int = 0
    texts_only: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    embed_seconds: float = 0.0  # the read -> decode -> encode loop alone
    published: str | None = None
    unchanged: bool = False

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def all_rejected(self) -> bool:
        """Every input was rejected: nothing to index, so nothing is published (a limit or a
        source gone wrong must not replace a served index with an empty one)."""
        return self.inputs > 0 and self.rejected_total == self.inputs

    @property
    def balanced(self) -> bool:
        return self.inputs == self.indexed + self.duplicates + self.rejected_total + self.texts_only

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs, "indexed": self.indexed, "embedded": self.embedded, "reused": self.reused,
            "duplicates": self.duplicates, "texts_only": self.texts_only, "rejected": self.rejected_total,
            "rejected_by_reason": dict(self.rejected), "seconds": round(self.seconds, 2),
            "embed_seconds": round(self.embed_seconds, 2),
        }

    def render(self) -> str:
        rate = self.embedded / self.embed_seconds if self.embed_seconds else 0.0
        lines = [
            f"inputs     {self.inputs}",
            f"indexed    {self.indexed}  (embedded {self.embedded}, reused {self.reused})",
            f"duplicates {self.duplicates}",
            f"rejected   {self.rejected_total}" + (f"  {dict(self.rejected)}" if self.rejected else ""),
        ]
        if self.texts_only:
            lines.append(f"texts only {self.texts_only}")
        check = "==" if self.balanced else "!="
        lines.append(f"check      inputs {check} indexed + duplicates + rejected" +
                     (" + texts" if self.texts_only else ""))
        if self.embedded:
            lines.append(f"time       {self.seconds:.1f} s in all; embedding {self.embedded} images took "
                         f"{self.embed_seconds:.1f} s ({rate:.1f} images/s)")
        else:  # every file was known: the pipeline only read and hashed them
            lines.append(f"time       {self.seconds:.1f} s in all; no image needed embedding (files checked "
                         f"in {self.embed_seconds:.1f} s)")
        if self.all_rejected:
            outcome = (f"nothing: every one of the {self.inputs} inputs was rejected (see the reasons above); "
                       "the published index, if any, is untouched")
        else:
            outcome = self.published or "nothing changed: the published index is up to date"
        lines.append("published  " + outcome)
        return "\n".join(lines)


def _previous_vectors(out_dir: Path, encoder: Any) -> tuple[Previous, artifacts.LoadedIndex | None]:
    """Vectors of the published index, when it was built with this same model."""
    try:
        index = artifacts.load_index(out_dir, verify=False)
    except artifacts.InvalidIndex:
        return Previous(), None
    if index.fingerprint != encoder.fingerprint:
        logger.info("the published index was built with another model: embedding everything again")
        return Previous(), None
    rows = {meta["sha256"]: (row, meta["width"], meta["height"]) for row, meta in enumerate(index.metadata)}
    return Previous(index.embeddings, rows), index


def _run_key(source: Source, encoder: Any, config: IndexConfig, previous: artifacts.LoadedIndex | None) -> dict[str, Any]:
    """What must be equal for shards of an earlier run to be reused."""
    return {"source": str(source.root), "kind": source.kind, "model": encoder.fingerprint.as_dict(),
            "shard_size": config.shard_size, "max_pixels": config.limits.max_pixels,
            "max_bytes": config.limits.max_bytes,
            "previous": previous.version if previous else None}


def _collect(work_dir: Path) -> tuple[list[ShardRow], list[int]]:
    """The rows of every shard, their `row` made global (into all shards' vectors in order), and
    each shard's vector count."""
    rows: list[ShardRow] = []
    counts: list[int] = []
    offset = 0
    for shard_rows, vectors in iter_shards(work_dir):
        for row in shard_rows:
            rows.append(ShardRow(**{**row.__dict__, "row": row.row + offset if row.row >= 0 else -1}))
        counts.append(len(vectors))
        offset += len(vectors)
    return rows, counts


def _vector_chunks(work_dir: Path, counts: list[int], vector_rows: np.ndarray) -> Iterator[np.ndarray]:
    """The shards' vectors at the global, increasing `vector_rows`, a shard at a time: the index's
    vectors are written to disk without ever being whole in memory."""
    start, offset = 0, 0
    for vectors, count in zip(iter_shard_vectors(work_dir), counts, strict=True):
        if len(vectors) != count:
            raise RuntimeError(f"indexer bug: a shard of {work_dir} changed during publishing")
        end = int(np.searchsorted(vector_rows, offset + count))
        if end > start:  # a shard of texts or rejects only stores a (0, 0) array
            yield vectors[vector_rows[start:end] - offset]
        start, offset = end, offset + count


def _tables(rows: list[ShardRow]) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """(metadata rows, their vector rows, text rows, reject rows) from the shard rows."""
    metadata: list[dict[str, Any]] = []
    vector_rows: list[int] = []
    by_source: dict[str, int] = {}
    rejects: list[dict[str, Any]] = []
    captions: dict[str, list[int]] = {}
    for row in rows:
        if row.kind in ("embedded", "reused"):
            item_id = len(metadata)
            by_source[row.source] = item_id
            metadata.append({"id": item_id, "source": row.source, "duplicates": [], "caption": row.caption,
                             "width": row.width, "height": row.height, "sha256": row.sha256, "extra": row.extra})
            vector_rows.append(row.row)
            if row.caption:
                captions.setdefault(row.caption, []).append(item_id)
        elif row.kind == "duplicate":
            owner = metadata[by_source[row.extra["of"]]]
            owner["duplicates"].append(row.source)
            if row.caption and row.caption != owner["caption"]:
                captions.setdefault(row.caption, []).append(owner["id"])
        elif row.kind == "text":
            captions.setdefault(row.caption, [])
        else:
            rejects.append({"source": row.source, "reason": row.reason, "message": row.message})
    texts = [{"id": i, "text": text, "ids": ids} for i, (text, ids) in enumerate(captions.items())]
    return metadata, vector_rows, texts, rejects


def _summarise(rows: list[ShardRow], started: float) -> Summary:
    summary = Summary(inputs=len(rows), seconds=time.time() - started)
    for row in rows:
        if row.kind == "embedded":
            summary.embedded += 1
        elif row.kind == "reused":
            summary.reused += 1
        elif row.kind == "duplicate":
            summary.duplicates += 1
        elif row.kind == "text":
            summary.texts_only += 1
        else:
            summary.rejected[row.reason] += 1
    summary.indexed = summary.embedded + summary.reused
    return summary


def _unchanged(previous: artifacts.LoadedIndex | None, metadata: list[dict[str, Any]],
               texts: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> bool:
    if previous is None:
        return False
    old = [(m["source"], m["sha256"], m["caption"], m["duplicates"], m["extra"]) for m in previous.metadata]
    new = [(m["source"], m["sha256"], m["caption"], m["duplicates"], m["extra"]) for m in metadata]
    old_texts = [t["text"] for t in previous.texts]
    return old == new and old_texts == [t["text"] for t in texts] and \
        previous.manifest["counts"]["rejected"] == len(rejects)


def run_index(source: Source, encoder: Any, config: IndexConfig) -> Summary:
    """Index `source` into `config.out_dir` and publish the result (see module docstring). Raises
    `artifacts.IndexBusy` when another run is writing the same directory."""
    with artifacts.writer_lock(config.out_dir):
        return _run(source, encoder, config)


def _run(source: Source, encoder: Any, config: IndexConfig) -> Summary:
    started = time.time()
    out_dir = config.out_dir
    artifacts.sweep_trash(out_dir)
    artifacts.sweep_trash(out_dir / artifacts.VERSIONS)
    previous, previous_index = _previous_vectors(out_dir, encoder)
    work_dir = out_dir / artifacts.WORK
    next_shard, done = prepare_work_dir(work_dir, _run_key(source, encoder, config, previous_index),
                                        {r.source for r in source.records})
    embedder = Embedder(encoder, config.batch_size, config.workers, config.limits, previous)
    for rows in iter_shard_rows(work_dir):  # files of finished shards count as seen (duplicates)
        embedder.seen.update({r.sha256: r.source for r in rows if r.kind in ("embedded", "reused")})
    todo = [r for r in source.records if r.source not in done]
    writer = ShardWriter(work_dir, config.shard_size, next_shard)
    bar = tqdm(total=len(source.records), initial=len(source.records) - len(todo), unit="img",
               desc="index", disable=not config.progress, smoothing=0.1)
    embed_started = time.time()
    if config.backend == "ray":
        if config.ray is None:
            raise ValueError("backend 'ray' needs RayOptions (the model the workers load)")
        outcomes = run_ray(todo, config.ray, previous, embedder.seen, config.limits)
    else:
        outcomes = embedder.run(todo)
    for outcome in outcomes:
        writer.add(outcome)
        bar.update(1)
    writer.flush()
    bar.close()
    rows, counts = _collect(work_dir)
    metadata, vector_rows, texts, rejects = _tables(rows)
    summary = _summarise(rows, started)
    summary.embed_seconds = time.time() - embed_started
    if summary.inputs != len(source.records):  # the summary's check counts outcomes: hold them to the input
        artifacts.remove_dir(work_dir)
        raise RuntimeError(f"indexer bug: {len(source.records)} inputs but {summary.inputs} outcomes; "
                           "nothing published")
    if summary.all_rejected:
        rejected = ", ".join(f"{reason}: {n}" for reason, n in summary.rejected.most_common())
        logger.error("every one of the %d inputs was rejected (%s): nothing published", summary.inputs, rejected)
        # no version holds a rejects.jsonl this time, so the files are named here
        for reject in rejects[:SHOWN_REJECTS]:
            logger.error("rejected %s: %s (%s)", reject["source"], reject["reason"], reject["message"])
        if len(rejects) > SHOWN_REJECTS:
            logger.error("... and %d more", len(rejects) - SHOWN_REJECTS)
        artifacts.remove_dir(work_dir)
        summary.seconds = time.time() - started
        return summary
    if _unchanged(previous_index, metadata, texts, rejects):
        artifacts.remove_dir(work_dir)
        summary.unchanged = True
        summary.seconds = time.time() - started
        return summary
    rows_at = np.asarray(vector_rows, dtype=np.int64)
    if len(rows_at) and (np.any(np.diff(rows_at) <= 0) or rows_at[0] < 0 or rows_at[-1] >= sum(counts)):
        artifacts.remove_dir(work_dir)
        raise RuntimeError("indexer bug: the items' vector rows are not increasing rows of the shards; "
                           "nothing published")
    # what publishing no longer needs goes before the index is built: the shard rows (the items
    # live on in `metadata`), and the previous version's tables and the embedder's lookups
    del rows, previous, previous_index, embedder
    chunks = _vector_chunks(work_dir, counts, rows_at)
    summary.published = _publish(source, encoder, config, (len(rows_at), encoder.dim), chunks, metadata, texts,
                                 rejects, summary)
    artifacts.remove_dir(work_dir)
    summary.seconds = time.time() - started
    return summary


def embed_captions(encoder: Any, captions: list[str], progress: bool, chunk: int = CAPTION_CHUNK) -> np.ndarray:
    """The caption side of every text (the documents of image -> text search) as float32 `(n, d)`,
    `chunk` texts at a time under a progress bar: a million captions take many minutes on a CPU."""
    out = np.empty((len(captions), encoder.dim), dtype=np.float32)
    with tqdm(total=len(captions), unit="text", desc="captions", disable=not progress or not captions,
              smoothing=0.1) as bar:
        for start in range(0, len(captions), chunk):
            part = captions[start:start + chunk]
            out[start:start + len(part)] = encoder.encode_captions(part)
            bar.update(len(part))
    return out


def _publish(source: Source, encoder: Any, config: IndexConfig, shape: tuple[int, int], chunks: Iterator[np.ndarray],
             metadata: list[dict[str, Any]], texts: list[dict[str, Any]], rejects: list[dict[str, Any]],
             summary: Summary) -> str:
    """Write a version from the items' vectors (`chunks` of rows, `shape` in all) and tables, and
    publish it. The vectors go to disk first and the index is built from that file, mapped: the
    build holds the index's copy of the vectors, not a second one (1.5 GB a million items)."""
    version = artifacts.new_version_dir(config.out_dir)
    embeddings = version / "embeddings.npy"
    # the build reads float32; with --float16 that copy is a hidden file, removed once converted
    float32_file = version / ".embeddings-float32.npy" if config.float16 else embeddings
    write_npy_rows(float32_file, shape, np.float32, chunks)
    image_vectors = np.load(float32_file, mmap_mode="r")
    image_index, image_plan = build_index(image_vectors, config.index_type, config.memory_budget_bytes,
                                          config.use_gpu)
    if config.float16:
        write_npy_rows(embeddings, shape, np.float16,
                       (image_vectors[i:i + FLOAT16_CHUNK] for i in range(0, shape[0], FLOAT16_CHUNK)))
        del image_vectors
        float32_file.unlink()
    if not texts:
        logger.info("no captions or labels: image -> text search of this index will say so (409)")
    elif not metadata:
        logger.info("no images: only image -> text search applies to this index")
    # the documents of image -> text search: the encoder's caption side (its image bank, if any)
    text_vectors = embed_captions(encoder, [t["text"] for t in texts], config.progress)
    text_index, text_plan = build_index(text_vectors, None, config.memory_budget_bytes, config.use_gpu)
    write_npy(version / "text_embeddings.npy", text_vectors.astype(np.float32))
    write_jsonl(version / "metadata.jsonl", metadata)
    write_jsonl(version / "texts.jsonl", texts)
    write_jsonl(version / "rejects.jsonl", rejects)
    artifacts.write_faiss(image_index, version / "image.faiss")
    del image_index  # the check before publishing reads it back
    artifacts.write_faiss(text_index, version / "text.faiss")
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": encoder.fingerprint.as_dict(),
        "dim": encoder.dim,
        "metric": "inner_product",
        "normalized": True,
        "embeddings_dtype": "float16" if config.float16 else "float32",
        "counts": {**summary.as_dict(), "texts": len(texts)},
        "index": {"image": image_plan.as_dict(), "text": text_plan.as_dict()},
        "source": source.describe(),
    }
    artifacts.finish_version(version, manifest)
    artifacts.publish(config.out_dir, version)
    return str(version)
