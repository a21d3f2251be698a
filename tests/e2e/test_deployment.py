"""The deployment on loopback (RELIABILITY.md rows "deploy"): graceful SIGTERM of one server, and
the short form of `make lb-test`: nginx with docker/nginx.conf in front of 3 replicas under load
while one is SIGKILLed and restarted and another SIGTERMed and restarted: zero failed requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from app.lbtest import Replica, free_port_block, run_lb_test, wait_http
from indexer.reader import open_source
from indexer.runner import IndexConfig, run_index
from models import load_encoder
from models.checkpoint import save_model_dir
from models.encoder import create_model

from ..conftest import TINY, make_shapes_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model dir, index dir) of a tiny model and a small index."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    loaded = create_model(TINY)
    model_dir = save_model_dir(root / "model", loaded.model, loaded.model_config, loaded.preprocess_config,
                               {"architecture": TINY})
    data = make_shapes_folder(root / "data", per_class=4)
    run_index(open_source(data), load_encoder(model_dir, device="cpu"),
              IndexConfig(out_dir=root / "index", progress=False))
    return model_dir, root / "index"


def test_sigterm_drains_then_exits(served: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, index = served
    port = free_port_block(1)
    env = {**os.environ, "CLIPSEARCH_INDEX_DIR": str(index), "CLIPSEARCH_MODEL": str(model_dir),
           "CLIPSEARCH_DRAIN_S": "2", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", 120, process)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503  # not ready, still listening
        search = httpx.post(f"{base}/v1/search/text", json={"query": "a red circle"}, timeout=10)
        assert search.status_code == 200  # and still serving while it drains
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, -signal.SIGTERM)
    assert "draining" in (tmp_path / "server.log").read_text()


def test_serve_with_two_workers_answers_then_drains(served: tuple[Path, Path], tmp_path: Path) -> None:
    # `--workers N` hands the app factory, the HTTP protocol and the logging setup to worker
    # processes by import string; all of it must survive the trip, and so must the graceful SIGTERM.
    model_dir, index = served
    port = free_port_block(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_DRAIN_S": "2"}
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--index", str(index), "--model", str(model_dir),
         "--port", str(port), "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", 120, process)
        deadline = time.time() + 120
        while log.read_text().count("Application startup complete") < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert log.read_text().count("Application startup complete") == 2, log.read_text()
        for _ in range(8):
            search = httpx.post(f"{base}/v1/search/text", json={"query": "a red circle", "k": 3}, timeout=10)
            assert search.status_code == 200
            assert len(search.json()["results"]) == 3
        process.send_signal(signal.SIGTERM)  # the supervisor forwards it to both workers
        time.sleep(0.5)
        for _ in range(4):  # whichever worker answers, it is draining: not ready, still serving
            assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503
            search = httpx.post(f"{base}/v1/search/text", json={"query": "a red circle", "k": 3}, timeout=10)
            assert search.status_code == 200
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log.read_text()
    assert log.read_text().count("SIGTERM: draining") == 2, log.read_text()


def test_lb_short_form_zero_failures(served: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, index = served
    report = run_lb_test(index, str(model_dir), tmp_path / "lb", replicas=3, base_port=free_port_block(3),
                         clients=16, duration_s=15, image_share=0.3)
    assert report["failed"] == 0, report
    assert report["sent"] > 100
    assert len(report["events"]) == 5, report["events"]  # kill, restart, term, exit, restart
    assert len(report["share"]) >= 2


def test_a_replica_that_cannot_start_fails_at_once_with_its_log(served: tuple[Path, Path], tmp_path: Path) -> None:
    _, index = served
    port = free_port_block(1)
    env = {**os.environ, "CLIPSEARCH_INDEX_DIR": str(index), "CLIPSEARCH_MODEL": str(tmp_path / "no-such-model"),
           "PYTHONPATH": str(ROOT)}
    replica = Replica(port, env, tmp_path / "replica.log")
    replica.start()
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as info:
            replica.wait_ready(timeout_s=120)
    finally:
        assert replica.process is not None
        if replica.process.poll() is None:
            replica.process.kill()
    assert time.monotonic() - started < 100  # it did not sit out the timeout
    message = str(info.value)
    assert f"replica :{port}" in message and "exited" in message
    assert "no-such-model" in message  # the cause, from the replica's own log
