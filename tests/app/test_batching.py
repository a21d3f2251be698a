"""Dynamic batching under concurrency, overload, failures, dead workers and hot reload
(RELIABILITY.md rows "load" and "index")."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.batching import DynamicBatcher
from app.errors import ModelFailure, NotReady, Overloaded
from app.observability import Metrics

from .conftest import build_index, running, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SlowEncoder:
    """Wraps a real encoder: records batch sizes, can be slowed down or made to fail."""

    def __init__(self, encoder, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.inner = encoder
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.text_batches: list[int] = []
        self.dim, self.preprocess, self.fingerprint = encoder.dim, encoder.preprocess, encoder.fingerprint
        self.runs_as = encoder.runs_as

    def encode_texts(self, texts):
        self.text_batches.append(len(texts))
        time.sleep(self.delay_s)  # runs on the device thread, never on the event loop
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("simulated model failure")
        return self.inner.encode_texts(texts)

    def encode_images(self, images):
        return self.inner.encode_images(images)

    def encode_image_tensors(self, pixels):
        return self.inner.encode_image_tensors(pixels)


QUERIES = [f"a {c} {s} number {i}" for i in range(8) for c in ("red", "blue") for s in ("circle", "square")]


async def test_concurrent_requests_batch_and_match_unbatched(index_dir, app_encoder) -> None:
    model = SlowEncoder(app_encoder, delay_s=0.02)
    settings = settings_for(index_dir, max_batch_size=16, max_wait_ms=10)
    async with running(settings, model) as (client, _):
        responses = await asyncio.gather(*(client.post("/v1/embed/text", json={"texts": [q]}) for q in QUERIES))
        assert all(r.status_code == 200 for r in responses)
        got = np.array([r.json()["embeddings"][0] for r in responses])
        metrics = (await client.get("/metrics")).text
    assert max(model.text_batches) > 1, model.text_batches
    want = np.concatenate([app_encoder.encode_texts([q]) for q in QUERIES])  # one by one
    np.testing.assert_allclose(got, want, atol=1e-5)
    # /metrics shows batches above 1
    assert 'clipsearch_batch_size_bucket{le="1.0",modality="text"}' in metrics
    ones = float(metrics.split('clipsearch_batch_size_bucket{le="1.0",modality="text"} ')[1].split()[0])
    total = float(metrics.split('clipsearch_batch_size_count{modality="text"} ')[1].split()[0])
    assert total > ones


async def test_full_queue_answers_429_quickly(index_dir, app_encoder) -> None:
    model = SlowEncoder(app_encoder, delay_s=0.3)
    settings = settings_for(index_dir, max_batch_size=1, max_wait_ms=0, max_queue=2)
    async with running(settings, model) as (client, _):
        started = time.perf_counter()
        tasks = [asyncio.create_task(client.post("/v1/embed/text", json={"texts": [f"q{i}"]})) for i in range(12)]
        done = await asyncio.gather(*tasks)
        statuses = [r.status_code for r in done]
        shed = [r for r in done if r.status_code == 429]
        assert shed and statuses.count(200) >= 2, statuses
        assert all(r.headers["retry-after"] for r in shed)
        assert shed[0].json()["error"]["type"] == "overloaded"
        assert time.perf_counter() - started < 12 * 0.3  # excess was not queued behind the model
        assert (await client.post("/v1/embed/text", json={"texts": ["after"]})).status_code == 200  # recovers


async def test_failing_batch_fails_only_its_requests(index_dir, app_encoder) -> None:
    model = SlowEncoder(app_encoder, fail_on="poison")
    settings = settings_for(index_dir, max_batch_size=4, max_wait_ms=0)
    async with running(settings, model) as (client, _):
        bad = await client.post("/v1/embed/text", json={"texts": ["poison"]})
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "model_error"
        assert "Traceback" not in bad.text
        good = await client.post("/v1/embed/text", json={"texts": ["fine"]})
        assert good.status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_crashed_consumer_turns_readyz_red(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, app):
        service = app.state.service

        async def crash() -> None:
            raise RuntimeError("consumer crashed")

        # replace the text consumer by one that dies, as a bug in it would make it, while a
        # request is waiting in the queue
        batcher = service.text_batcher
        batcher.task.cancel()
        await asyncio.sleep(0)
        from app.batching import _Pending

        future = asyncio.get_running_loop().create_future()
        batcher.queue.put_nowait(_Pending("waiting", future, time.monotonic() + 5))
        batcher.task = asyncio.get_running_loop().create_task(crash())
        batcher.task.add_done_callback(batcher._on_exit)
        await asyncio.sleep(0.05)
        assert isinstance(future.exception(), NotReady)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "worker" in ready.text
        response = await client.post("/v1/search/text", json={"query": "x"})
        assert response.status_code == 503 and response.json()["error"]["type"] == "not_ready"


async def test_gone_clients_are_dropped_before_the_model() -> None:
    metrics = Metrics()
    seen: list[list[str]] = []
    gate = threading.Event()

    def run_batch(items):
        seen.append(list(items))
        gate.wait(5)
        return np.zeros((len(items), 2), np.float32)

    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(1)
    batcher: DynamicBatcher[str] = DynamicBatcher("text", run_batch, executor, metrics, max_batch_size=8,
                                                  max_wait_s=0, max_queue=100)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit("blocker", 5))
    await asyncio.sleep(0.05)  # the model is now busy with the blocker
    leavers = [asyncio.create_task(batcher.submit(f"gone{i}", 5)) for i in range(20)]
    stayer = asyncio.create_task(batcher.submit("stay", 5))
    await asyncio.sleep(0.05)
    for task in leavers:
        task.cancel()  # the clients disconnect while queued
    gate.set()
    await stayer
    await blocker
    assert [item for batch in seen for item in batch] == ["blocker", "stay"]
    assert 'reason="client_gone"' in __import__("prometheus_client").generate_latest(metrics.registry).decode()
    await batcher.stop()
    executor.shutdown(wait=False)


async def test_overload_error_is_typed() -> None:
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    batcher: DynamicBatcher[str] = DynamicBatcher("text", lambda items: (gate.wait(5), np.zeros((len(items), 2)))[1],
                                                  executor, Metrics(), max_batch_size=1, max_wait_s=0, max_queue=1)
    batcher.start()
    first = asyncio.create_task(batcher.submit("a", 5))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(batcher.submit("b", 5))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await batcher.submit("c", 5)
    gate.set()
    await first
    await second
    await batcher.stop()
    executor.shutdown(wait=False)
    assert issubclass(ModelFailure, Exception)


async def test_hot_reload_under_load_with_a_corrupt_candidate(tmp_path: Path, app_encoder) -> None:
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=3)
    build_index(data, tmp_path / "index", app_encoder)
    settings = settings_for(tmp_path / "index", reload_interval_s=0.05)
    failures: list[str] = []
    versions: set[str] = set()
    async with running(settings, app_encoder) as (client, app):
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                response = await client.post("/v1/search/text", json={"query": "a red square", "k": 3})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.add(response.json()["index_version"])

        workers = [asyncio.create_task(hammer()) for _ in range(4)]
        for round_ in range(20):  # RELIABILITY.md row "index: hot swap 20 times under load"
            from PIL import Image

            Image.new("RGB", (20, 20), (round_ * 12, 10, 10)).save(data / f"new{round_}.png")
            await asyncio.to_thread(build_index, data, tmp_path / "index", app_encoder)
            await asyncio.sleep(0.2)
        # a corrupt candidate: a copy of the live version with a flipped byte, published by hand
        live = app.state.service.index.directory
        broken = live.parent / "zz-broken"
        shutil.copytree(live, broken)
        raw = bytearray((broken / "embeddings.npy").read_bytes())
        raw[-1] ^= 0xFF
        (broken / "embeddings.npy").write_bytes(bytes(raw))
        link = tmp_path / "index" / "current"
        tmp_link = tmp_path / "index" / ".swap"
        tmp_link.symlink_to(Path("versions") / "zz-broken")
        tmp_link.replace(link)
        await asyncio.sleep(0.4)
        stop.set()
        await asyncio.gather(*workers)
        serving = app.state.service.index.directory
        metrics = (await client.get("/metrics")).text
    assert failures == []
    assert len(versions) >= 3  # requests were answered from several versions as they came
    assert serving == live  # the corrupt one was refused, the old one kept serving
    assert 'clipsearch_index_reloads_total{result="refused"} 1.0' in metrics


async def test_a_request_holds_at_most_the_queue(index_dir, app_encoder) -> None:
    """Each input of an embed request is its own queue item: a request longer than the queue was
    429 however idle the server. The limit per request is now at most the queue (and a request is
    queued whole or not at all: the next test)."""
    settings = settings_for(index_dir, max_queue=4)
    async with running(settings, app_encoder) as (client, _):
        response = await client.post("/v1/embed/text", json={"texts": ["a", "b", "c", "d", "e"]})
        assert response.status_code == 400 and "at most 4 texts per request" in response.json()["error"]["message"]
        assert (await client.post("/v1/embed/text", json={"texts": ["a", "b", "c", "d"]})).status_code == 200


async def test_a_request_whose_client_left_drops_all_its_inputs_before_the_model() -> None:
    """The inputs of one request are queued together, all or none; when its client goes away
    (the request is cancelled) every one of them still waiting is dropped before the model."""
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    calls: list[list[str]] = []

    def run_batch(items):
        calls.append(list(items))
        gate.wait(5)
        return np.zeros((len(items), 2))

    batcher: DynamicBatcher[str] = DynamicBatcher("text", run_batch, executor, Metrics(), max_batch_size=1,
                                                  max_wait_s=0, max_queue=3)
    batcher.start()
    busy = asyncio.create_task(batcher.submit("busy", 5))
    await asyncio.sleep(0.05)
    request = asyncio.create_task(batcher.submit_many(["a", "b"], 5))
    await asyncio.sleep(0.01)
    assert batcher.queue.qsize() == 2
    with pytest.raises(Overloaded):  # two more do not fit beside them: neither is queued
        await batcher.submit_many(["x", "y"], 5)
    assert batcher.queue.qsize() == 2
    request.cancel()
    gate.set()
    await busy
    assert await batcher.submit("after", 5) is not None
    assert calls == [["busy"], ["after"]]
    await batcher.stop()
    executor.shutdown(wait=False)
