"""SearchService: embed (through the batchers) -> index search -> metadata join.

It owns the encoder, the live index (swapped atomically by the hot reloader) and one batcher per
modality. Routes call it with validated values and get plain results back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from app.batching import DynamicBatcher
from app.errors import EmptySide, InvalidImage, InvalidInput, NotFound, NotReady, UnsupportedImage
from app.filters import Filter, MetadataColumns
from app.observability import Metrics
from app.schemas import SearchResult, TextRole
from app.settings import Settings
from indexer.artifacts import InvalidIndex, LoadedIndex, load_index, resolve_version, search_parameters
from models import FingerprintMismatch, ImageLimits, ImageRejected, decode_image

logger = logging.getLogger(__name__)

# A filter allowing at most this many items is searched exactly among them (12 ms for 20,000
# vectors of 384 dimensions on 2 cores); the index build draws the same line.
FILTERED_EXACT_LIMIT = 20_000
MAX_EF_SEARCH = 4096  # the highest efSearch the index build's tuning tries
EXACT_CHUNK = 65_536  # rows scored at once by an exact filtered search (96 MB of float32 at 384-d)
EMPTY_SIDE = {
    "texts": "this index holds no captions or labels (its images came without them), so image -> text "
             "search has nothing to search: index captioned images, or a labels file (README, Indexing)",
    "images": "this index holds no images (it was built from labels alone): search its texts with "
              "target \"texts\", or index images",
}


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


class SearchService:
    def __init__(self, encoder: Any, index: LoadedIndex, settings: Settings, metrics: Metrics) -> None:
        self.encoder = encoder
        self.index = index
        self.settings = settings
        self.metrics = metrics
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_body_bytes)
        # One thread owns the device: model calls never run concurrently, batches do the sharing.
        self.device_thread = ThreadPoolExecutor(1, thread_name_prefix="device")
        self.text_batcher: DynamicBatcher[str] = DynamicBatcher(
            "text", self._encode_texts, self.device_thread, metrics,
            settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
        self.image_batcher: DynamicBatcher[torch.Tensor] = DynamicBatcher(
            "image", self._encode_pixels, self.device_thread, metrics,
            settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
        self._filter_cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._columns: tuple[str, MetadataColumns] | None = None  # of the version last filtered
        self._refused: Path | None = None  # a published version that failed its checks

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.text_batcher.start()
        self.image_batcher.start()

    async def stop(self) -> None:
        await self.text_batcher.stop()
        await self.image_batcher.stop()
        self.device_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def batchers_alive(self) -> bool:
        return self.text_batcher.alive and self.image_batcher.alive

    # -- model calls (device thread) -------------------------------------------------------------
    def _encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(list(texts))

    def _encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        return self.encoder.encode_image_tensors(torch.stack(list(pixels)))

    # -- embedding --------------------------------------------------------------------------------
    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, D) unit rows; each text is its own batcher item so they batch with other requests."""
        for text in texts:
            if len(text) > self.settings.max_text_chars:
                raise InvalidInput(f"text longer than {self.settings.max_text_chars} characters")
        rows = await self.text_batcher.submit_many(list(texts), self.settings.request_timeout_s)
        return np.stack(rows) if rows else np.zeros((0, self.encoder.dim), np.float32)

    async def embed_captions(self, texts: Sequence[str]) -> np.ndarray:
        """(n, D) unit rows of captions as documents of image -> text search: the texts batch as
        queries do, then the model's image bank (if any) mixes them, on the device thread."""
        rows = await self.embed_texts(texts)
        if self.encoder.image_bank is None:
            return rows
        return await asyncio.get_running_loop().run_in_executor(self.device_thread, self.encoder.as_captions, rows)

    async def embed_for(self, texts: Sequence[str], role: TextRole) -> np.ndarray:
        """`embed_captions` for the role "caption", `embed_texts` (queries) otherwise."""
        return await (self.embed_captions(texts) if role == "caption" else self.embed_texts(texts))

    def prepare_image(self, data: bytes) -> torch.Tensor:
        """Decode + preprocess untrusted bytes (CPU, any thread). Raises InvalidImage/UnsupportedImage."""
        started = time.perf_counter()
        try:
            image = decode_image(data, self.limits)
        except ImageRejected as exc:
            if exc.reason == "unsupported_format":
                raise UnsupportedImage(exc.message) from None
            raise InvalidImage(exc.message) from None
        pixels = self.encoder.preprocess(image)
        self.metrics.stage.labels("decode").observe(time.perf_counter() - started)
        return pixels

    async def embed_image_bytes(self, data: bytes) -> np.ndarray:
        self.image_batcher.admit()  # shed before decoding, not after
        pixels = await asyncio.get_running_loop().run_in_executor(None, self.prepare_image, data)
        return await self.image_batcher.submit(pixels, self.settings.request_timeout_s)

    def stored_vector(self, item_id: int) -> np.ndarray:
        index = self.index
        if not 0 <= item_id < len(index.metadata):
            raise NotFound(f"no item with id {item_id}")
        return np.asarray(index.embeddings[item_id], dtype=np.float32)

    def given_vector(self, values: Sequence[float]) -> np.ndarray:
        """A client's embedding as a query: this model's size, not all zeros; returned unit-norm."""
        vector = np.asarray(values, dtype=np.float32)
        if len(vector) != self.encoder.dim:
            raise InvalidInput(f"the vector has {len(vector)} numbers; this model's embeddings have "
                               f"{self.encoder.dim}")
        norm = float(np.linalg.norm(vector))
        if not norm > 0 or not np.isfinite(norm):
            raise InvalidInput("the vector has no direction (all zeros) or overflows float32")
        return vector / norm

    # -- search -----------------------------------------------------------------------------------
    def _allowed_ids(self, index: LoadedIndex, filters: Sequence[Filter]) -> np.ndarray:
        key = (index.version, tuple(filters))
        cached = self._filter_cache.get(key)
        if cached is None:
            columns = self._columns
            if columns is None or columns[0] != index.version:
                columns = self._columns = (index.version, MetadataColumns(index.metadata))
            cached = columns[1].allowed_ids(filters)
            if len(self._filter_cache) > 256:
                self._filter_cache.clear()
            self._filter_cache[key] = cached
        return cached

    async def search(self, query: np.ndarray, target: str, k: int, offset: int, min_score: float | None,
                     filters: Sequence[Filter] = ()) -> tuple[LoadedIndex, list[Hit]]:
        """`search_vectors` on a worker thread. A field filtered for the first time is read from every
        item's metadata (0.1-0.5 s for a million items on this machine) and an exact index scans
        every vector: on the event loop either would stall every other request meanwhile, and the
        batchers' collection with them. FAISS indexes are safe to search from several threads."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.search_vectors, query, target, k, offset, min_score, filters))

    def search_vectors(self, query: np.ndarray, target: str, k: int, offset: int, min_score: float | None,
                       filters: Sequence[Filter] = ()) -> tuple[LoadedIndex, list[Hit]]:
        """Top `k` after `offset` for one unit query vector `(D,)` in the image or text index."""
        started = time.perf_counter()
        index = self.index  # one consistent version for the whole request, even across a reload
        faiss_index = index.image_index if target == "images" else index.text_index
        if faiss_index.ntotal == 0:
            raise EmptySide(EMPTY_SIDE[target])
        want = min(offset + k, faiss_index.ntotal)
        if want <= offset:
            return index, []
        spec = index.manifest["index"]["image" if target == "images" else "text"]
        query = query.reshape(1, -1).astype(np.float32)
        if filters and target == "images":
            allowed = self._allowed_ids(index, filters)
            if len(allowed) == 0:
                return index, []
            want = min(want, len(allowed))
            scores, ids = search_allowed(faiss_index, spec, index.embeddings, allowed, query, want)
        else:
            params = search_parameters(spec["factory"], spec.get("search_params", {}))
            scores, ids = faiss_index.search(query, want, params=params)
        hits = [Hit(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        hits = hits[offset:]
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        self.metrics.stage.labels("search").observe(time.perf_counter() - started)
        return index, hits

    # -- stored items -------------------------------------------------------------------------------
    def item(self, item_id: int) -> dict[str, Any]:
        index = self.index
        if not 0 <= item_id < len(index.metadata):
            raise NotFound(f"no item with id {item_id}")
        return index.metadata[item_id]

    def item_path(self, item_id: int) -> Path:
        """The stored file of an item, found through the id only and checked to lie in the data root."""
        meta = self.item(item_id)
        root = Path(self.index.manifest["source"]["path"]).resolve()
        path = (root / meta["source"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFound(f"the image of item {item_id} is not available")
        return path

    def item_image(self, item_id: int, max_side: int | None) -> Image.Image:
        path = self.item_path(item_id)
        try:
            image = decode_image(path.read_bytes(), self.limits)
        except (OSError, ImageRejected):
            raise NotFound(f"the image of item {item_id} can no longer be read") from None
        if max_side:
            image.thumbnail((max_side, max_side))
        return image

    # -- hot reload ---------------------------------------------------------------------------------
    def try_reload(self) -> bool:
        """Switch to a newly published version if there is one and it is sound. Returns True on a switch."""
        try:
            current = resolve_version(self.settings.index_dir)
        except InvalidIndex:
            return False
        if current in (self.index.directory, self._refused):
            return False
        try:
            candidate = load_index(current, expected=self.encoder.fingerprint)
        except (InvalidIndex, FingerprintMismatch, OSError) as exc:
            self.metrics.reloads.labels("refused").inc()
            logger.error("new index %s refused, still serving %s: %s", current.name, self.index.version, exc)
            self._refused = current
            return False
        self.index = candidate  # one reference assignment: requests in flight keep their version
        self._columns = None  # would keep the old version's metadata alive until a filtered search
        self.metrics.reloads.labels("switched").inc()
        logger.info("now serving index %s (%d items)", candidate.version, len(candidate.metadata))
        return True


def as_result(index: LoadedIndex, hit: Hit, target: str) -> SearchResult:
    """One hit as the API returns it: a caption entry (`texts`) or an item with its metadata."""
    if target == "texts":
        entry = index.texts[hit.id]
        return SearchResult(id=hit.id, score=hit.score, caption=entry["text"], item_ids=entry["ids"])
    meta = index.metadata[hit.id]
    return SearchResult(
        id=hit.id, score=hit.score, source=meta["source"], caption=meta["caption"], width=meta["width"],
        height=meta["height"], duplicates=meta["duplicates"], **{k: v for k, v in meta["extra"].items()
                                                                  if k not in SearchResult.model_fields},
    )


def search_allowed(faiss_index: faiss.Index, spec: dict[str, Any], vectors: np.ndarray, allowed: np.ndarray,
                   query: np.ndarray, k: int, exact_limit: int = FILTERED_EXACT_LIMIT,
                   max_ef: int = MAX_EF_SEARCH) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` (scores, ids; each `(1, k)`) among the `allowed` ids of a filtered search.

    Up to `exact_limit` allowed items are scored exactly from their stored `vectors`: a graph or
    inverted-list search with an ID selector walks mostly items it must then drop, so it finds few
    of a rare subset (HNSW32 returned 1.2 of 10 results for 20 allowed of 50,000 items). Above the
    limit the index searches with the selector and its search parameter raised by the share of
    items left out, so as many allowed candidates are seen as an unfiltered search sees. Where an
    HNSW graph would need an efSearch above `max_ef` for that (a small share of a very large index:
    25,000 of 10 million), the allowed items are scored exactly too; their number is then at most
    `ntotal * efSearch / max_ef` (some 80,000 for efSearch 32 at 10 million). A flat index is exact
    already: it searches with the selector, its scores those of unfiltered searches."""
    factory, values = spec["factory"], spec.get("search_params", {})
    if factory == "Flat":
        return faiss_index.search(query, k, params=search_parameters(factory, values, faiss.IDSelectorBatch(allowed)))
    # as many allowed candidates as an unfiltered search sees: the parameter over the allowed share
    share = len(allowed) / faiss_index.ntotal
    raised = dict(values)
    if factory.startswith("HNSW"):
        ef = int(values.get("efSearch", 64))
        raised["efSearch"] = max(ef, math.ceil(ef / share))
        if raised["efSearch"] > max_ef:
            return exact_among(vectors, allowed, query, k)
    elif factory.startswith("IVF"):  # all lists at most: every allowed item is then scanned
        nprobe = int(values.get("nprobe", 16))
        raised["nprobe"] = min(faiss.extract_index_ivf(faiss_index).nlist, math.ceil(nprobe / share))
    if len(allowed) <= exact_limit:
        return exact_among(vectors, allowed, query, k)
    params = search_parameters(factory, raised, faiss.IDSelectorBatch(allowed))
    return faiss_index.search(query, k, params=params)


def exact_among(vectors: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int,
                chunk: int = EXACT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The exact top `k` (scores, ids; each `(1, k)`) of `query` among the `allowed` rows of
    `vectors`, best first, ties by id. Scored `chunk` rows at a time, so a large allowed set never
    copies more than a chunk of vectors (memory-mapped, float16 or float32) at once."""
    best_scores, best_ids = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for start in range(0, len(allowed), chunk):
        ids = allowed[start:start + chunk]
        scores = np.asarray(vectors[ids], dtype=np.float32) @ query[0]
        best_scores, best_ids = np.concatenate([best_scores, scores]), np.concatenate([best_ids, ids])
        if len(best_scores) > k:
            keep = np.argpartition(-best_scores, k - 1)[:k]
            best_scores, best_ids = best_scores[keep], best_ids[keep]
    order = np.lexsort((best_ids, -best_scores))
    return best_scores[order][None], best_ids[order][None]


def load_serving_index(settings: Settings, encoder: Any) -> LoadedIndex:
    try:
        return load_index(settings.index_dir, expected=encoder.fingerprint)
    except (InvalidIndex, FingerprintMismatch) as exc:
        raise NotReady(str(exc)) from exc
