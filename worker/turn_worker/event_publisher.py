"""The events of a worker's turns, appended to their streams (app.job_events) by one thread.

A turn's task thread is given its reply in pieces at every token (worker/inference/engine.py):
a Redis round trip each, from every turn in flight, would cost the process what the cancel
watch saved. Here task threads only queue their events; one thread sends whatever is queued
in one pipeline, the pieces of one turn queued meanwhile joined into one delta, so the
round trips follow Redis's pace rather than the model's.

With Redis away, events are dropped (logged): readers of the stream see the end replayed from
the database, and the turn itself goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from redis import Redis, RedisError

from app import job_events
from app.redis import cancel_key, queue_job_ended

log = logging.getLogger("parley.event_publisher")


@dataclass
class _Event:
    job_id: str
    kind: job_events.EventKind
    data: str = ""


class EventPublisher:
    def __init__(self, client: Redis) -> None:
        self._client = client
        self._queue: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="parley-events", daemon=True)
        self._thread.start()

    def running(self, job_id: str) -> None:
        self._queue.put(_Event(job_id, "status", "running"))

    def delta(self, job_id: str, text: str) -> None:
        self._queue.put(_Event(job_id, "delta", text))

    def reply_shower(self, job_id: str, attempt: int) -> Callable[[str], None]:
        """What the engine gives a turn's reply to, in pieces (Engine.generate's on_text).

        A turn tried again streams its reply anew; what an earlier attempt streamed is in the
        stream already, so only what goes beyond it is sent (a greedy or seeded turn repeats
        its reply, so readers see one reply)."""
        shown = _shown_before(self._client, job_id) if attempt > 1 else ""
        if not shown:
            return partial(self.delta, job_id)
        generated = ""

        def show(piece: str) -> None:
            nonlocal generated
            before, generated = len(generated), generated + piece
            if len(generated) > len(shown):
                if before <= len(shown) and not generated.startswith(shown):
                    log.warning("the retried turn's reply differs from what was streamed")
                self.delta(job_id, generated[max(before, len(shown)) :])

        return show

    def ended(self, job_id: str) -> None:
        """After its end is stored: the stream's end, the notice to held requests, and the
        job's cancel signal deleted (it has served)."""
        self._queue.put(_Event(job_id, "end"))

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            closing = None in batch
            events = [event for event in batch if event is not None]
            if events:
                self._send(_joined(events))
            if closing:
                return

    def _send(self, events: list[_Event]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for event in events:
            if event.kind == "end":
                queue_job_ended(pipe, event.job_id)
                pipe.delete(cancel_key(event.job_id))
            else:
                job_events.append(pipe, event.job_id, event.kind, event.data)
        try:
            pipe.execute()
        except Exception as exc:  # this thread must outlive any failure: Redis comes back
            log.warning("could not send %d turn events (%s); readers fall back", len(events), exc)


def _shown_before(client: Redis, job_id: str) -> str:
    try:
        return job_events.shown_text(client, job_id)
    except RedisError as exc:
        log.warning("could not read what an earlier attempt streamed (%s)", exc)
        return ""


def _joined(events: list[_Event]) -> list[_Event]:
    """`events` in order, with each turn's consecutive deltas joined into one."""
    joined: list[_Event] = []
    last: dict[str, _Event] = {}  # job id -> its latest event in `joined`
    for event in events:
        previous = last.get(event.job_id)
        if event.kind == "delta" and previous is not None and previous.kind == "delta":
            previous.data += event.data
            continue
        event = _Event(event.job_id, event.kind, event.data)
        joined.append(event)
        last[event.job_id] = event
    return joined
