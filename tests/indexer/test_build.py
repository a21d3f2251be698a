"""Index choice and ANN parity: recall@10 against exact `IndexFlatIP` on synthetic vectors."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.artifacts import read_faiss, search_parameters, write_faiss
from indexer.build import build_index, choose_factory, gpu_count, measure_recall


def clustered_vectors(count: int, dim: int, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around fixed random centres: the shape real embedding sets have. Other seeds
    draw other points (queries) from the same distribution."""
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, clusters, count)] + rng.normal(scale=0.6, size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_choice_by_size_and_budget() -> None:
    assert choose_factory(5_000, 512, 8 << 30) == "Flat"
    assert choose_factory(1_000_000, 512, 8 << 30) == "HNSW32"
    assert choose_factory(10_000_000, 512, 8 << 30) == "IVF16384,SQ8"
    ivf = choose_factory(100_000_000, 512, 8 << 30)
    assert ivf.startswith("IVF") and ",PQ" in ivf
    lists, code = ivf[3:].split(",PQ")
    assert 512 % int(code) == 0 and int(lists) >= 1024


@pytest.mark.parametrize("factory", ["HNSW32", "IVF256,SQ8"])
def test_ann_recall_at_10_against_exact(factory: str) -> None:
    vectors = clustered_vectors(20_000, 64)
    index, plan = build_index(vectors, factory=factory, use_gpu=False)
    assert plan.factory == factory and plan.recall_at_10 is not None and plan.recall_at_10 >= 0.95
    # independent queries, with the tuned parameters passed per call
    queries = clustered_vectors(300, 64, seed=1)
    params = search_parameters(factory, plan.search_params)
    assert measure_recall(index, vectors, queries, 10, params) >= 0.95


def test_small_sets_are_exact_and_never_return_missing_ids() -> None:
    vectors = clustered_vectors(50, 16)
    index, plan = build_index(vectors, use_gpu=False)
    assert plan.factory == "Flat" and plan.search_params == {}
    scores, ids = index.search(vectors[:3], 10)
    exact = vectors[:3] @ vectors.T
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :10], atol=1e-5)
    assert (ids[:, 0] == np.arange(3)).all()
    _, ids = index.search(vectors[:1], 80)  # k over the index size: faiss pads with -1
    assert (ids[0, 50:] == -1).all()


def test_empty_index_builds() -> None:
    index, plan = build_index(np.zeros((0, 8), np.float32), use_gpu=False)
    assert index.ntotal == 0 and plan.factory == "Flat"


def _mapped(path: Path) -> bool:
    """Whether this process maps `path` (Linux: /proc/self/maps names every mapped file)."""
    return any(line.rstrip().endswith(str(path.resolve())) for line in Path("/proc/self/maps").open())


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,SQ8"])
def test_a_written_index_reads_back_mapped_and_searches_alike(tmp_path: Path, factory: str) -> None:
    """Servers and the indexer's read-back map the stored vectors instead of copying them: the same
    answers as the index that was built, and the file itself mapped where FAISS can (flat codes)."""
    vectors = clustered_vectors(3_000, 32)
    index, plan = build_index(vectors, factory=factory, use_gpu=False)
    path = tmp_path / "image.faiss"
    write_faiss(index, path)
    read = read_faiss(path)
    queries = clustered_vectors(50, 32, seed=1)
    params = search_parameters(factory, plan.search_params)
    want, got = index.search(queries, 10, params=params), read.search(queries, 10, params=params)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    if factory != "IVF64,SQ8":  # IVF lists are read into memory either way
        assert _mapped(path)
    del read
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # cut short: refused, as a copying read refuses it
    with pytest.raises(RuntimeError):
        read_faiss(path)


@pytest.mark.gpu
def test_gpu_build_matches_cpu() -> None:
    assert gpu_count() > 0, "faiss sees no GPU (install the gpu extra: faiss-gpu)"
    vectors = clustered_vectors(30_000, 64)
    gpu_index, plan = build_index(vectors, factory="IVF256,Flat", use_gpu=True)
    assert isinstance(gpu_index, faiss.Index) and plan.recall_at_10 >= 0.95
