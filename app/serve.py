"""`clipsearch serve`: run the service under uvicorn with settings from CLIPSEARCH_* and flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

# Startup errors whose message says all there is to say: a missing model, an index made with
# another model, a bad setting. Anything else keeps its traceback, since that is a bug to report.
SELF_EXPLAINING = ("FileNotFoundError", "KeyError", "ValueError", "NotReady", "InvalidIndex", "FingerprintMismatch")


class StartupErrorInOneLine(logging.Filter):
    """uvicorn logs the whole traceback of a failed lifespan startup. For the self-explaining
    errors, keep only what went wrong: "cannot start: model directory /x not found"."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Traceback (most recent call last)"):
            kind, _, text = message.rstrip().splitlines()[-1].partition(": ")
            kind = kind.rsplit(".", 1)[-1]
            if kind in SELF_EXPLAINING:
                if kind == "KeyError":  # str(KeyError) is the repr of its message
                    text = text[1:-1] if text[:1] in "'\"" and text[:1] == text[-1:] else text
                record.msg, record.args = f"cannot start: {text}", ()
        return True


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.settings import Settings

    logging.getLogger("uvicorn.error").addFilter(StartupErrorInOneLine())

    overrides = {k: v for k, v in {"index_dir": args.index, "model": args.model, "host": args.host,
                                   "port": args.port, "workers": args.workers, "device": args.device}.items()
                 if v is not None}
    settings = Settings(**overrides)  # flags win over the environment
    if settings.workers > 1:
        # each worker process builds its own app (and model) from the environment
        import os

        for key, value in overrides.items():
            os.environ[f"CLIPSEARCH_{key.upper()}"] = str(value)
        uvicorn.run("app.main:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, timeout_keep_alive=settings.keep_alive_s, log_level="info",
                    http=coalescing_protocol())
        return 0
    from app.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, timeout_keep_alive=settings.keep_alive_s,
                            log_level="info", http=coalescing_protocol())
    DrainingServer(config, app.state, settings.drain_s).run()
    return 0


class _CoalescingTransport:
    """Collects the writes of one event-loop turn and sends them as one: uvicorn writes a
    response's head and body separately, and a replica killed between the two leaves the load
    balancer holding a response head it can no longer retry. One write leaves no such gap."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing_protocol() -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol writing each response (head + body) in a single send."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class CoalescingH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            wrapped: Any = _CoalescingTransport(transport, self.loop)
            super().connection_made(wrapped)

    return CoalescingH11Protocol


class DrainingServer:
    """uvicorn with a graceful SIGTERM: first /readyz turns 503 (app.state.draining) while the
    server keeps answering, then after `drain_s` uvicorn stops accepting and finishes in-flight
    requests. A load balancer thus stops sending before the listener closes. SIGINT and a second
    SIGTERM stop at once."""

    def __init__(self, config: Any, state: Any, drain_s: float) -> None:
        import uvicorn

        server = uvicorn.Server(config)
        original = server.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and not state.draining and drain_s > 0:
                state.draining = True
                logging.getLogger(__name__).info("SIGTERM: draining for %.1f s, then stopping", drain_s)
                timer = threading.Timer(drain_s, original, args=(sig, frame))
                timer.daemon = True
                timer.start()
                return
            original(sig, frame)

        server.handle_exit = handle_exit  # type: ignore[method-assign]
        self.server = server

    def run(self) -> None:
        self.server.run()


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the search service (settings: CLIPSEARCH_* variables)")
    parser.add_argument("--index", type=Path, default=None, help="index directory (default indexes/default)")
    parser.add_argument("--model", default=None, help="the model the index was built with (default: default)")
    parser.add_argument("--host", default=None, help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 8000")
    parser.add_argument("--workers", type=int, default=None, help="server processes (default 1)")
    parser.add_argument("--device", default=None)
    parser.set_defaults(handler=_serve)
