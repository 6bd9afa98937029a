"""Webhooks end to end: a job end is delivered once to a real receiver that verifies the
Standard Webhooks signature; secrets, rotation, the delivery log and redelivery."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from app.config import get_settings
from app.db import session_scope
from app.models import WebhookEvent
from tests.integration.helpers import Api
from tests.integration.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

# A compressed retry schedule and a quick sweep, for the I/O workers of these tests.
FAST = {
    "WEBHOOK_RETRY_SCHEDULE": "0.3,0.5,1",
    "WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.2",
    "WEBHOOK_REDISPATCH_SECONDS": "3",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.1)


def webhook(api: Api, key: str, job_id: str) -> dict[str, Any]:
    answer = api.request("GET", f"/v1/jobs/{job_id}", key)
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["webhook"])


def wait_webhook(api: Api, key: str, job_id: str, status: str, timeout: float = 60) -> Any:
    return wait_until(
        lambda: (state := webhook(api, key, job_id))["status"] == status and state,
        timeout,
        f"webhook of {job_id} {status}",
    )


def attempts(api: Api, key: str, job_id: str) -> list[dict[str, Any]]:
    answer = api.request("GET", f"/v1/jobs/{job_id}/webhook-deliveries", key)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


def secret_of(api: Api, key: str) -> str:
    answer = api.request("GET", "/v1/webhook-secret", key)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["secret"])


def event_id_of(job_id: str) -> str:
    with session_scope() as session:
        return session.execute(
            select(WebhookEvent.id).where(WebhookEvent.job_id == job_id)
        ).scalar_one()


def test_a_job_end_is_delivered_once_and_signed(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    secret = secret_of(api, key)
    assert secret.startswith("whsec_") and secret_of(api, key) == secret
    receiver.secrets = [secret]
    io_workers(**FAST)
    job = api.submit(key, message="Hello", webhook_url=receiver.url, metadata={"order": "17"})
    assert job["webhook"] == {"url": receiver.url, "status": "pending", "attempts": 0}
    done = api.wait(key, job["id"])
    assert done["status"] == "succeeded"
    state = wait_webhook(api, key, job["id"], "delivered")
    assert state == {"url": receiver.url, "status": "delivered", "attempts": 1}
    # Sweeps keep running: nothing is sent a second time.
    time.sleep(1.5)
    [delivery] = receiver.deliveries
    assert delivery.verified_by == [secret]
    assert delivery.webhook_id == event_id_of(job["id"])
    assert delivery.webhook_id.startswith("evt_")
    assert delivery.headers["content-type"] == "application/json"
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 60
    payload = delivery.payload
    assert list(payload) == ["type", "timestamp", "data"]
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"] == done["finished_at"]
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["reply"] == done["reply"]
    assert payload["data"]["metadata"] == {"order": "17"}
    [attempt] = attempts(api, key, job["id"])
    assert attempt["attempt"] == 1 and attempt["status_code"] == 200
    assert attempt["error"] is None and attempt["duration_ms"] >= 0


def test_a_cancelled_job_sends_job_cancelled_and_jobs_without_url_send_nothing(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    receiver.secrets = [secret_of(api, key)]
    io_workers(**FAST)
    plain = api.submit(key, message="no webhook here")
    first = api.submit(key, message="first", conversation_id=plain["conversation_id"])
    second = api.submit(
        key, message="second", conversation_id=plain["conversation_id"], webhook_url=receiver.url
    )
    answer = api.request("POST", f"/v1/jobs/{second['id']}/cancel", key)
    assert answer.status_code == 200, answer.text
    api.wait(key, first["id"])
    assert api.wait(key, second["id"])["status"] == "cancelled"
    wait_webhook(api, key, second["id"], "delivered")
    [delivery] = receiver.deliveries
    assert delivery.payload["type"] == "job.cancelled"
    assert delivery.payload["data"]["status"] == "cancelled"
    assert api.wait(key, plain["id"])["webhook"] is None
    assert attempts(api, key, plain["id"]) == []
    # One event in all: none was written for the jobs without a webhook_url.
    with session_scope() as session:
        assert list(session.execute(select(WebhookEvent.job_id)).scalars()) == [second["id"]]


def test_rotation_signs_with_both_secrets_for_24_hours(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    old = secret_of(api, key)
    answer = api.request("POST", "/v1/webhook-secret/rotate", key)
    assert answer.status_code == 200, answer.text
    new = answer.json()["secret"]
    assert new != old and new.startswith("whsec_") and secret_of(api, key) == new
    receiver.secrets = [old, new]
    io_workers(**FAST)
    job = api.submit(key, message="rotate", webhook_url=receiver.url)
    api.wait(key, job["id"])
    wait_webhook(api, key, job["id"], "delivered")
    [during] = receiver.deliveries
    assert sorted(during.verified_by) == sorted([old, new])
    assert len(during.headers["webhook-signature"].split(" ")) == 2

    # 24 hours later (the clock moved in the database): only the new secret signs.
    with session_scope() as session:
        session.execute(
            text("UPDATE webhook_secrets SET previous_expires_at = now() - interval '1 second'")
        )
    answer = api.request("POST", f"/v1/jobs/{job['id']}/webhook/redeliver", key)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "pending"
    wait_until(lambda: len(receiver.deliveries) == 2, 30, "the redelivery")
    after = receiver.deliveries[1]
    assert after.webhook_id == during.webhook_id
    assert after.verified_by == [new]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    wait_webhook(api, key, job["id"], "delivered")
    assert [a["attempt"] for a in attempts(api, key, job["id"])] == [1, 2]


def test_webhook_routes_answer_like_the_rest_of_the_api(api_no_workers: Api) -> None:
    api = api_no_workers
    owner, stranger = api.create_key("acme"), api.create_key("globex")
    assert secret_of(api, owner) != secret_of(api, stranger)
    job = api.submit(owner, message="x", webhook_url="http://127.0.0.1:9/hook")
    plain = api.submit(owner, message="y")
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}/webhook-deliveries"),
        ("POST", f"/v1/jobs/{job['id']}/webhook/redeliver"),
        ("GET", "/v1/jobs/job_unknown/webhook-deliveries"),
        ("POST", "/v1/jobs/%00/webhook/redeliver"),
    ]:
        answer = api.request(method, path, stranger)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    # Nothing to redeliver: the job has no webhook_url.
    answer = api.request("POST", f"/v1/jobs/{plain['id']}/webhook/redeliver", owner)
    assert answer.status_code == 409
    assert answer.headers["content-type"] == "application/problem+json"
    assert api.request("GET", "/v1/webhook-secret", None).status_code == 401
    answer = api.request("GET", f"/v1/jobs/{job['id']}/webhook-deliveries?cursor=%%%", owner)
    assert answer.status_code == 422


def test_deleting_a_conversation_deletes_its_webhook_events(api: Api) -> None:
    """The conversation and its jobs are gone, so are their events: nothing is sent after."""
    key = api.create_key("acme")
    job = api.submit(key, message="x", webhook_url="http://127.0.0.1:9/hook")
    api.wait(key, job["id"])
    event_id = event_id_of(job["id"])
    answer = api.request("DELETE", f"/v1/conversations/{job['conversation_id']}", key)
    assert answer.status_code == 204
    with session_scope() as session:
        assert session.get(WebhookEvent, event_id) is None


def test_redeliver_is_limited_to_once_per_interval_per_job(api_no_workers: Api) -> None:
    """A second redeliver within WEBHOOK_REDELIVER_INTERVAL_SECONDS is a 429 whose
    Retry-After says when the next may come; another job is not held by it; after the
    interval (the clock moved in the database) it is accepted again."""
    api = api_no_workers
    key = api.create_key("acme")
    interval = get_settings().webhook_redeliver_interval_seconds
    assert interval >= 10
    jobs = []
    for _ in range(2):
        job = api.submit(key, message="x", webhook_url="http://127.0.0.1:9/hook")
        # Ended by the cancel (or by a turn worker of the session, should one have taken it).
        assert api.request("POST", f"/v1/jobs/{job['id']}/cancel", key).status_code in (200, 409)
        api.wait(key, job["id"])
        jobs.append(job["id"])
    first, other = jobs

    def redeliver(job_id: str) -> Any:
        return api.request("POST", f"/v1/jobs/{job_id}/webhook/redeliver", key)

    assert redeliver(first).status_code == 202
    answer = redeliver(first)
    assert answer.status_code == 429, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert 1 <= int(answer.headers["retry-after"]) <= math.ceil(interval)
    assert answer.json()["status"] == 429
    assert redeliver(other).status_code == 202

    with session_scope() as session:
        session.execute(
            text(
                "UPDATE webhook_events SET redelivered_at = redelivered_at - make_interval("
                "secs => :s) WHERE job_id = :j"
            ),
            {"s": interval - 2.5, "j": first},
        )
    answer = redeliver(first)
    assert answer.status_code == 429
    # 2.5 s or a little less are left: rounded up, never down to 0.
    assert answer.headers["retry-after"] in ("2", "3")
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE webhook_events SET redelivered_at = redelivered_at - interval '3 seconds'"
                " WHERE job_id = :j"
            ),
            {"j": first},
        )
    assert redeliver(first).status_code == 202
    assert redeliver(first).status_code == 429
