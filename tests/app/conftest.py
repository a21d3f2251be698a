"""App fixtures: a small real index built with the tiny model, and clients running the lifespan."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from PIL import Image

from app.lbtest import wait_http
from app.main import create_app
from app.settings import Settings
from indexer.reader import open_source
from indexer.runner import IndexConfig, run_index
from models import load_encoder
from models.checkpoint import save_model_dir
from models.encoder import create_model

from ..conftest import TINY, make_shapes_folder


@pytest.fixture(scope="session")
def app_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    return save_model_dir(tmp_path_factory.mktemp("appmodel") / "model", loaded.model,
                          loaded.model_config, loaded.preprocess_config, {"architecture": TINY})


@pytest.fixture(scope="session")
def app_encoder(app_model_dir: Path):
    return load_encoder(app_model_dir, device="cpu")


def build_index(data: Path, out: Path, encoder) -> Path:
    run_index(open_source(data), encoder, IndexConfig(out_dir=out, batch_size=16, workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def index_dir(app_encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("appdata")
    data = make_shapes_folder(root / "data", per_class=5)
    import json

    (data / "red_circle" / "000.json").write_text(json.dumps({"unused": True}))
    return build_index(data, root / "index", app_encoder)


def png_bytes(color=(200, 30, 30), size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def running(settings: Settings, encoder) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """An AsyncClient on a started app (lifespan entered) and the app itself."""
    app = create_app(settings, encoder=encoder)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client, app


def settings_for(index: Path, **overrides) -> Settings:
    values = {"index_dir": index, "reload_interval_s": 0, "max_body_bytes": 256 * 1024}
    values.update(overrides)
    return Settings(**values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(settings: Settings, encoder) -> Iterator[str]:
    """A real uvicorn server on a free loopback port (in a thread) while the block runs; its base URL."""
    port = _free_port()
    app = create_app(settings, encoder=encoder)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", 60, thread=thread)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live_server(index_dir: Path, app_encoder) -> Iterator[str]:
    with serving(settings_for(index_dir), app_encoder) as base:
        yield base


@pytest.fixture()
def taken_port() -> Iterator[int]:
    """A loopback port another server listens on while the test runs."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]
