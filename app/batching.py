"""The dynamic batcher: concurrent requests of one modality become one model call.

One consumer task per modality drains a bounded queue: it takes what is waiting (up to
`max_batch_size`), waits at most `max_wait_s` for more when the batch is not full, drops requests
whose client went away or whose deadline passed, and runs the model on the single device thread
shared by all modalities. Each request has its own future, completed with its row or with the
batch's exception; a failing batch fails only its own requests. If the consumer itself dies, every
waiting request fails and `alive` turns false (`/readyz` goes red). A full queue raises
`Overloaded` at once (429), it never piles up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from app.errors import DeadlineExceeded, ModelFailure, NotReady, Overloaded
from app.observability import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future[np.ndarray]
    deadline: float


class DynamicBatcher(Generic[T]):
    def __init__(
        self,
        modality: str,
        run_batch: Callable[[Sequence[T]], np.ndarray],  # items -> (n, D) rows, in order
        executor: Executor,
        metrics: Metrics,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 256,
    ) -> None:
        self.modality = modality
        self.run_batch = run_batch
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[_Pending[T]] = asyncio.Queue(maxsize=max_queue)
        self.task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._consume(), name=f"batcher-{self.modality}")
        self.task.add_done_callback(self._on_exit)

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():  # a crashed task was already reported
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self._fail_waiting(NotReady("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            logger.error("the %s batcher died: %r", self.modality, self.failure)
            self._fail_waiting(NotReady(f"the {self.modality} model worker stopped"))

    def _fail_waiting(self, error: Exception) -> None:
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(error)

    # -- requests ------------------------------------------------------------------------------
    def admit(self, count: int = 1) -> None:
        """Refuse at once when the queue has no room for `count` more items: call before any costly
        preparation (decoding an upload), so excess load is shed in microseconds instead of after
        the work; and before queueing a request's many items, so none of them is queued (and
        computed for nothing) when the rest would not fit."""
        if not self.alive:
            raise NotReady(f"the {self.modality} model worker is not running")
        if self.queue.qsize() + count > self.queue.maxsize:
            self.metrics.rejected.labels(self.modality, "queue_full").inc()
            raise Overloaded(f"too many {self.modality} requests queued; retry shortly")

    async def submit(self, item: T, timeout_s: float) -> np.ndarray:
        """Queue one item and wait for its row `(D,)`. Raises Overloaded, NotReady, DeadlineExceeded,
        ModelFailure."""
        (future,) = self._enqueue([item], timeout_s)
        return await future  # cancelled with the request when the client goes away

    async def submit_many(self, items: Sequence[T], timeout_s: float) -> list[np.ndarray]:
        """Queue all of `items` or none (Overloaded when they do not all fit) and wait for their
        rows, in order. If one fails, or the request is cancelled (its client went away), the
        others still queued are dropped before the model."""
        futures = self._enqueue(items, timeout_s)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:
                future.cancel()  # a no-op for those already answered
            raise

    def _enqueue(self, items: Sequence[T], timeout_s: float) -> list[asyncio.Future[np.ndarray]]:
        """Put every item on the queue, or none (`admit`); no await between the check and the puts,
        so the queue cannot fill meanwhile. Returns their futures, in order."""
        self.admit(len(items))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        futures: list[asyncio.Future[np.ndarray]] = []
        for item in items:
            futures.append(loop.create_future())
            self.queue.put_nowait(_Pending(item, futures[-1], deadline))
        self.metrics.queue_depth.labels(self.modality).set(self.queue.qsize())
        return futures

    # -- the consumer --------------------------------------------------------------------------
    async def _collect(self) -> list[_Pending[T]]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def _live(self, batch: list[_Pending[T]]) -> list[_Pending[T]]:
        """Drop requests whose client left (future cancelled) or whose deadline passed."""
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.done():
                self.metrics.rejected.labels(self.modality, "client_gone").inc()
            elif pending.deadline < now:
                self.metrics.rejected.labels(self.modality, "deadline").inc()
                pending.future.set_exception(DeadlineExceeded("the request waited too long for the model"))
            else:
                live.append(pending)
        return live

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._collect())
            self.metrics.queue_depth.labels(self.modality).set(self.queue.qsize())
            if not batch:
                continue
            self.metrics.batch_size.labels(self.modality).observe(len(batch))
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self.executor, self.run_batch, [p.item for p in batch])
                if len(rows) != len(batch):
                    raise RuntimeError(f"model returned {len(rows)} rows for {len(batch)} inputs")
            except Exception as exc:  # noqa: BLE001 - the batch fails, the batcher lives on
                logger.exception("%s batch of %d failed", self.modality, len(batch))
                error = ModelFailure(f"the model failed on this batch: {type(exc).__name__}")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            finally:
                self.metrics.stage.labels(f"encode_{self.modality}").observe(time.perf_counter() - started)
            for pending, row in zip(batch, rows, strict=True):
                if not pending.future.done():
                    pending.future.set_result(row)


def ensure_started(batchers: Sequence[DynamicBatcher[Any]]) -> None:
    for batcher in batchers:
        if batcher.task is None:
            batcher.start()
