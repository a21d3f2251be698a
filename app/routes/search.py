"""Search routes: text -> images, image -> images or texts, and composed weighted queries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field

from app.deps import ServiceDep
from app.errors import InvalidInput
from app.filters import Filter
from app.routes.inputs import decode_base64, image_body_openapi, read_image_request
from app.schemas import (
    ComposedSearchRequest,
    FilterSpec,
    ImageSearchRequest,
    SearchOptions,
    SearchResponse,
    TextSearchRequest,
)
from app.search import SearchService, as_result

router = APIRouter(prefix="/v1/search", tags=["search"])


class ImageSearchForm(SearchOptions):
    """The fields of a multipart image search besides `file`."""

    target: Literal["images", "texts"] = Field("images")


def _filters(specs: Sequence[FilterSpec]) -> list[Filter]:
    return [Filter(s.field, s.eq, s.prefix, s.gte, s.lte, s.contains) for s in specs]


async def respond(service: SearchService, vector: np.ndarray, target: str, options: SearchOptions,
                  started: float) -> SearchResponse:
    if options.offset + options.k > service.settings.max_k:
        raise InvalidInput(f"offset + k must be at most {service.settings.max_k}")
    if target == "texts" and options.filters:
        raise InvalidInput("filters apply to image searches only")
    index, hits = await service.search(vector, target, options.k, options.offset, options.min_score,
                                       _filters(options.filters))
    total = index.image_index.ntotal if target == "images" else index.text_index.ntotal
    more = len(hits) == options.k and options.offset + options.k < total
    return SearchResponse(
        results=[as_result(index, h, target) for h in hits],
        next_offset=options.offset + options.k if more else None,
        index_version=index.version,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


@router.post("/text", response_model=SearchResponse, response_model_exclude_none=True)
async def search_text(body: TextSearchRequest, service: ServiceDep) -> SearchResponse:
    """Text -> images: the indexed images closest to the query text."""
    started = time.perf_counter()
    vector = (await service.embed_texts([body.query]))[0]
    return await respond(service, vector, "images", body, started)


@router.post(
    "/image", response_model=SearchResponse, response_model_exclude_none=True,
    openapi_extra=image_body_openapi("ImageSearchRequest", {
        "k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "offset": {"type": "integer", "minimum": 0, "maximum": 1000},
        "target": {"type": "string", "enum": ["images", "texts"]},
    }),
)
async def search_image(request: Request, service: ServiceDep) -> SearchResponse:
    """Image -> images (`target=images`, "more like this") or image -> texts (`target=texts`:
    zero-shot labelling over the caption/label index). The query is an uploaded `file`, a base64
    image, or the `id` of an indexed item."""
    started = time.perf_counter()
    options, data = await read_image_request(request, ImageSearchRequest, ImageSearchForm)
    if data is not None:
        vector = await service.embed_image_bytes(data)
    else:
        vector = service.stored_vector(options.id)
    return await respond(service, vector, options.target, options, started)


async def _term_vector(service: SearchService, term: Any) -> np.ndarray:
    if term.text is not None:
        return (await service.embed_texts([term.text]))[0]
    if term.image_base64 is not None:
        return await service.embed_image_bytes(decode_base64(term.image_base64, "terms.image_base64"))
    if term.vector is not None:
        return service.given_vector(term.vector)
    return service.stored_vector(term.id)


@router.post("", response_model=SearchResponse, response_model_exclude_none=True)
async def search_composed(body: ComposedSearchRequest, service: ServiceDep) -> SearchResponse:
    """Composed query: the weighted sum of several text / image / item / vector terms, renormalised.
    Negative weights subtract ("beach" minus "people"; this image plus "red")."""
    started = time.perf_counter()
    vectors = [await _term_vector(service, term) for term in body.terms]
    combined = np.sum([t.weight * v for t, v in zip(body.terms, vectors, strict=True)], axis=0)
    norm = float(np.linalg.norm(combined))
    if norm < 1e-6:
        raise InvalidInput("the weighted terms cancel out; change the weights")
    return await respond(service, (combined / norm).astype(np.float32), body.target, body, started)
