"""A bounded queue in front of the served model, drained by one consumer task per worker.

Handlers enqueue and await a future; the consumer runs `predict` inline on the event loop (or on
a one-thread executor) and yields to the loop after every text, so /health, /ready and new
connections are served between queries. A full queue is refused at once with `Overloaded`.
When nothing is queued or running, a single text is classified in the handler itself: the same
work at the same place in the loop, without the two loop round trips through the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.engine.engine import Prediction, Predictor
from app.http.errors import NotReady, Overloaded
from app.http.keep_warm import KeepWarm
from app.http.metrics import Metrics
from app.http.serving import Slot


@dataclass
class _Job:
    texts: list[str]
    top_k: int
    future: asyncio.Future[list[Prediction]]
    enqueued: float


class InferenceQueue:
    def __init__(
        self,
        slot: Slot,
        metrics: Metrics,
        max_pending: int,
        retry_after_s: int,
        mode: str,
        keep_warm_s: float = 0.0,
        warm_texts: tuple[str, ...] = ("what is my account balance",),
    ) -> None:
        self.slot = slot
        self.metrics = metrics
        self.max_pending = max_pending
        self.retry_after = str(retry_after_s)
        self.pending = 0  # texts queued or being classified
        metrics.queue_pending = lambda: self.pending  # read when the worker is sampled, off the request path
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ort") if mode == "thread" else None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.keep_warm_s = keep_warm_s
        self._warm_texts = warm_texts
        self._last_inference = time.perf_counter()  # read by the keep-warm thread
        self._keep_warm: KeepWarm | None = None

    def _model(self) -> Predictor:
        served = self.slot.served
        assert served is not None, "the lifespan installs a model before the queue starts"
        return served.model

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._consume(), name="inference-consumer")
        if self.keep_warm_s > 0 and self._executor is None:
            self._keep_warm = KeepWarm(
                self.keep_warm_s,
                self.idle,
                lambda text: self._model().warm(text),  # the slot read each time: a reload swaps the model
                self._warm_texts,
                self.metrics.keep_warm.inc,
            ).start()

    def idle(self, seconds: float) -> bool:
        """No text queued or being classified, and none answered in the last `seconds`."""
        return self.pending == 0 and time.perf_counter() - self._last_inference >= seconds

    async def submit(self, texts: list[str], top_k: int) -> list[Prediction]:
        n = len(texts)
        if self.pending + n > self.max_pending:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded("the inference queue is full; retry shortly", {"Retry-After": self.retry_after})
        if n == 1 and self.pending == 0 and self._executor is None:
            return [self._classify_now(texts[0], top_k)]
        self.pending += n
        self._idle.clear()
        self.metrics.in_flight.inc()
        job = _Job(texts, top_k, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._jobs.append(job)
        self._wake.set()
        try:
            return await job.future
        finally:
            self.metrics.in_flight.dec()

    def _classify_now(self, text: str, top_k: int) -> Prediction:
        # Synchronous from check to answer, so no other task can see the queue in between and the idle event
        # needs no update; the keep-warm thread can, so the pending count does.
        m = self.metrics
        m.in_flight.inc()
        m.queue.observe(0.0)
        self.pending += 1
        try:
            pred = self._model().predict(text, top_k)
        finally:
            self.pending -= 1
            m.in_flight.dec()
        self._record(pred)
        return pred

    def _record(self, pred: Prediction) -> None:
        """After every real query: its metrics, and the time keep-warm measures idleness from."""
        self._last_inference = time.perf_counter()
        m = self.metrics
        m.tokenize.observe(pred.tokenize_s)
        m.inference.observe(pred.inference_s)
        m.count_prediction(pred.intent, pred.stage)
        if pred.truncated:
            m.truncated.inc()

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.metrics
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                job = self._jobs.popleft()
                if job.future.done():  # its request was cancelled (the client went away) while it waited
                    self.pending -= len(job.texts)
                    continue
                m.queue.observe(time.perf_counter() - job.enqueued)
                try:
                    results = await self._run(job, loop)
                except asyncio.CancelledError:  # stop(): this job's request gets its answer, not a wait for ever
                    self._refuse(job)
                    raise
                except Exception as exc:  # noqa: BLE001 - a model fault goes to its request, not the consumer
                    if not job.future.done():
                        job.future.set_exception(exc)
                    continue
                if not job.future.done():  # the client may have gone away
                    job.future.set_result(results)
            if self.pending == 0:
                self._idle.set()

    async def _run(self, job: _Job, loop: asyncio.AbstractEventLoop) -> list[Prediction]:
        results: list[Prediction] = []
        remaining = len(job.texts)
        # Read once: a model reload swaps the slot's model, and every text of a job is answered by one model.
        model = self._model()
        try:
            for text in job.texts:
                if self._executor is None:
                    pred = model.predict(text, job.top_k)
                else:
                    pred = await loop.run_in_executor(self._executor, model.predict, text, job.top_k)
                results.append(pred)
                remaining -= 1
                self.pending -= 1
                self._record(pred)
                await asyncio.sleep(0)  # let the loop serve I/O between texts
        finally:
            self.pending -= remaining
        return results

    def _refuse(self, job: _Job) -> None:
        if not job.future.done():
            job.future.set_exception(NotReady("the service is stopping", {"Retry-After": self.retry_after}))

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted text is answered; True if the queue emptied in time."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._keep_warm is not None:
            await asyncio.to_thread(self._keep_warm.stop)  # waits for a throw-away query in progress
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Whatever is still queued is answered 503 with Retry-After: its request's handler had awaited a future that
        # nothing would resolve. (uvicorn stops the app after its requests end, so this is a guard, not a path.)
        while self._jobs:
            job = self._jobs.popleft()
            self.pending -= len(job.texts)
            self._refuse(job)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
