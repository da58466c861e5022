"""An asyncio dynamic batcher: rows from many requests are grouped into batches run by one worker thread.

Pure and testable without HTTP: :meth:`DynamicBatcher.submit` returns one future per row; the worker resolves each
row's future as soon as the model delivers its answer (rows that exit early are answered while the rest of their
batch still runs).

Batches are formed first-in first-out from the queue: at most ``max_batch`` rows and at most ``max_batch_tokens``
padded tokens (rows x longest row). A batch starts when it is full, or when its oldest row has waited
``max_wait_ms``; with 0 it starts as soon as the worker is free, taking whatever has arrived.

Not done: refilling a running batch's freed slots at layer boundaries (iteration-level batching). An encoder's
rows must all start at layer 1; a row joining at layer k of a running batch would need layers 1..k-1 of its own
(another, smaller batch), which on CPU costs more per-op overhead than it saves. Exited rows leave the batch (the
model compacts it, so the rest runs cheaper) and are answered at once; new rows form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

RunBatch = Callable[[list[Any], Callable[[list[int], list[dict[str, Any]]], None]], None]


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` rows already: the request is refused whole (nothing of it was queued)."""


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and accepts no new rows."""


@dataclass
class BatchStats:
    """What the batcher has done, for metrics and tests. batches: batches run; rows: rows answered; early_rows:
    rows answered while other rows of their batch were still running; row_errors: rows answered with an error;
    retried_batches: batches whose model call raised and whose rows were re-run one by one."""

    batches: int = 0
    rows: int = 0
    early_rows: int = 0
    row_errors: int = 0
    retried_batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class RowTiming:
    """Where one row's time went, in ``time.perf_counter()`` seconds (filled in by the batcher; 0.0 = not yet):
    enqueued when it was queued, started when its batch's model call began, answered when its answer was
    delivered by the model (an exited row: at its exit layer)."""

    enqueued: float = 0.0
    started: float = 0.0
    answered: float = 0.0

    @property
    def queue_s(self) -> float:
        """Seconds between being queued and its batch starting."""
        return max(0.0, self.started - self.enqueued) if self.started else 0.0

    @property
    def model_s(self) -> float:
        """Seconds between its batch starting and its answer."""
        return max(0.0, self.answered - self.started) if self.answered and self.started else 0.0


@dataclass
class _Pending:
    row: Any
    tokens: int
    future: asyncio.Future
    enqueued: float
    timing: RowTiming | None = None


class DynamicBatcher:
    """Queue rows, run them in batches on one worker thread, resolve each row's future with its answer.

    run_batch(rows, deliver): the model call (e.g. :meth:`eat.serving.model.Predictor.run`); it must call
    ``deliver(indices, answers)`` once per row. An exception from it fails no row outright: rows not yet answered
    are re-run one at a time, and only a row that fails alone gets ``{"error": ...}``.
    on_batch(rows, padded_tokens) and on_answer(answer, early): optional observers (metrics), called on the
    event loop.
    """

    def __init__(self, run_batch: RunBatch, *, max_batch: int = 32, max_batch_tokens: int = 4096,
                 max_wait_ms: float = 0.0, max_queue: int = 1024,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_answer: Callable[[dict[str, Any], bool], None] | None = None):
        self._run_batch = run_batch
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch, self._on_answer = on_batch, on_answer
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eat-batch")
        self._closing = False
        self._running = 0  # rows in the batch being run
        self.stats = BatchStats()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="eat-batcher")

    async def close(self) -> None:
        """Stop accepting rows, answer every row already accepted, then stop the worker."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        """Rows waiting for a batch (not counting the batch running now)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Rows accepted and not yet answered or started: waiting plus running."""
        return len(self._queue) + self._running

    # --- requests ----------------------------------------------------------------------------------------------
    def submit(self, rows: list[Any], tokens: list[int],
               timings: list[RowTiming] | None = None) -> list[asyncio.Future]:
        """Queue the rows of one request (``tokens``: each row's length); one future per row, in order.
        timings: optional, one :class:`RowTiming` per row that the batcher fills in (the server's
        ``Server-Timing`` header). Raises QueueFull when they do not all fit (none is queued), BatcherClosed
        while shutting down."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if self._worker is None:
            raise BatcherClosed("the batcher has not been started")
        if len(self._queue) + len(rows) > self.max_queue:
            raise QueueFull(f"the queue is full ({len(self._queue)} rows waiting, at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        if timings is not None and len(timings) != len(rows):
            raise ValueError(f"{len(timings)} timings for {len(rows)} rows")
        for index, (row, count) in enumerate(zip(rows, tokens, strict=True)):
            future = loop.create_future()
            timing = None
            if timings is not None:
                timing = timings[index]
                timing.enqueued = now
            self._queue.append(_Pending(row, count, future, now, timing))
            futures.append(future)
        self._arrived.set()
        return futures

    # --- the worker --------------------------------------------------------------------------------------------
    def _fits(self, count: int, width: int, tokens: int) -> bool:
        """Whether a batch of ``count`` rows padded to ``width`` may take a row of ``tokens`` more."""
        return count < self.max_batch and (count + 1) * max(width, tokens) <= self.max_batch_tokens

    def _head_is_full(self) -> bool:
        """Whether the queue's first rows already make a full batch (no point waiting for more)."""
        count, width = 0, 0
        for pending in self._queue:
            if count and not self._fits(count, width, pending.tokens):
                return True
            count, width = count + 1, max(width, pending.tokens)
        return count >= self.max_batch

    def _take(self) -> list[_Pending]:
        """Pop the next batch, first in first out (a row that does not fit waits for the next batch)."""
        batch = [self._queue.popleft()]
        width = batch[0].tokens
        while self._queue and self._fits(len(batch), width, self._queue[0].tokens):
            pending = self._queue.popleft()
            batch.append(pending)
            width = max(width, pending.tokens)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # wait for the batch to fill, until the oldest row has waited max_wait (no wait while closing)
            while not self._closing and not self._head_is_full():
                remaining = self._queue[0].enqueued + self.max_wait - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            width = max(pending.tokens for pending in batch)
            self.stats.batches += 1
            self.stats.batch_sizes.append(len(batch))
            if self._on_batch is not None:
                self._on_batch(len(batch), len(batch) * width)
            self._running = len(batch)
            try:
                await loop.run_in_executor(self._executor, self._run, loop, batch)
            except Exception:  # noqa: BLE001 - _run answers every row itself; this is a last resort
                logger.exception("batch failed outside the model call")
                for pending in batch:
                    self._resolve(pending.future, {"error": "internal error"}, False)
            finally:
                self._running = 0

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        """Worker thread: run the batch; each answer is handed to the event loop the moment it is delivered."""
        rows = [pending.row for pending in batch]
        answered = [False] * len(batch)
        remaining = [len(batch)]
        started = time.perf_counter()
        for pending in batch:
            if pending.timing is not None:
                pending.timing.started = started

        def deliver(indices: list[int], answers: list[dict[str, Any]]) -> None:
            fresh = [(i, a) for i, a in zip(indices, answers) if not answered[i]]
            now = time.perf_counter()
            for i, _ in fresh:
                answered[i] = True
                if batch[i].timing is not None:
                    batch[i].timing.answered = now
            remaining[0] -= len(fresh)
            early = remaining[0] > 0  # others of this batch still running: these rows are answered early
            for i, answer in fresh:
                loop.call_soon_threadsafe(self._resolve, batch[i].future, answer, early)

        try:
            self._run_batch(rows, deliver)
        except Exception as error:  # noqa: BLE001 - a model error must not fail the other rows
            left = [i for i in range(len(batch)) if not answered[i]]
            logger.warning("a batch of %d rows failed (%s); re-running its %d unanswered rows one by one",
                           len(batch), error, len(left))
            loop.call_soon_threadsafe(self._count_retry)
            for i in left:
                if len(left) > 1:
                    try:
                        self._run_batch([rows[i]], lambda _, answers, i=i: deliver([i], answers))
                        continue
                    except Exception as single:  # noqa: BLE001
                        error = single
                deliver([i], [{"error": f"model error: {type(error).__name__}: {error}"}])
        missing = [i for i in range(len(batch)) if not answered[i]]
        if missing:  # a run_batch that forgot rows: answer them rather than leave their requests hanging
            deliver(missing, [{"error": "internal error: the model gave no answer for this row"}] * len(missing))

    def _count_retry(self) -> None:
        self.stats.retried_batches += 1

    def _resolve(self, future: asyncio.Future, answer: dict[str, Any], early: bool) -> None:
        """Event loop: set one row's answer (a request that went away has a cancelled future: skip it)."""
        self.stats.rows += 1
        self.stats.early_rows += early
        self.stats.row_errors += "error" in answer
        if self._on_answer is not None:
            self._on_answer(answer, early)
        if not future.done():
            future.set_result(answer)


__all__ = ["BatchStats", "BatcherClosed", "DynamicBatcher", "QueueFull", "RowTiming"]
