"""The Ray backend: decoding and embedding on a Ray cluster (Ray Data), outcomes back in order.

Workers (actors, one model each, a GPU each when the cluster has GPUs) read, hash, decode and
embed batches of files; files whose hash the published index already holds are not decoded. The
driver turns the results into the same `Outcome`s as the local embedder, in input order (deciding
duplicates there, since only it sees every hash), so the same shard writer and build step follow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.embed import Outcome, Previous, resolve, settle_without_file
from indexer.reader import Record
from models.images import ImageLimits, ImageRejected

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run: `address` None starts (or joins) a local Ray instance."""

    model: str
    pretrained: str | None = None
    address: str | None = None
    actors: int = 2
    batch_size: int = 64
    device: str | None = None
    precision: str = "auto"


class _EmbedActor:
    """Ray Data callable class: one model per actor, loaded once."""

    def __init__(self, model: str, pretrained: str | None, device: str | None, known: list[str],
                 max_pixels: int, max_bytes: int, precision: str = "auto") -> None:
        from models.encoder import load_encoder

        self.encoder = load_encoder(model, pretrained, device=device, precision=precision)
        self.known = set(known)
        self.limits = ImageLimits(max_pixels=max_pixels, max_bytes=max_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from indexer.embed import prepare_file

        prepared = [prepare_file(Path(str(path)), self.encoder.preprocess, self.limits, self.known.__contains__)
                    for path in batch["path"]]
        dim = self.encoder.dim
        vectors = np.zeros((len(prepared), dim), np.float32)
        pixels = {i: p.pixels for i, p in enumerate(prepared) if p.pixels is not None and p.rejection is None}
        fresh = sorted(pixels)
        if fresh:
            vectors[fresh] = self.encoder.encode_image_tensors(torch.stack([pixels[i] for i in fresh]))
        return {
            "position": batch["position"],
            "sha256": [p.sha256 for p in prepared],
            "width": [p.width for p in prepared],
            "height": [p.height for p in prepared],
            "embedded": [i in pixels for i in range(len(prepared))],
            "reason": [p.rejection.reason if p.rejection else "" for p in prepared],
            "message": [p.rejection.message if p.rejection else "" for p in prepared],
            "vector": list(vectors),
        }


def run_ray(records: Iterable[Record], options: RayOptions, previous: Previous, seen: dict[str, str],
            limits: ImageLimits) -> Iterator[Outcome]:
    """Outcomes in input order, one per record (like `Embedder.run`). `seen` is updated."""
    import ray

    records = list(records)
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # outcomes must come back in input order
    files = [{"position": i, "path": str(r.path)} for i, r in enumerate(records) if r.path is not None
             and r.problem is None]
    results: dict[int, dict[str, Any]] = {}
    if files:
        dataset = ray.data.from_items(files).map_batches(
            _EmbedActor,
            fn_constructor_kwargs={"model": options.model, "pretrained": options.pretrained,
                                   "device": "cuda" if gpus else (options.device or "cpu"),
                                   "known": sorted(previous), "max_pixels": limits.max_pixels,
                                   "max_bytes": limits.max_bytes, "precision": options.precision},
            batch_size=options.batch_size,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(options.actors, gpus or options.actors))),
            num_gpus=1 if gpus else 0,
        )
        logger.info("ray: %d files on %d actors (%d GPUs in the cluster)", len(files), options.actors, gpus)
        for batch in dataset.iter_batches(batch_size=options.batch_size, batch_format="numpy"):
            for i in range(len(batch["position"])):
                results[int(batch["position"][i])] = {key: batch[key][i] for key in batch}
    for position, record in enumerate(records):
        settled = settle_without_file(record)
        if settled is not None:
            yield settled
            continue
        row = results[position]
        sha = str(row["sha256"])
        rejection = ImageRejected(str(row["reason"]), str(row["message"])) if row["reason"] else None
        outcome = resolve(record, sha, rejection, bool(row["embedded"]), seen, previous, limits.max_pixels)
        yield outcome or Outcome(record, "embedded", sha, int(row["width"]), int(row["height"]),
                                 np.asarray(row["vector"], dtype=np.float32))
