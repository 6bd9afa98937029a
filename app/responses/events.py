"""A response's server-sent events in OpenAI's sequence, made from its job's event stream
(app.jobs.event_stream): `response.created`, `response.queued`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` | `response.incomplete` | `response.failed` | `response.cancelled`.

The sequence is made the same way from the same job events on every read, so that its
`sequence_number`s are stable and `starting_after` resumes where a reader was. (A job whose
deltas have expired replays its reply as one delta: a resume then counts from that replay.)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent

from app.jobs.event_stream import JobEvent
from app.models import reply_message_id
from app.responses.schemas import OutputMessage, OutputText, ResponseObject


async def response_events(
    job_events: AsyncIterator[JobEvent], *, start: ResponseObject, starting_after: int = -1
) -> AsyncIterator[ServerSentEvent]:
    """The events after sequence number `starting_after`; `start` is the response as read
    when the stream began (what `created`, `queued` and `in_progress` show, in their status)."""
    sequence = _Sequence(start)
    async for job_event in job_events:
        for event in sequence.follow(job_event):
            if event["sequence_number"] > starting_after:
                yield ServerSentEvent(json.dumps(event, ensure_ascii=False), event=event["type"])


class _Sequence:
    def __init__(self, start: ResponseObject) -> None:
        self._start = start
        self._numbers = itertools.count()
        self._item_id = reply_message_id(start.id)
        self._created = self._started = False

    def follow(self, job_event: JobEvent) -> list[dict[str, Any]]:
        events = []
        if not self._created:
            self._created = True
            queued = self._as("queued")
            events += [self._event("response.created", response=queued)]
            events += [self._event("response.queued", response=queued)]
        if job_event.kind == "status" and job_event.data["status"] == "running":
            events += self._begin()
        elif job_event.kind == "delta":
            events += self._begin()
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._item_id,
                    output_index=0,
                    content_index=0,
                    delta=job_event.data["text"],
                    logprobs=[],
                )
            )
        elif job_event.kind == "done":
            events += self._end(job_event.data)
        return events

    def _begin(self) -> list[dict[str, Any]]:
        """The response's start, once: in progress, with its message and text part opened."""
        if self._started:
            return []
        self._started = True
        item = OutputMessage(id=self._item_id, status="in_progress", content=[])
        return [
            self._event("response.in_progress", response=self._as("in_progress")),
            self._event("response.output_item.added", output_index=0, item=_dump(item)),
            self._event(
                "response.content_part.added",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                part=_dump(OutputText(text="")),
            ),
        ]

    def _end(self, final: ResponseObject) -> list[dict[str, Any]]:
        response = _dump(final)
        if final.status not in ("completed", "incomplete"):
            # Failed or cancelled: no reply is kept, so none is closed.
            return [self._event(f"response.{final.status}", response=response)]
        events = self._begin()
        message = final.output[0]
        text = message.content[0].text
        events += [
            self._event(
                "response.output_text.done",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=self._item_id,
                output_index=0,
                content_index=0,
                part=_dump(message.content[0]),
            ),
            self._event("response.output_item.done", output_index=0, item=_dump(message)),
            self._event(f"response.{final.status}", response=response),
        ]
        return events

    def _as(self, status: str) -> dict[str, Any]:
        """The response at its start, in `status`: no output, usage or error yet."""
        return _dump(
            self._start.model_copy(
                update={"status": status, "output": [], "usage": None, "error": None}
            )
        )

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(self._numbers), **fields}


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json")
    return dumped
