"""GET /v1/jobs/{id}/events against a real `parley api` process and real workers: replay,
then live; resume after Last-Event-ID; the whole reply of a stream that expired; isolation."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from app import job_events
from tests.integration.helpers import Api

TIMEOUT = httpx.Timeout(60, connect=5)


def _read(
    base_url: str, key: str, job_id: str, *, headers: dict[str, str] | None = None, **params: str
) -> list[ServerSentEvent]:
    """Every event of the job's stream, until `done` (the server ends the stream there)."""
    with (
        httpx.Client(base_url=base_url, timeout=TIMEOUT) as client,
        connect_sse(
            client,
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
            params=params,
        ) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def _order(event: ServerSentEvent) -> tuple[int, int]:
    return job_events.id_key(event.id)


def _reply(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "delta")


def _done(events: list[ServerSentEvent]) -> dict[str, Any]:
    assert events[-1].event == "done", [e.event for e in events]
    return dict(json.loads(events[-1].data))


def test_a_stream_follows_the_turn_live_and_adds_up_to_its_reply(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Tell me a story.", generation={"max_new_tokens": 48})
    events = _read(live_api, key, job["id"])
    kinds = [e.event for e in events]
    assert kinds[0] == "status" and json.loads(events[0].data) == {"status": "queued"}
    assert json.loads(events[kinds.index("status", 1)].data) == {"status": "running"}
    assert kinds.count("delta") > 1, kinds  # streamed as generated, not in one piece
    done = _done(events)
    assert done["status"] == "succeeded"
    stored = api.wait(key, job["id"])["reply"]["content"]
    assert _reply(events) == done["reply"]["content"] == stored
    orders = [_order(e) for e in events]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_a_late_reader_gets_the_same_events_and_can_resume(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Hello there.", generation={"max_new_tokens": 32})
    api.wait(key, job["id"])
    first = _read(live_api, key, job["id"])
    again = _read(live_api, key, job["id"])
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in first]
    for cut in (1, len(first) // 2, len(first) - 2):
        resumed = _read(live_api, key, job["id"], headers={"Last-Event-ID": first[cut].id})
        assert [e.id for e in resumed] == [e.id for e in first[cut + 1 :]]
        by_query = _read(live_api, key, job["id"], last_event_id=first[cut].id)
        assert [e.id for e in by_query] == [e.id for e in resumed]


def test_an_expired_stream_replays_the_whole_reply(
    api: Api, live_api: str, redis_client: redis.Redis
) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Remember this.", generation={"max_new_tokens": 24})
    ended = api.wait(key, job["id"])
    redis_client.delete(job_events.stream_key(job["id"]))  # as its TTL would
    events = _read(live_api, key, job["id"])
    assert [e.event for e in events] == ["delta", "done"]
    assert _reply(events) == ended["reply"]["content"]
    assert _done(events)["id"] == job["id"]
    # A reader that had events of the stream itself, now gone, is told the end.
    resumed = _read(live_api, key, job["id"], headers={"Last-Event-ID": "1796301234567-3"})
    assert [e.event for e in resumed] == ["done"] and resumed[0].id == "1796301234567-4"


def test_a_cancelled_queued_job_streams_its_end(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    first = api.submit(key, message="Go on at length.", generation={"max_new_tokens": 256})
    # Waits for the first turn of its conversation: queued while we cancel it.
    second = api.submit(key, message="And then?", conversation_id=first["conversation_id"])
    assert api.request("POST", f"/v1/jobs/{second['id']}/cancel", key).status_code == 200
    events = _read(live_api, key, second["id"])
    assert [e.event for e in events] == ["status", "done"]
    assert _done(events)["status"] == "cancelled"
    api.wait(key, first["id"])


def test_a_reader_that_goes_away_changes_nothing(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Keep talking.", generation={"max_new_tokens": 64})
    with (
        httpx.Client(base_url=live_api, timeout=TIMEOUT) as client,
        connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers=api.auth(key)) as source,
    ):
        next(e for e in source.iter_sse() if e.event == "status")
    ended = api.wait(key, job["id"])
    assert ended["status"] == "succeeded"
    assert _reply(_read(live_api, key, job["id"])) == ended["reply"]["content"]


def test_many_readers_see_one_stream(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Everyone listen.", generation={"max_new_tokens": 32})
    path = f"/v1/jobs/{job['id']}/events"
    with httpx.Client(base_url=live_api, timeout=TIMEOUT) as client, ExitStack() as opened:
        # All four open before the turn has gone far, then each read to its end.
        streams = [
            opened.enter_context(connect_sse(client, "GET", path, headers=api.auth(key)))
            for _ in range(4)
        ]
        seen = [[(e.id, e.data) for e in stream.iter_sse()] for stream in streams]
    assert all(events == seen[0] for events in seen) and len(seen[0]) >= 3


@pytest.mark.parametrize("job_id", ["job_unknown", "not an id"])
def test_unknown_and_other_tenants_jobs_are_not_found(api: Api, live_api: str, job_id: str) -> None:
    owner, other = api.create_key("acme"), api.create_key("globex")
    job = api.submit(owner, message="Mine.", generation={"max_new_tokens": 4})
    for key, target in ((other, job["id"]), (owner, job_id)):
        answer = httpx.get(
            f"{live_api}/v1/jobs/{target}/events", headers=api.auth(key), timeout=TIMEOUT
        )
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    api.wait(owner, job["id"])


def test_a_malformed_last_event_id_is_a_clear_error(api: Api, live_api: str) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="Hi.", generation={"max_new_tokens": 4})
    started = time.monotonic()
    answer = httpx.get(
        f"{live_api}/v1/jobs/{job['id']}/events",
        headers={**api.auth(key), "Last-Event-ID": "yesterday"},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["loc"] == ["header", "Last-Event-ID"]
    assert time.monotonic() - started < 5
    api.wait(key, job["id"])
