"""Health routes: liveness, readiness (model + index + a real encode + batchers) and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import lifecycle

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (says nothing about the model)."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready for traffic: model and index loaded, batchers running, a real encode succeeds, and
    not shutting down. 503 otherwise: a load balancer sends nothing meanwhile."""
    state = request.app.state
    service = getattr(state, "service", None)
    problems = []
    if getattr(state, "draining", False) or lifecycle.draining.is_set():
        problems.append("shutting down")
    if service is None:
        problems.append(getattr(state, "load_error", None) or "loading")
    elif not service.batchers_alive:
        problems.append("a model worker stopped")
    else:
        try:
            await asyncio.wait_for(service.embed_texts(["ready"]), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            problems.append(f"probe encode failed: {type(exc).__name__}")
    if problems or service is None:
        return JSONResponse({"status": "not_ready", "detail": {"problems": problems}}, 503,
                            headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "detail": {"index_version": service.index.version,
                                                       "items": len(service.index.metadata)}})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
