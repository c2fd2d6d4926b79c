"""The inference queue on its own: the idle fast path, FIFO order behind queued work, and accounting."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import pytest

from app.engine.engine import Prediction
from app.http import keep_warm
from app.http.errors import NotReady, Overloaded
from app.http.metrics import Metrics
from app.http.queue import InferenceQueue
from app.http.serving import Served, Slot
from tests.fakes import FakeClassifier


class RecordingClassifier(FakeClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []  # every text, answered or only warmed, in the order the model saw it

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        self.order.append(text)
        return super().predict(text, top_k)

    def warm(self, text: str) -> None:
        self.order.append(text)
        super().warm(text)


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for `condition`; the timeout only catches a hang, never a slow machine."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def slot_of(model: FakeClassifier) -> Slot:
    slot = Slot()
    slot.install(Served.of(model, {"name": "fake"}))
    return slot


def _stage_count(metrics: Metrics, stage: str) -> float:
    return float(metrics.registry.get_sample_value("intent_stage_duration_seconds_count", {"stage": stage}) or 0.0)


def test_idle_single_text_is_classified_without_the_consumer() -> None:
    clf = RecordingClassifier()
    metrics = Metrics()

    async def scenario() -> list[Prediction]:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=4, retry_after_s=1, mode="inline")
        # No consumer task is started: only the fast path can answer.
        preds = await asyncio.wait_for(queue.submit(["flight to rome"], 0), 1.0)
        assert queue.pending == 0
        assert await queue.drain(0.1)
        return preds

    (pred,) = asyncio.run(scenario())
    assert pred.intent == "book_flight"
    assert clf.order == ["flight to rome"]
    assert _stage_count(metrics, "queue") == 1.0
    assert _stage_count(metrics, "inference") == 1.0


def test_single_text_waits_behind_a_queued_batch() -> None:
    clf = RecordingClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=16, retry_after_s=1, mode="inline")
        queue.start()
        batch = asyncio.create_task(queue.submit(["a", "b", "c"], 0))
        await asyncio.sleep(0)  # the batch is admitted and pending
        assert queue.pending == 3
        single = await queue.submit(["d"], 0)
        assert single[0].intent == "oos"
        assert len(await batch) == 3
        assert queue.pending == 0
        await queue.stop()

    asyncio.run(scenario())
    assert clf.order == ["a", "b", "c", "d"]


def test_fast_path_is_off_in_thread_mode_and_limits_still_hold() -> None:
    clf = RecordingClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=2, retry_after_s=3, mode="thread")
        queue.start()
        with pytest.raises(Overloaded) as refused:
            await queue.submit(["a", "b", "c"], 0)
        assert refused.value.headers == {"Retry-After": "3"}
        assert [p.intent for p in await queue.submit(["flight", "balance"], 0)] == ["book_flight", "balance"]
        await queue.stop()

    asyncio.run(scenario())
    assert clf.order == ["flight", "balance"]


@pytest.fixture(autouse=True)
def _warm_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep-warm skips its turn when its thread wakes late, which on a busy machine is every turn; these tests
    need the turns taken (the skip has its own test in tests/test_keep_warm.py)."""
    monkeypatch.setattr(keep_warm, "BUSY_LATE_S", 3600.0)


def _keep_warm_count(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("intent_keep_warm_queries_total") or 0.0)


class ThreadRecordingClassifier(RecordingClassifier):
    """Also records, for each throw-away query, the thread it ran in and that thread's scheduling policy."""

    def __init__(self) -> None:
        super().__init__()
        self.warm_threads: list[tuple[int, int]] = []

    def warm(self, text: str) -> None:
        self.warm_threads.append((threading.get_ident(), os.sched_getscheduler(0)))
        super().warm(text)


def test_keep_warm_runs_throwaway_queries_in_an_idle_priority_thread() -> None:
    clf = ThreadRecordingClassifier()
    metrics = Metrics()
    keep_warm_s = 0.02

    async def scenario() -> None:
        queue = InferenceQueue(
            slot_of(clf),
            metrics,
            max_pending=4,
            retry_after_s=1,
            mode="inline",
            keep_warm_s=keep_warm_s,
            warm_texts=("warm",),
        )
        queue.start()
        await _until(lambda: len(clf.warmed) >= 3)  # idle: throw-away queries come
        for _ in range(5):
            await queue.submit(["flight"], 0)
        await queue.stop()
        after_stop = len(clf.warmed)
        await asyncio.sleep(5 * keep_warm_s)
        assert len(clf.warmed) == after_stop  # stop() ended the thread

    asyncio.run(scenario())
    # Through `warm` (every stage of a real model), never `predict` (only the stages the text's answer reaches).
    assert clf.warmed == ["warm"] * len(clf.warmed)
    assert clf.calls == 5
    # Off the event loop, at the kernel's idle priority, so that a request never waits behind one.
    threads = {ident for ident, _ in clf.warm_threads}
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    assert {policy for _, policy in clf.warm_threads} == {os.SCHED_IDLE}
    assert _keep_warm_count(metrics) == len(clf.warmed)
    # Throw-away queries are not counted as predictions or inference time.
    assert _stage_count(metrics, "inference") == 5.0


def test_keep_warm_sees_a_query_in_progress_and_a_recent_one() -> None:
    """What the keep-warm thread looks at before each throw-away query: busy while a text is classified (on the
    idle fast path as well as through the consumer), not idle until `seconds` after the last answer."""
    seen: list[bool] = []

    class Probe(FakeClassifier):
        def predict(self, text: str, top_k: int = 0) -> Prediction:
            seen.append(queue.idle(0.0))
            return super().predict(text, top_k)

    queue = InferenceQueue(slot_of(Probe()), Metrics(), max_pending=4, retry_after_s=1, mode="inline")

    async def scenario() -> None:
        queue.start()
        assert queue.idle(0.0)
        await queue.submit(["flight"], 0)  # the fast path
        assert queue.idle(0.0)
        assert not queue.idle(3600.0)
        await queue.submit(["flight", "balance"], 0)  # the consumer
        await queue.stop()

    asyncio.run(scenario())
    assert seen == [False, False, False]


def test_keep_warm_is_off_by_default() -> None:
    clf = RecordingClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=4, retry_after_s=1, mode="inline")
        queue.start()
        await asyncio.sleep(0.05)
        await queue.stop()

    asyncio.run(scenario())
    assert clf.order == []
    assert _keep_warm_count(metrics) == 0.0


def test_keep_warm_stops_quietly_on_a_faulty_classifier() -> None:
    clf = FakeClassifier(fail=True)
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=4, retry_after_s=1, mode="inline", keep_warm_s=0.005)
        queue.start()
        await _until(lambda: len(clf.warmed) >= 1)
        await asyncio.sleep(0.05)  # ten more intervals: it would have tried again by now
        await queue.stop()  # must not raise the throw-away query's error

    asyncio.run(scenario())
    assert clf.warmed == ["what is my account balance"]  # tried once, then keep-warm turned itself off
    assert clf.calls == 0
    assert _keep_warm_count(metrics) == 0.0


class GatedClassifier(FakeClassifier):
    """Blocks every text until `gate` is set; `entered` says that one is being classified, `texts` which were."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.texts: list[str] = []

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        self.texts.append(text)
        self.entered.set()
        assert self.gate.wait(30), "never released"
        return super().predict(text, top_k)


def _in_flight(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("intent_in_flight_requests") or 0.0)


async def one_running_one_waiting(
    queue: InferenceQueue, clf: GatedClassifier
) -> tuple[asyncio.Task[list[Prediction]], asyncio.Task[list[Prediction]]]:
    """Two texts held in the gated model, and one queued behind them."""
    queue.start()
    running = asyncio.create_task(queue.submit(["a", "b"], 0))
    await _until(clf.entered.is_set)
    waiting = asyncio.create_task(queue.submit(["c"], 0))
    await asyncio.sleep(0)
    return running, waiting


def test_requests_cancelled_mid_inference_and_in_the_queue_leave_the_counts_at_zero() -> None:
    """A request cancelled while its text runs, and one cancelled while it waits: the in-flight gauge drops at once,
    the queue drains once the model is free, and the next request is answered."""
    clf = GatedClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=3, retry_after_s=1, mode="thread")
        running, waiting = await one_running_one_waiting(queue, clf)
        assert (queue.pending, _in_flight(metrics)) == (3, 2.0)
        for task in (running, waiting):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert _in_flight(metrics) == 0.0
        clf.gate.set()
        assert await queue.drain(30)
        assert queue.pending == 0
        assert [p.intent for p in await queue.submit(["flight"], 0)] == ["book_flight"]
        await queue.stop()

    asyncio.run(scenario())
    assert _in_flight(metrics) == 0.0


def test_a_request_cancelled_while_it_waits_is_not_classified() -> None:
    """Its client went away while the model was busy: the consumer ran its texts anyway, for an answer nobody
    read, delaying every request behind it."""
    clf = GatedClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=3, retry_after_s=1, mode="thread")
        running, waiting = await one_running_one_waiting(queue, clf)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        clf.gate.set()
        assert len(await running) == 2
        assert await queue.drain(30)
        assert (queue.pending, _in_flight(metrics)) == (0, 0.0)
        await queue.stop()

    asyncio.run(scenario())
    assert clf.texts == ["a", "b"]
    assert _stage_count(metrics, "queue") == 1.0  # the skipped job never reached the model


def _queue_depth(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("intent_queue_depth")


def test_the_queue_depth_gauge_reads_the_texts_queued_or_running_when_sampled() -> None:
    clf = GatedClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=3, retry_after_s=1, mode="thread")
        running, waiting = await one_running_one_waiting(queue, clf)
        metrics.sample_worker()  # as a scrape does, and every worker each second
        assert (queue.pending, _queue_depth(metrics)) == (3, 3.0)
        clf.gate.set()
        await asyncio.gather(running, waiting)
        metrics.sample_worker()
        assert (queue.pending, _queue_depth(metrics)) == (0, 0.0)
        await queue.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_model_fault_goes_to_its_request_and_leaves_the_counts_at_zero(mode: str) -> None:
    clf = FakeClassifier(fail=True)
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=4, retry_after_s=1, mode=mode)
        queue.start()
        for texts in (["flight"], ["flight", "balance"]):
            with pytest.raises(RuntimeError, match="classifier broke"):
                await queue.submit(texts, 0)
            assert (queue.pending, _in_flight(metrics)) == (0, 0.0)
        assert await queue.drain(30)
        clf.fail = False
        assert len(await queue.submit(["flight", "balance"], 0)) == 2
        await queue.stop()

    asyncio.run(scenario())


def test_stopping_answers_the_running_and_the_queued_requests_with_503() -> None:
    """stop() while a job runs and another waits: each request gets NotReady (503, Retry-After), where both had
    awaited futures that nothing would resolve."""
    clf = GatedClassifier()
    metrics = Metrics()

    async def scenario() -> None:
        queue = InferenceQueue(slot_of(clf), metrics, max_pending=4, retry_after_s=2, mode="thread")
        running, waiting = await one_running_one_waiting(queue, clf)
        threading.Timer(0.2, clf.gate.set).start()  # the executor's shutdown waits for the text it runs
        await queue.stop()
        for task in (running, waiting):
            done, _ = await asyncio.wait({task}, timeout=30)
            assert done, "never answered"
            refused = task.exception()
            assert isinstance(refused, NotReady)
            assert (refused.status, refused.message, refused.headers) == (
                503,
                "the service is stopping",
                {"Retry-After": "2"},
            )
        assert (queue.pending, _in_flight(metrics)) == (0, 0.0)

    asyncio.run(scenario())
