"""Filtered searches find the best allowed items: in approximate indexes exactly among a rare
subset, through the index with a raised search parameter otherwise; both checked against a
plain exact search restricted to the same ids."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from app.search import exact_among, search_allowed
from indexer.build import build_index

COUNT, DIM, K = 30_000, 32, 10


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(300, DIM))
    points = centres[rng.integers(0, 300, COUNT)] + rng.normal(scale=0.35, size=(COUNT, DIM))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


@pytest.fixture(scope="module", params=["Flat", "HNSW32", "IVF128,Flat"])
def built(request, vectors) -> tuple[faiss.Index, dict]:
    index, plan = build_index(vectors, factory=request.param, use_gpu=False)
    return index, {"factory": plan.factory, "search_params": plan.search_params}


def _queries(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = vectors[rng.choice(len(vectors), count, replace=False)] + rng.normal(scale=0.05, size=(count, DIM))
    return (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)


def _reference(vectors: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))  # type: ignore[call-arg]
    return exact.search(query, k, params=params)[1][0]


@pytest.mark.parametrize("size", [1, 5, 20, 300, 5_000])
def test_a_rare_subset_is_searched_exactly(built, vectors, size) -> None:
    index, spec = built
    rng = np.random.default_rng(size)
    allowed = np.sort(rng.choice(COUNT, size, replace=False)).astype(np.int64)
    for query in _queries(vectors, 10, size):
        scores, ids = search_allowed(index, spec, vectors, allowed, query[None], min(K, size))
        assert ids.shape == (1, min(K, size))  # k results whenever k items are allowed
        assert ids[0].tolist() == _reference(vectors, allowed, query[None], min(K, size)).tolist()
        assert np.all(np.diff(scores[0]) <= 0)
        np.testing.assert_allclose(scores[0], vectors[ids[0]] @ query, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share", [0.03, 0.2, 0.6])
def test_a_common_subset_goes_through_the_index_with_a_raised_parameter(built, vectors, share) -> None:
    index, spec = built
    rng = np.random.default_rng(int(share * 100))
    allowed = np.sort(rng.choice(COUNT, int(COUNT * share), replace=False)).astype(np.int64)
    recalls = []
    for query in _queries(vectors, 50, 1):
        _, ids = search_allowed(index, spec, vectors, allowed, query[None], K, exact_limit=0)
        assert np.isin(ids[0], allowed).all() and (ids[0] >= 0).all()
        recalls.append(len(set(ids[0].tolist()) & set(_reference(vectors, allowed, query[None], K).tolist())) / K)
    assert np.mean(recalls) >= 0.9, (spec, share, np.mean(recalls))


def test_a_share_beyond_the_graphs_reach_is_searched_exactly(vectors) -> None:
    """A filter allowing more items than the exact limit, but so small a share that the HNSW graph
    would need an efSearch above its cap (a small share of a very large index), is scored exactly:
    at the cap the graph finds fewer of the allowed items. Shown here with a low cap."""
    index, plan = build_index(vectors, factory="HNSW32", use_gpu=False)
    spec = {"factory": plan.factory, "search_params": plan.search_params}
    ef = plan.search_params["efSearch"]
    allowed = np.sort(np.random.default_rng(7).choice(COUNT, COUNT // 50, replace=False)).astype(np.int64)
    capped = []
    for query in _queries(vectors, 30, 2):
        want = _reference(vectors, allowed, query[None], K).tolist()
        _, ids = search_allowed(index, spec, vectors, allowed, query[None], K, exact_limit=0, max_ef=ef * 4)
        assert ids[0].tolist() == want
        through_graph = index.search(query[None], K, params=faiss.SearchParametersHNSW(
            efSearch=ef * 4, sel=faiss.IDSelectorBatch(allowed)))[1][0]  # what the capped search found
        capped.append(len(set(through_graph.tolist()) & set(want)) / K)
    assert np.mean(capped) < 0.95  # the case is real: the graph at the cap misses allowed items


@pytest.mark.parametrize("chunk", [1, 7, 1_000, 100_000])
def test_exact_scoring_in_chunks_equals_one_pass(vectors, chunk) -> None:
    allowed = np.sort(np.random.default_rng(3).choice(COUNT, 5_000, replace=False)).astype(np.int64)
    for query in _queries(vectors, 5, 4):
        scores, ids = exact_among(vectors, allowed, query[None], K, chunk=chunk)
        assert ids[0].tolist() == _reference(vectors, allowed, query[None], K).tolist()
        np.testing.assert_allclose(scores[0], vectors[ids[0]] @ query, rtol=1e-5, atol=1e-6)
    few = allowed[:3]  # fewer allowed than k: all of them, best first
    scores, ids = exact_among(vectors, few, _queries(vectors, 1, 5), K, chunk=chunk)
    assert sorted(ids[0].tolist()) == few.tolist() and np.all(np.diff(scores[0]) <= 0)
