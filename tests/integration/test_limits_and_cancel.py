"""Limits, in-flight idempotency, stopping a running turn, and the key command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from app.config import get_settings
from app.db import session_scope
from app.models import IdempotencyKey
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def test_a_running_turn_is_stopped_between_tokens(api: Api) -> None:
    key = api.create_key("acme")
    job = api.submit(key, message="write at length", generation={"max_new_tokens": 1000})
    deadline = time.monotonic() + 30
    status = job["status"]
    while status == "queued" and time.monotonic() < deadline:
        status = api.request("GET", f"/v1/jobs/{job['id']}", key).json()["status"]
    assert status == "running"
    answer = api.request("POST", f"/v1/jobs/{job['id']}/cancel", key)
    assert answer.status_code == 200, answer.text
    ended = api.wait(key, job["id"])
    assert ended["status"] == "cancelled"
    assert ended["reply"] is None
    assert ended["usage"]["completion_tokens"] < 1000
    messages = api.request(
        "GET", f"/v1/conversations/{job['conversation_id']}/messages", key
    ).json()["data"]
    assert [m["role"] for m in messages] == ["user"]


def test_tenant_limit_on_unfinished_jobs(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_unfinished_jobs_per_tenant", 1)
    key = api.create_key("acme")
    first = api.submit(key, message="long", generation={"max_new_tokens": 1000})
    answer = api.request(
        "POST",
        "/v1/jobs",
        key,
        json={"message": "more", "conversation_id": first["conversation_id"]},
    )
    assert answer.status_code == 429, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["Retry-After"]) > 0
    # Another tenant is not held back by this one.
    assert (
        api.request("POST", "/v1/jobs", api.create_key("globex"), json={"message": "x"}).status_code
        == 202
    )
    api.request("POST", f"/v1/jobs/{first['id']}/cancel", key)
    api.wait(key, first["id"])


def test_rate_limit_per_key(api_no_workers: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api = api_no_workers
    monkeypatch.setattr(get_settings(), "rate_limit_per_minute", 3)
    key, other = api.create_key("acme"), api.create_key("globex")
    if time.time() % 60 > 55:  # keep the five requests inside one counting window
        time.sleep(6)
    codes = [api.request("GET", "/v1/conversations", key).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = api.request("GET", "/v1/conversations", key)
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert api.request("GET", "/v1/conversations", other).status_code == 200


def test_repeat_while_the_first_is_in_flight_is_409(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    body = {"message": "once"}
    from app.jobs.idempotency import request_fingerprint
    from app.jobs.schemas import JobCreate

    with session_scope() as session:
        session.add(
            IdempotencyKey(
                tenant_id="acme", key="busy", request_hash=request_fingerprint(JobCreate(**body))
            )
        )
    answer = api.request("POST", "/v1/jobs", key, json=body, headers={"Idempotency-Key": "busy"})
    assert answer.status_code == 409, answer.text


def test_keys_create_command(api_no_workers: Api) -> None:
    api = api_no_workers
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "cli-tenant", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout
    created = json.loads(out)
    assert created["tenant"] == "cli-tenant" and created["scope"] == "client"
    assert api.request("GET", "/v1/conversations", created["key"]).status_code == 200
    assert api.request("GET", "/v1/admin/keys", created["key"]).status_code == 403
    admin = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "ops", "--admin"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout.strip()
    assert api.request("GET", "/v1/admin/keys", admin).status_code == 200
    bad = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "no spaces"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
    )
    assert bad.returncode == 2
