"""Item routes: metadata, the stored image and a thumbnail, found by id only (never by path)."""

from __future__ import annotations

import io

from fastapi import APIRouter, Path
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.deps import ServiceDep
from app.schemas import Item
from app.search import SearchService

router = APIRouter(prefix="/v1/items", tags=["items"])

ItemId = Path(ge=0, le=2**62, description="an item id from a search result")
_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}


@router.get("/{item_id}", response_model=Item)
async def get_item(service: ServiceDep, item_id: int = ItemId) -> Item:
    return Item(**service.item(item_id))


def _encoded(service: SearchService, item_id: int, max_side: int | None, fmt: str) -> bytes:
    image = service.item_image(item_id, max_side)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@router.get("/{item_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown id"}})
async def get_item_image(service: ServiceDep, item_id: int = ItemId) -> Response:
    """The indexed image, decoded and re-encoded as PNG (never the stored bytes as they are)."""
    data = await run_in_threadpool(_encoded, service, item_id, None, "PNG")
    return Response(data, media_type="image/png", headers=_HEADERS)


@router.get("/{item_id}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id"}})
async def get_item_thumbnail(service: ServiceDep, item_id: int = ItemId) -> Response:
    data = await run_in_threadpool(_encoded, service, item_id, service.settings.thumbnail_size, "JPEG")
    return Response(data, media_type="image/jpeg", headers=_HEADERS)
