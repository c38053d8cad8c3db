"""One model, many requests: a few worker threads behind a bounded queue.

The model is shared: up to `workers` jobs run at once (the chat engine's batcher decodes their
answers together, one batched step per token), and the event loop only waits. At most
`max_waiting` jobs wait behind the running ones; `admit` (or `submit`) refuses more
with `Overloaded`, which the app answers with 429 and a Retry-After estimated from recent job
times. A request holds its place from admission on, also while it is still fetching its images.
A job sends its results back as events; cancelling it (client gone) removes it from the queue, or
tells the running job to stop at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from minigpt4.errors import InputError

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Failed:
    """The event a job ends with when its work raised."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class Job:
    """A handle on one piece of work: the worker `emit`s events, the event loop `await`s them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.future: Future[None] | None = None
        self.withdrawn = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Any) -> None:
        """Called on the worker thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self) -> Any:
        return await self._events.get()

    def cancel(self) -> None:
        self._cancelled.set()
        if self.future is not None:
            self.future.cancel()  # drops the job if it has not started yet


class Scheduler:
    """Runs `work(job)` calls on `workers` threads, with at most `max_waiting` more queued."""

    def __init__(self, max_waiting: int, workers: int = 1) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.capacity = workers + max_waiting
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minigpt4-serve")
        self._lock = threading.Lock()
        self._admitted = 0  # preparing + queued + running
        self._preparing = 0  # admitted, work not started yet (fetching images)
        self._running = 0
        self._mean_job_s = 1.0  # a moving average; only Retry-After uses it

    def status(self) -> dict[str, int]:
        """Jobs running, waiting for the worker, and admitted but still fetching their images."""
        with self._lock:
            waiting = self._admitted - self._running - self._preparing
            return {"running": self._running, "waiting": waiting, "fetching": self._preparing}

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._mean_job_s))

    def admit(self) -> Job:
        """A place in the queue for work that `start` gives later; raises Overloaded when full.

        Call from the event loop, then `start` the job or `withdraw` it (the request ended first).
        """
        with self._lock:
            if self._admitted >= self.capacity:
                raise Overloaded(self.retry_after_s())
            self._admitted += 1
            self._preparing += 1
        return Job(asyncio.get_running_loop())

    def start(self, job: Job, work: Callable[[Job], None]) -> None:
        """Queue an admitted job's work for the worker thread."""
        with self._lock:
            self._preparing -= 1
        try:
            job.future = self._executor.submit(self._run, work, job)
        except RuntimeError:  # shutting down
            job.withdrawn = True
            with self._lock:
                self._admitted -= 1
            raise
        job.future.add_done_callback(self._release)

    def withdraw(self, job: Job) -> None:
        """Give back the place of an admitted job that will not start (no-op once started)."""
        if job.future is None and not job.withdrawn:
            job.withdrawn = True
            with self._lock:
                self._preparing -= 1
                self._admitted -= 1

    def submit(self, work: Callable[[Job], None]) -> Job:
        """Queue `work`; raises Overloaded when the queue is full. Call from the event loop."""
        job = self.admit()
        self.start(job, work)
        return job

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, work: Callable[[Job], None], job: Job) -> None:
        with self._lock:
            self._running += 1
        start = time.monotonic()
        try:
            work(job)
        except Exception as e:
            if not isinstance(e, InputError):
                logger.exception("request failed")
            job.emit(Failed(e))
        finally:
            with self._lock:
                self._running -= 1
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - start)

    def _release(self, _future: object) -> None:
        with self._lock:
            self._admitted -= 1
