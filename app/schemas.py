"""Request and response models of the HTTP API (pydantic v2); they are also the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_K = 1000


def _not_blank(text: str) -> str:
    # a search box sent with only spaces: the model would embed it, and every answer would be noise
    if not text.strip():
        raise ValueError("the text is blank (only whitespace)")
    return text


# a query text: at least one character that is not whitespace
QueryText = Annotated[str, AfterValidator(_not_blank)]


class FilterSpec(BaseModel):
    """A metadata condition; all given operators must hold. `field`: `source`, `caption`, `width`,
    `height`, or an extra manifest column."""

    model_config = ConfigDict(extra="forbid")
    field: str = Field(min_length=1, max_length=100)
    eq: str | int | float | bool | None = None
    prefix: str | None = Field(None, max_length=1000)
    contains: str | None = Field(None, max_length=1000)
    gte: float | None = None
    lte: float | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> FilterSpec:
        if all(v is None for v in (self.eq, self.prefix, self.contains, self.gte, self.lte)):
            raise ValueError("a filter needs at least one of eq, prefix, contains, gte, lte")
        return self


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    offset: int = Field(0, ge=0, le=MAX_K, description="results to skip (paging)")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="drop results scoring below this")
    filters: list[FilterSpec] = Field(default_factory=list, max_length=16)


class TextSearchRequest(SearchOptions):
    query: QueryText = Field(min_length=1, max_length=10_000, examples=["a bird"])


class ImageSearchRequest(SearchOptions):
    """JSON form of an image query: a base64 image, or the id of an indexed item."""

    image_base64: str | None = Field(None, description="the image file, base64-encoded")
    id: int | None = Field(None, ge=0, description="an indexed item to use as the query")
    target: Literal["images", "texts"] = "images"

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageSearchRequest:
        if (self.image_base64 is None) == (self.id is None):
            raise ValueError("give exactly one of image_base64 and id")
        return self


# One number of an embedding: JSON parsed by Python may spell NaN and Infinity, no vector holds them.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class QueryTerm(BaseModel):
    """One weighted part of a composed query: a text, a base64 image, an indexed item's id, or an
    embedding of this model (`/v1/embed/...` or `/v1/embeddings` give them; normalised here)."""

    model_config = ConfigDict(extra="forbid")
    text: QueryText | None = Field(None, min_length=1, max_length=10_000)
    image_base64: str | None = None
    id: int | None = Field(None, ge=0)
    vector: list[FiniteFloat] | None = Field(None, min_length=1, max_length=8192)
    weight: float = Field(1.0, ge=-10.0, le=10.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> QueryTerm:
        if sum(v is not None for v in (self.text, self.image_base64, self.id, self.vector)) != 1:
            raise ValueError("a term has exactly one of text, image_base64, id, vector")
        return self


class ComposedSearchRequest(SearchOptions):
    terms: list[QueryTerm] = Field(min_length=1, max_length=16)
    target: Literal["images", "texts"] = "images"


class SearchResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    score: float
    source: str | None = None
    caption: str | None = None


class SearchResponse(BaseModel):
    results: list[SearchResult]
    next_offset: int | None = Field(None, description="offset of the next page, when there may be one")
    index_version: str
    took_ms: float


# Which side of the joint space a text is embedded for: "query" to search images with, "caption" to
# be found by images (image -> text), as the indexer embeds a caption index: through the model's
# image bank, when it has one.
TextRole = Literal["query", "caption"]


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=256)
    role: TextRole = "query"


class EmbedImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    model: str
    took_ms: float


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI-compatible body; `model` is accepted and ignored (the server has one model). `role`
    is ours, as in `/v1/embed/text` (OpenAI clients send it as an extra body field); `dimensions`
    must be the model's own when given: a shortened vector of this model is not a valid embedding."""

    # token ids (lists of ints) are accepted by the schema only to be refused with a useful message
    input: str | list[str] | list[int] | list[list[int]] = Field(examples=["a bird"])
    model: str | None = None
    # the official OpenAI clients ask for base64 unless told otherwise
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    role: TextRole = "query"


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or with encoding_format base64 the base64 of "
                                                     "the little-endian float32 values")


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class Item(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    source: str
    caption: str
    width: int
    height: int
    duplicates: list[str]
    extra: dict[str, Any]


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)
