"""Auth, validation, limits, idempotency and cancellation, against real PostgreSQL and Redis.

Bad input gets a problem+json answer and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import ApiKey, Job, Message
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def _counts() -> tuple[int, int]:
    with session_scope() as session:
        jobs = session.execute(select(func.count()).select_from(Job)).scalar_one()
        messages = session.execute(select(func.count()).select_from(Message)).scalar_one()
    return jobs, messages


def _problem(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body = dict(answer.json())
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


def test_keys_scopes_and_revocation(api_no_workers: Api) -> None:
    api = api_no_workers
    _problem(api.request("GET", "/v1/conversations", None), 401)
    _problem(api.request("GET", "/v1/conversations", "pk_nope"), 401)
    _problem(
        api.request("GET", "/v1/conversations", None, headers={"Authorization": "Basic x"}), 401
    )
    client_key = api.create_key("acme")
    assert api.request("GET", "/v1/conversations", client_key).status_code == 200
    _problem(api.request("GET", "/v1/admin/keys", client_key), 403)
    _problem(api.request("POST", "/v1/admin/keys", client_key, json={"tenant": "x"}), 403)
    keys = api.request("GET", "/v1/admin/keys", api.admin_key).json()["data"]
    listed = {k["tenant"]: k for k in keys}
    assert listed["acme"]["scope"] == "client"
    assert "key" not in listed["acme"]
    # In clear: the key's public identifier, which is not part of its 256-bit secret; the
    # operator's own key, a fingerprint of its digest. No character of a secret.
    assert listed["acme"]["prefix"] == client_key[:9] and len(client_key[10:]) == 43
    assert listed["operator"]["prefix"].startswith("sha256:")
    with session_scope() as session:
        prefixes = session.execute(select(ApiKey.key_prefix)).scalars().all()
    assert prefixes and not any(prefix in api.admin_key for prefix in prefixes)
    assert (
        api.request("DELETE", f"/v1/admin/keys/{listed['acme']['id']}", api.admin_key).status_code
        == 204
    )
    _problem(api.request("GET", "/v1/conversations", client_key), 401)
    _problem(api.request("DELETE", "/v1/admin/keys/key_unknown", api.admin_key), 404)
    _problem(
        api.request("POST", "/v1/admin/keys", api.admin_key, json={"tenant": "bad tenant!"}), 422
    )


def test_key_pagination_has_no_duplicates(api_no_workers: Api) -> None:
    api = api_no_workers
    for n in range(5):
        api.create_key(f"t{n}")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.request("GET", "/v1/admin/keys", api.admin_key, params=params).json()
        seen += [k["id"] for k in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6  # five and the operator's
    _problem(api.request("GET", "/v1/admin/keys", api.admin_key, params={"cursor": "!!"}), 422)
    _problem(api.request("GET", "/v1/admin/keys", api.admin_key, params={"limit": 0}), 422)


BAD_BODIES: list[dict[str, Any]] = [
    {},
    {"message": ""},
    {"message": "   \n\t"},
    {"message": "a\x00b"},
    {"message": "x" * 32_001},
    {"message": 5},
    {"message": "hi", "unknown": 1},
    {"message": "hi", "generation": {"max_new_tokens": 0}},
    {"message": "hi", "generation": {"max_new_tokens": 10**9}},
    {"message": "hi", "generation": {"temperature": 2.5}},
    {"message": "hi", "generation": {"temperature": -1}},
    # Numerically unsafe: logits over a temperature this small overflow (a poison turn).
    {"message": "hi", "generation": {"temperature": 1e-300}},
    {"message": "hi", "generation": {"top_p": 0}},
    {"message": "hi", "generation": {"seed": 10**30}},
    {"message": "hi", "metadata": {str(i): "v" for i in range(17)}},
    {"message": "hi", "metadata": {"k" * 65: "v"}},
    {"message": "hi", "metadata": {"k": "v" * 513}},
    {"message": "hi", "metadata": {"k": 1}},
    {"message": "hi", "metadata": {"k": "a\x00"}},
    {"message": "hi", "system_prompt": "a\x00"},
    {"message": "hi", "webhook_url": ""},
    {"message": "hi", "webhook_url": "https://hooks.example.com:99999/parley"},
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_invalid_submissions_are_422_and_store_nothing(api_no_workers: Api, body: Any) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    problem = _problem(api.request("POST", "/v1/jobs", key, json=body), 422)
    assert problem["errors"], problem
    assert _counts() == before


def test_malformed_payloads(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    headers = {"Content-Type": "application/json"}
    bodies = {
        # Not JSON, not UTF-8, a lone surrogate, JSON but not an object: each a 422 naming it.
        b"{": 422,
        b"\xff\xfe{}": 422,
        b'{"message": "\\ud800"}': 422,
        b"null": 422,
        # JSON's NaN and Infinity extensions, which Python's parser reads: not numbers here.
        b'{"message": "hi", "generation": {"temperature": NaN}}': 422,
        b'{"message": "hi", "generation": {"top_p": Infinity}}': 422,
        # Nested past the JSON parser's recursion limit: it cannot even be read.
        b"[" * 5000 + b"]" * 5000: 400,
    }
    for raw, status in bodies.items():
        answer = api.request("POST", "/v1/jobs", key, content=raw, headers=headers)
        assert answer.status_code == status, (raw[:20], answer.text)
        _problem(answer, status)
    _problem(
        api.request("POST", "/v1/jobs", key, content=b"x" * (256 * 1024 + 1), headers=headers), 413
    )
    assert _counts() == (0, 0)


def test_conversation_rules(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    first = api.submit(key, message="hi", metadata={"ticket": "T-1"})
    conv = first["conversation_id"]
    _problem(
        api.request(
            "POST",
            "/v1/jobs",
            key,
            json={"message": "x", "conversation_id": conv, "system_prompt": "no"},
        ),
        422,
    )
    for unknown in ["conv_unknown", "", "a" * 500, "%00", "../x"]:
        answer = api.request(
            "POST", "/v1/jobs", key, json={"message": "x", "conversation_id": unknown}
        )
        _problem(answer, 404)
    for path in ["/v1/jobs/job_unknown", "/v1/jobs/%00", "/v1/conversations/" + "x" * 300]:
        _problem(api.request("GET", path, key), 404)
    assert first["metadata"] == {"ticket": "T-1"}
    assert first["queue_position"] is not None and first["queue_position"] >= 0


def test_idempotency_key(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    headers = {"Idempotency-Key": "order-1"}
    one = api.request("POST", "/v1/jobs", key, json={"message": "once"}, headers=headers)
    two = api.request("POST", "/v1/jobs", key, json={"message": "once"}, headers=headers)
    assert one.status_code == two.status_code == 202
    assert one.json()["id"] == two.json()["id"]
    assert _counts() == (1, 1)
    _problem(api.request("POST", "/v1/jobs", key, json={"message": "other"}, headers=headers), 422)
    # Keys are per tenant: another tenant's identical key is independent.
    other = api.create_key("globex")
    three = api.request("POST", "/v1/jobs", other, json={"message": "once"}, headers=headers)
    assert three.status_code == 202 and three.json()["id"] != one.json()["id"]
    # A request that fails leaves the key free for a corrected retry.
    bad = {"message": "x", "conversation_id": "conv_unknown"}
    _problem(api.request("POST", "/v1/jobs", key, json=bad, headers={"Idempotency-Key": "k2"}), 404)
    ok = api.request(
        "POST", "/v1/jobs", key, json={"message": "x"}, headers={"Idempotency-Key": "k2"}
    )
    assert ok.status_code == 202


def test_cancel_a_queued_job_and_a_terminal_one(api: Api) -> None:
    key = api.create_key("acme")
    # The second turn waits behind the first: cancelling it is immediate, and it never runs.
    first = api.submit(key, message="long", generation={"max_new_tokens": 512})
    second = api.submit(key, message="next", conversation_id=first["conversation_id"])
    answer = api.request("POST", f"/v1/jobs/{second['id']}/cancel", key)
    assert answer.status_code == 200
    assert answer.json()["status"] == "cancelled"
    assert api.wait(key, first["id"])["status"] == "succeeded"
    ended = api.wait(key, second["id"])
    assert ended["status"] == "cancelled" and ended["reply"] is None and ended["started_at"] is None
    _problem(api.request("POST", f"/v1/jobs/{second['id']}/cancel", key), 409)
    _problem(api.request("POST", f"/v1/jobs/{first['id']}/cancel", key), 409)
    # A later turn still runs, and its prompt leaves the cancelled turn out.
    third = api.submit(key, message="after", conversation_id=first["conversation_id"])
    assert api.wait(key, third["id"])["context_messages"] == 2
    transcript = api.request(
        "GET", f"/v1/conversations/{first['conversation_id']}/messages", key
    ).json()["data"]
    assert [m["content"] for m in transcript if m["role"] == "user"] == ["long", "next", "after"]


def test_a_streamed_body_over_the_limit_is_413(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")

    def chunks() -> Any:
        yield b'{"message": "'
        for _ in range(300):
            yield b"x" * 1024
        yield b'"}'

    answer = api.request(
        "POST", "/v1/jobs", key, content=chunks(), headers={"Content-Type": "application/json"}
    )
    _problem(answer, 413)
    assert _counts() == (0, 0)


def test_cursors_with_text_postgresql_cannot_hold_are_422(api_no_workers: Api) -> None:
    import base64
    import json

    api = api_no_workers
    key = api.create_key("acme")
    for bad in [
        '["2020-01-01T00:00:00+00:00", "\\ud800"]',
        '["2020-01-01T00:00:00+00:00", "a\\u0000"]',
    ]:
        cursor = base64.urlsafe_b64encode(json.dumps(json.loads(bad)).encode()).decode()
        _problem(api.request("GET", "/v1/conversations", key, params={"cursor": cursor}), 422)


def test_operators_read_any_tenants_jobs_and_conversations(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    job = api.submit(key, message="hello")
    assert api.request("GET", f"/v1/jobs/{job['id']}", api.admin_key).status_code == 200
    conversation = f"/v1/conversations/{job['conversation_id']}"
    assert api.request("GET", conversation, api.admin_key).status_code == 200
    assert api.request("GET", conversation + "/messages", api.admin_key).status_code == 200
    # Another client tenant still sees nothing.
    assert api.request("GET", conversation, api.create_key("globex")).status_code == 404
