"""`clipsearch serve`: run the service under uvicorn with settings from CLIPSEARCH_* and flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.settings import Settings

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
                    workers=settings.workers, timeout_keep_alive=settings.keep_alive_s, log_level="info")
        return 0
    from app.main import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                timeout_keep_alive=settings.keep_alive_s, log_level="info")
    return 0


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the search service (settings: CLIPSEARCH_* variables)")
    parser.add_argument("--index", type=Path, default=None, help="index directory (default indexes/default)")
    parser.add_argument("--model", default=None, help="the model the index was built with (default: default)")
    parser.add_argument("--host", default=None, help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 8000")
    parser.add_argument("--workers", type=int, default=None, help="server processes (default 1)")
    parser.add_argument("--device", default=None)
    parser.set_defaults(handler=_serve)
