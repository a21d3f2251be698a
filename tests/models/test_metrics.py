"""Recall@K (chunked, argpartition) against a plain full-matrix reference, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import retrieval_recall, wilson_interval


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_recall(images, texts, owner, ks):
    """Ten lines, no tricks: rank everything, look for the truth in the first k."""
    scores = texts @ images.T  # (T, I)
    out = {}
    for k in ks:
        t2i = [owner[t] in np.argsort(-scores[t], kind="stable")[:k] for t in range(len(texts))]
        i2t = [(owner[np.argsort(-scores[:, i], kind="stable")[:k]] == i).any() for i in range(len(images))]
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i))
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t))
    return out


@pytest.mark.parametrize("chunk", [7, 1024])
def test_matches_reference(chunk: int) -> None:
    rng = np.random.default_rng(0)
    images = _unit(rng.normal(size=(60, 16)).astype(np.float32))
    owner = np.repeat(np.arange(60), rng.integers(1, 4, size=60))  # 1-3 captions per image
    texts = _unit(images[owner] + rng.normal(scale=0.9, size=(len(owner), 16)).astype(np.float32))
    ks = (1, 5, 10)
    got = retrieval_recall(images, texts, owner, ks, chunk=chunk)
    want = reference_recall(images, texts, owner, ks)
    assert got == pytest.approx(want)
    assert 0 < got["text_to_image_R@1"] < 1  # the data is neither trivial nor hopeless


@pytest.mark.parametrize("chunk", [5, 1024])
def test_ties_go_to_the_lower_index_on_every_machine(chunk: int) -> None:
    """Equal texts embed equally (MiniLM is uncased: "The letter p." and "The letter P." tie exactly),
    so a truth can tie with another item at the k-th place. argpartition alone picks among such ties
    by its own algorithm, which differs with numpy's SIMD path: the default model's image -> text
    R@10 read 238 of 435 on one CPU and 239 on another. Ties must go to the lower index, as in the
    reference's stable sort."""
    rng = np.random.default_rng(2)
    # few distinct directions, each image and text one of them: nearly every score ties with others.
    # Small integers, so that every product sums exactly in any order (the reference multiplies the
    # other way round); recall needs no unit norm
    directions = rng.integers(-3, 4, size=(6, 8)).astype(np.float32)
    images = directions[rng.integers(0, 6, size=50)]
    owner = np.repeat(np.arange(50), rng.integers(1, 3, size=50))
    texts = directions[rng.integers(0, 6, size=len(owner))]
    ks = (1, 5, 10)
    got = retrieval_recall(images, texts, owner, ks, chunk=chunk)
    assert got == reference_recall(images, texts, owner, ks)
    assert 0 < got["text_to_image_R@10"] < 1 and 0 < got["image_to_text_R@10"] < 1


def test_nan_embeddings_are_refused_by_name() -> None:
    images = np.eye(4, dtype=np.float32)
    images[2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite embeddings"):
        retrieval_recall(images, np.eye(4, dtype=np.float32), np.arange(4))


def test_image_to_text_searches_the_documents_when_given() -> None:
    """`documents`: the texts as image->text searches them (a caption index); text->image keeps
    the queries. Each direction equals the plain reference on its own texts."""
    rng = np.random.default_rng(1)
    images = _unit(rng.normal(size=(40, 16)).astype(np.float32))
    owner = np.repeat(np.arange(40), 2)
    queries = _unit(images[owner] + rng.normal(scale=0.9, size=(80, 16)).astype(np.float32))
    documents = _unit(images[owner] + rng.normal(scale=0.5, size=(80, 16)).astype(np.float32))
    got = retrieval_recall(images, queries, owner, (1, 5), chunk=7, documents=documents)
    as_queries, as_documents = reference_recall(images, queries, owner, (1, 5)), reference_recall(
        images, documents, owner, (1, 5))
    for key, value in got.items():
        assert value == pytest.approx((as_documents if key.startswith("image_to_text") else as_queries)[key]), key
    assert as_documents != as_queries  # the two really differ here


def test_perfect_and_k_larger_than_gallery() -> None:
    images = np.eye(4, dtype=np.float32)
    recall = retrieval_recall(images, images.copy(), np.arange(4), ks=(1, 10))
    assert all(value == 1.0 for value in recall.values())


@pytest.mark.parametrize(("hits", "n"), [(50, 100), (260, 435), (3, 40), (0, 100), (100, 100)])
def test_wilson_interval_bounds_solve_the_score_equation(hits: int, n: int) -> None:
    # The Wilson bounds are the p where the observed share is exactly z standard errors of p away.
    share, z = hits / n, 1.96
    low, high = wilson_interval(share, n)
    assert 0.0 <= low <= share <= high <= 1.0
    for bound in (low, high):
        assert (share - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, abs=1e-12)
    if hits == 0:
        assert low == 0.0 and high == pytest.approx(0.037, abs=0.001)  # the "rule of three" region


def test_wilson_interval_known_value_and_empty() -> None:
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 0) == (0.0, 1.0)
