"""`create_app(settings)`: the FastAPI service. Nothing heavy happens at import time; the lifespan
loads the model and the index, warms them up, starts the batchers and the index hot reloader."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTooLarge, error_body, install_error_handlers
from app.observability import Metrics
from app.routes import embed, health, items, search
from app.search import SearchService, load_serving_index
from app.settings import Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/static", "/favicon.ico")


async def _json_error(send: Send, status: int, type_: str, message: str) -> None:
    import json

    body = json.dumps(error_body(type_, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: at once on Content-Length, else while it streams
    in (chunked), before anything is parsed or spooled. Starlette has no limit of its own."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.limit:,} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    await _json_error(send, 400, "bad_request", "invalid Content-Length")
                    return
                if too_big:
                    await _json_error(send, 413, "payload_too_large", message)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            if outgoing["type"] == "http.response.start":
                started = True
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _json_error(send, 413, "payload_too_large", message)


class Observe:
    """Count requests and time them per route template; check API keys on /v1 routes."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_keys: list[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.api_keys = [k.encode() for k in api_keys]

    def _authorised(self, scope: Scope) -> bool:
        if not self.api_keys or scope["path"].startswith(OPEN_PATHS) or scope["path"] == "/":
            return True
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-api-key") or b""
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        # compare against every key, always, in constant time per key
        return any([hmac.compare_digest(given, key) for key in self.api_keys])  # noqa: C419

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not self._authorised(scope):
                status = 401
                await _json_error(send, 401, "unauthorized", "missing or wrong API key")
            else:
                await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)


async def _reload_loop(app: FastAPI, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        service: SearchService | None = getattr(app.state, "service", None)
        if service is not None:
            try:
                await asyncio.to_thread(service.try_reload)
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad candidate
                logger.exception("index reload check failed")


def _warm_up(service: SearchService) -> None:
    from PIL import Image

    service.encoder.encode_texts(["warm up"])
    service.encoder.encode_images([Image.new("RGB", (32, 32), (128, 128, 128))])


def create_app(settings: Settings | None = None, encoder: Any = None) -> FastAPI:
    """Build the app. `encoder`: an already loaded model (tests); by default `settings.model`."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = encoder
        if model is None:
            from models import load_encoder

            model = await asyncio.to_thread(load_encoder, settings.model, settings.pretrained, settings.device,
                                            precision=settings.precision)
        # no local name for the first index: this frame lives as long as the server, and would keep
        # that version (its FAISS index and metadata) in memory after every hot reload
        service = SearchService(model, await asyncio.to_thread(load_serving_index, settings, model), settings,
                                metrics)
        await asyncio.to_thread(_warm_up, service)
        service.start()
        app.state.service = service
        logger.info("serving %d items of index %s with model %s (%s)", len(service.index.metadata),
                    service.index.version, model.fingerprint, model.runs_as)
        reloader = (asyncio.get_running_loop().create_task(_reload_loop(app, settings.reload_interval_s))
                    if settings.reload_interval_s > 0 else None)
        try:
            yield
        finally:
            app.state.draining = True
            if reloader is not None:
                reloader.cancel()
            await service.stop()
            app.state.service = None

    app = FastAPI(
        title="clipsearch",
        version="0.1.0",
        summary="Cross-modal image and text search with a CLIP-style dual encoder.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.draining = False
    install_error_handlers(app)
    for router in (search.router, embed.router, items.router, health.router):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"X-Content-Type-Options": "nosniff"})

    app.add_middleware(Observe, metrics=metrics, api_keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
