"""`clipsearch serve`: run the service under uvicorn with settings from CLIPSEARCH_* and flags."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from uvicorn.server import Server
from uvicorn.supervisors.multiprocess import Process

from app import lifecycle
from app.listen import ensure_can_listen
from models.precision import INFERENCE_HELP, PRECISIONS

WORKER_HEALTHCHECK_S = 30  # seconds a worker process may go without answering its supervisor

# Startup errors whose message says all there is to say: a missing model, an index made with
# another model, a bad setting. Anything else keeps its traceback, since that is a bug to report.
SELF_EXPLAINING = ("FileNotFoundError", "KeyError", "ValueError", "NotReady", "InvalidIndex", "FingerprintMismatch",
                   "WeightsNotCached")


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


def log_config() -> dict[str, Any]:
    """uvicorn's logging setup plus the one-line startup errors. Handed to uvicorn as a dict, so
    that worker processes (`--workers N`), which set up their own logging, apply it too."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["startup_one_line"] = {"()": f"{__name__}.StartupErrorInOneLine"}
    config["loggers"]["uvicorn.error"]["filters"] = ["startup_one_line"]
    return config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.protocol import IMPORT_STRING
    from app.settings import Settings

    overrides = {k: v for k, v in {"index_dir": args.index, "model": args.model, "pretrained": args.pretrained,
                                   "host": args.host, "port": args.port, "workers": args.workers,
                                   "device": args.device, "precision": args.precision}.items()
                 if v is not None}
    settings = Settings(**overrides)  # flags win over the environment
    ensure_can_listen(settings.host, settings.port)  # now, not after the model load
    common: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "timeout_keep_alive": settings.keep_alive_s,
        "log_level": "info", "log_config": log_config(), "http": IMPORT_STRING,
    }
    if settings.workers > 1:
        # each worker process builds its own app (and model) from the environment
        for key, value in overrides.items():
            os.environ[f"CLIPSEARCH_{key.upper()}"] = str(value)
        # A worker that takes long to exit (a loaded machine) would miss uvicorn's 5 s health check,
        # be SIGKILLed as hung, lose its "could not start" exit status and be restarted, forever.
        config = uvicorn.Config("app.main:create_app", factory=True, workers=settings.workers,
                                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **common)
        return run_workers(config)
    from app.main import create_app

    app = create_app(settings)
    drain_on_sigterm(uvicorn.Server(uvicorn.Config(app, **common)), settings.drain_s).run()
    return 0


def run_workers(config: Any) -> int:
    """uvicorn's multi-process supervisor, with draining workers (`DrainingWorker`) and an exit
    status: uvicorn.run returns 0 even when the workers could not start (a missing model), which
    would hide the failure from a caller."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess, multiprocess

    # The supervisor creates, and after a crash re-creates, its workers by this module-level name.
    multiprocess.Process = DrainingWorker  # type: ignore[misc]
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


def drain_on_sigterm(server: Any, drain_s: float) -> Any:
    """Give a uvicorn server a graceful SIGTERM: first /readyz turns 503 (`app.lifecycle.draining`)
    while the server keeps answering, then after `drain_s` uvicorn stops accepting and finishes
    in-flight requests. A load balancer thus stops sending before the listener closes. SIGINT and
    a second SIGTERM stop at once."""
    original = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not lifecycle.draining.is_set() and drain_s > 0:
            lifecycle.draining.set()
            # on uvicorn's own logger: a worker process configures only uvicorn's loggers
            logging.getLogger("uvicorn.error").info("SIGTERM: draining for %.1f s, then stopping", drain_s)
            timer = threading.Timer(drain_s, original, args=(sig, frame))
            timer.daemon = True
            timer.start()
            return
        original(sig, frame)

    server.handle_exit = handle_exit
    return server


class DrainingWorker(Process):
    """A worker process of `--workers N` whose server drains on SIGTERM like a single-process
    server does (the supervisor forwards its SIGTERM to every worker)."""

    @property
    def server(self) -> Server:
        if self._server is None:  # built in the worker process, from the same environment as its app
            from app.settings import Settings

            self._server = drain_on_sigterm(Server(config=self.config), Settings().drain_s)
        return self._server


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the search service (settings: CLIPSEARCH_* variables)")
    parser.add_argument("--index", type=Path, default=None, help="index directory (default indexes/default)")
    parser.add_argument("--model", default=None, help="the model the index was built with (default: default)")
    parser.add_argument("--pretrained", default=None,
                        help="with an architecture name: the pretrained tag or checkpoint file the index was built with")
    parser.add_argument("--host", default=None, help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 8000")
    parser.add_argument("--workers", type=int, default=None, help="server processes (default 1)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=INFERENCE_HELP)
    parser.set_defaults(handler=_serve)
