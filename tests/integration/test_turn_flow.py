"""The core turn flow end to end: submit, queue, real worker, context, transcript, poll."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import redis

from tests.integration.helpers import Api, worker_total

pytestmark = pytest.mark.integration

ENDED = 'parley_turns_ended_total{status="succeeded"'
WORKERS = ("test-a", "test-b")  # the session's workers (conftest.py)


def test_two_turns_build_a_transcript_in_order(api: Api) -> None:
    key = api.create_key("acme")
    first = api.submit(key, message="Hello there", system_prompt="You are terse.")
    assert first["status"] in ("queued", "running")
    assert first["context_messages"] is None
    done = api.wait(key, first["id"])
    assert done["status"] == "succeeded", done
    assert done["reply"]["role"] == "assistant"
    assert isinstance(done["reply"]["content"], str)
    assert done["context_messages"] == 0
    assert done["usage"]["completion_tokens"] >= 1
    assert done["started_at"] and done["finished_at"]
    assert done["queue_position"] is None

    second = api.submit(key, message="And again?", conversation_id=first["conversation_id"])
    done2 = api.wait(key, second["id"])
    assert done2["status"] == "succeeded"
    assert done2["context_messages"] == 2

    messages = api.request(
        "GET", f"/v1/conversations/{first['conversation_id']}/messages", key
    ).json()
    assert [m["role"] for m in messages["data"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages["data"]][0::2] == ["Hello there", "And again?"]
    assert messages["data"][1]["content"] == done["reply"]["content"]
    assert [m["seq"] for m in messages["data"]] == sorted(m["seq"] for m in messages["data"])
    assert messages["next_cursor"] is None

    conversation = api.request("GET", f"/v1/conversations/{first['conversation_id']}", key).json()
    assert conversation["message_count"] == 4
    assert conversation["system_prompt"] == "You are terse."


def test_another_tenant_gets_404_everywhere(api: Api) -> None:
    owner, stranger = api.create_key("acme"), api.create_key("globex")
    job = api.submit(owner, message="private")
    api.wait(owner, job["id"])
    conv = job["conversation_id"]
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/conversations/{conv}"),
        ("GET", f"/v1/conversations/{conv}/messages"),
        ("DELETE", f"/v1/conversations/{conv}"),
    ]:
        answer = api.request(method, path, stranger)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    answer = api.request(
        "POST", "/v1/jobs", stranger, json={"message": "x", "conversation_id": conv}
    )
    assert answer.status_code == 404
    assert api.request("GET", "/v1/conversations", stranger).json()["data"] == []


def test_context_is_the_same_without_redis_copy(api: Api, redis_client: redis.Redis) -> None:
    """Flush Redis between two turns: the second turn's prompt is rebuilt from PostgreSQL
    and is the same as with the cached copy (same context, same prompt, same greedy reply)."""
    key = api.create_key("acme")
    results = []
    for flush in (False, True):
        first = api.submit(key, message="Remember the number 42.", system_prompt="Be brief.")
        api.wait(key, first["id"])
        cached = f"parley:context:{first['conversation_id']}"
        # The worker caches the context after storing the end: it may land a moment later.
        deadline = time.monotonic() + 10
        while redis_client.get(f"{cached}:upto") != "1:2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.get(f"{cached}:upto") == "1:2"  # the first turn, two messages
        roles = [json.loads(m)["role"] for m in redis_client.lrange(cached, 0, -1)]
        assert roles == ["user", "assistant"]
        if flush:
            redis_client.flushdb()
            assert not redis_client.exists(cached, f"{cached}:upto")
        second = api.submit(key, message="Which number?", conversation_id=first["conversation_id"])
        results.append(api.wait(key, second["id"]))
    cached, rebuilt = results
    assert cached["status"] == rebuilt["status"] == "succeeded"
    assert cached["context_messages"] == rebuilt["context_messages"] == 2
    assert cached["usage"]["prompt_tokens"] == rebuilt["usage"]["prompt_tokens"]
    assert cached["reply"]["content"] == rebuilt["reply"]["content"]


def test_turns_of_one_conversation_run_in_order_across_two_workers(api: Api) -> None:
    """Reliability F11: two turns submitted back to back, two workers: run in order, and the
    second's prompt holds the first's reply."""
    key = api.create_key("acme")
    before = api.settled_metrics([ENDED])
    first = api.submit(key, message="one", generation={"max_new_tokens": 64})
    second = api.submit(key, message="two", conversation_id=first["conversation_id"])
    assert second["status"] == "queued"
    one, two = api.wait(key, first["id"]), api.wait(key, second["id"])
    assert one["status"] == two["status"] == "succeeded"
    assert two["started_at"] >= one["finished_at"]
    assert two["context_messages"] == 2
    # And many at once, across conversations, each in its own order.
    chains = []
    for n in range(4):
        jobs = [api.submit(key, message=f"c{n} t0")]
        for t in range(1, 3):
            jobs.append(
                api.submit(key, message=f"c{n} t{t}", conversation_id=jobs[0]["conversation_id"])
            )
        chains.append(jobs)
    for jobs in chains:
        ended = [api.wait(key, j["id"]) for j in jobs]
        assert [j["status"] for j in ended] == ["succeeded"] * 3
        assert [j["context_messages"] for j in ended] == [0, 2, 4]
        for earlier, later in itertools.pairwise(ended):
            assert later["started_at"] >= earlier["finished_at"]
    # Both workers took turns: the order held across workers, not on one by chance.
    after = api.settled_metrics([ENDED])
    for worker in WORKERS:
        assert worker_total(after, ENDED, worker=worker) > worker_total(
            before, ENDED, worker=worker
        )


def test_prefer_wait_is_applied(api: Api) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="hi")
    answer = api.request("GET", f"/v1/jobs/{job['id']}", key, headers={"Prefer": "wait=30"})
    assert answer.headers["Preference-Applied"] == "wait=30"
    assert answer.json()["status"] == "succeeded"


def test_prefer_wait_on_another_tenants_job_is_not_found(api: Api) -> None:
    owner, other = api.create_key("acme"), api.create_key("globex")
    job = api.submit(owner, message="mine")
    for job_id in (job["id"], "job_unknown", "job\u00e9"):
        answer = api.request("GET", f"/v1/jobs/{job_id}", other, headers={"Prefer": "wait=5"})
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    api.wait(owner, job["id"])


def test_delete_conversation_removes_everything(api: Api) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="forget me")
    api.wait(key, job["id"])
    conv = job["conversation_id"]
    assert api.request("DELETE", f"/v1/conversations/{conv}", key).status_code == 204
    assert api.request("GET", f"/v1/conversations/{conv}", key).status_code == 404
    assert api.request("GET", f"/v1/conversations/{conv}/messages", key).status_code == 404
    assert api.request("GET", f"/v1/jobs/{job['id']}", key).status_code == 404
    assert api.request("DELETE", f"/v1/conversations/{conv}", key).status_code == 404
