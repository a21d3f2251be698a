"""Embedding routes: vectors for users who keep their own store, and an OpenAI-compatible endpoint."""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.deps import ServiceDep
from app.errors import InvalidInput
from app.routes.inputs import image_body_openapi, read_image_request
from app.schemas import (
    EmbedImageRequest,
    EmbedResponse,
    EmbedTextRequest,
    OpenAIEmbedding,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
)
from app.search import SearchService

router = APIRouter(tags=["embed"])


class _NoFields(BaseModel):
    pass


def _response(vectors: np.ndarray, service: SearchService, started: float) -> EmbedResponse:
    return EmbedResponse(embeddings=vectors.tolist(), dim=int(vectors.shape[1]),
                         model=str(service.encoder.fingerprint),
                         took_ms=round((time.perf_counter() - started) * 1000, 2))


@router.post("/v1/embed/text", response_model=EmbedResponse)
async def embed_text(body: EmbedTextRequest, service: ServiceDep) -> EmbedResponse:
    """Float32, L2-normalised text embeddings, one per input, in order. `role`: `query` (default)
    to search images with, `caption` to store for image -> text search (as a caption index holds
    them: through the model's image bank, when it has one)."""
    started = time.perf_counter()
    if len(body.texts) > service.settings.inputs_per_request:
        raise InvalidInput(f"at most {service.settings.inputs_per_request} texts per request: send them in parts")
    return _response(await service.embed_for(body.texts, body.role), service, started)


@router.post("/v1/embed/image", response_model=EmbedResponse,
             openapi_extra=image_body_openapi("EmbedImageRequest", {}))
async def embed_image(request: Request, service: ServiceDep) -> EmbedResponse:
    """The embedding of one image: multipart `file`, or JSON `{"image_base64": ...}`."""
    started = time.perf_counter()
    _, data = await read_image_request(request, EmbedImageRequest, _NoFields)
    assert data is not None
    vector = await service.embed_image_bytes(data)
    return _response(vector.reshape(1, -1), service, started)


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse)
async def openai_embeddings(body: OpenAIEmbeddingRequest, service: ServiceDep) -> OpenAIEmbeddingResponse:
    """OpenAI-compatible text embeddings, so existing embedding clients work unchanged. `role`
    (an extra field) as in `/v1/embed/text`: `caption` for texts to be found by images."""
    given = [body.input] if isinstance(body.input, str) else body.input
    texts = [t for t in given if isinstance(t, str)]
    if len(texts) != len(given):
        # LangChain's OpenAIEmbeddings sends tiktoken ids by default: ids of OpenAI's tokenizer, not ours
        raise InvalidInput("input holds token ids; this server embeds text: send strings (LangChain's "
                           "OpenAIEmbeddings: check_embedding_ctx_length=False)")
    if not texts or any(not t for t in texts):
        raise InvalidInput("input must be a non-empty string or a list of non-empty strings")
    limit = service.settings.inputs_per_request
    if len(texts) > limit:
        raise InvalidInput(f"at most {limit} inputs per request: send them in parts "
                           f"(LangChain's OpenAIEmbeddings: chunk_size={limit})")
    if body.dimensions is not None and body.dimensions != service.encoder.dim:
        # answered rather than ignored: a client asking for fewer dimensions would store vectors of
        # another length than it expects
        raise InvalidInput(f"this model embeds in {service.encoder.dim} dimensions; "
                           f"dimensions={body.dimensions} is not offered (leave it out)")
    vectors = await service.embed_for(texts, body.role)
    tokens = sum(len(t.split()) for t in texts)  # a word count: the tokenizer's count is model-specific
    return OpenAIEmbeddingResponse(
        data=[OpenAIEmbedding(index=i, embedding=_encoded(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=str(service.encoder.fingerprint),
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )


def _encoded(vector: np.ndarray, encoding_format: str | None) -> list[float] | str:
    """One embedding as the client asked for it: floats, or base64 of little-endian float32 bytes
    (what the official OpenAI clients request by default, and decode)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
