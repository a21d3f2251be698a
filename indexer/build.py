"""FAISS index choice, build and tuning (in the spirit of autofaiss), on the GPU when faiss sees one.

Below `exact_threshold` vectors the index is exact (`Flat`, inner product on unit vectors = cosine).
Above it: HNSW when its graph fits the memory budget (best recall per query time), else IVF-PQ
(compressed). The search parameter (`efSearch` / `nprobe`) is raised until recall@10 against exact
search on a sample of the data reaches the target, and recorded in the manifest: the server passes
it per call, never by mutating the shared index.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from indexer.artifacts import search_parameters

logger = logging.getLogger(__name__)

EXACT_THRESHOLD = 20_000
TARGET_RECALL = 0.95


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a FAISS factory string and the search parameters to use with it."""

    factory: str
    search_params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None  # measured against exact search (None for exact indexes)

    def as_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "search_params": self.search_params, "recall_at_10": self.recall_at_10}


def choose_factory(count: int, dim: int, memory_budget_bytes: int, exact_threshold: int = EXACT_THRESHOLD) -> str:
    """Pick a factory string from the data size and the memory budget.

    Exact below the threshold; HNSW (full vectors + graph) when it fits; IVF with 8-bit scalar
    quantisation (a quarter of the memory, recall@10 still above 0.95) when that fits; IVF-PQ
    (a few bytes a vector) beyond, where recall is bounded by the code size.
    """
    if count < exact_threshold:
        return "Flat"
    lists = max(64, min(65_536, 2 ** round(math.log2(4 * math.sqrt(count)))))
    if count * (dim * 4 + 32 * 2 * 4 * 1.1) <= memory_budget_bytes:  # vectors + about 2*M links each
        return "HNSW32"
    if count * (dim + 8) <= memory_budget_bytes:
        return f"IVF{lists},SQ8"
    code_size = max(8, min(64, dim // 8))
    while dim % code_size:
        code_size -= 1
    return f"IVF{lists},PQ{code_size}"


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def _train_and_add(factory: str, vectors: np.ndarray, use_gpu: bool) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if use_gpu and not factory.startswith("HNSW") and gpu_count() > 0:
        # IVF and Flat train/add much faster on the GPU; the stored index is always the CPU form.
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        if not gpu_index.is_trained:
            gpu_index.train(vectors)
        gpu_index.add(vectors)
        return faiss.index_gpu_to_cpu(gpu_index)
    if not index.is_trained:
        sample = vectors if len(vectors) <= 200_000 else vectors[np.random.default_rng(0).choice(len(vectors), 200_000, replace=False)]
        index.train(sample)
    if factory.startswith("HNSW"):
        faiss.downcast_index(index).hnsw.efConstruction = 80  # type: ignore[attr-defined]
    index.add(vectors)
    return index


def _param_name(factory: str) -> str | None:
    if factory.startswith("HNSW"):
        return "efSearch"
    if factory.startswith("IVF"):
        return "nprobe"
    return None


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top `k` by inner product, scanning `vectors` where they lie (a flat index
    would first copy them all: 1.5 GB more at a million vectors of 384 dimensions)."""
    _, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                       np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def measure_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int,
                   params: faiss.SearchParameters | None, truth: np.ndarray | None = None) -> float:
    """Mean share of the exact top-k that `index` returns for `queries`."""
    if truth is None:
        truth = exact_neighbours(vectors, queries, k)
    _, found = index.search(queries, k, params=params)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found, strict=True)]))


def tune(index: faiss.Index, factory: str, vectors: np.ndarray, target: float = TARGET_RECALL,
         queries: int = 500) -> IndexPlan:
    """Raise the search parameter until recall@10 vs exact reaches `target` on sample queries."""
    name = _param_name(factory)
    if name is None:
        return IndexPlan(factory)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(vectors), min(queries, len(vectors)), replace=False)
    # queries near, not on, indexed points: like real queries, which are never exact copies
    sample = vectors[picks] + rng.normal(scale=0.05, size=(len(picks), vectors.shape[1])).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    truth = exact_neighbours(vectors, sample, 10)
    limit = faiss.extract_index_ivf(index).nlist if name == "nprobe" else 4096
    value, recall = 16, 0.0
    while True:
        recall = measure_recall(index, vectors, sample, 10, search_parameters(factory, {name: value}), truth)
        if recall >= target or value >= limit:
            break
        value = min(limit, value * 2)
    if recall < target:
        logger.warning("%s reaches recall@10 %.3f at most (target %.2f)", factory, recall, target)
    return IndexPlan(factory, {name: value}, round(recall, 4))


def build_index(vectors: np.ndarray, factory: str | None = None, memory_budget_bytes: int = 8 << 30,
                use_gpu: bool = True, exact_threshold: int = EXACT_THRESHOLD) -> tuple[faiss.Index, IndexPlan]:
    """Build and tune an inner-product index over unit-norm float32 `(N, D)` vectors.

    `factory`: a FAISS factory string that overrides the automatic choice.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    chosen = factory or choose_factory(count, dim, memory_budget_bytes, exact_threshold)
    if count:
        logger.info("building %s over %d vectors of dim %d%s", chosen, count, dim,
                    " on the GPU" if use_gpu and gpu_count() else "")
    index = _train_and_add(chosen, vectors, use_gpu)
    plan = tune(index, chosen, vectors) if count else IndexPlan(chosen)
    return index, plan
