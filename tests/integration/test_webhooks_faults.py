"""Webhooks under faults (reliability F6, F7, F8): a receiver that is down, redirects, answers
slowly or streams a huge body; URLs the SSRF guard refuses; a delivery worker killed mid-retry.
Each test prints its figures (run pytest with -s to see them)."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.config import get_settings
from app.webhooks import ssrf
from tests.integration.helpers import Api
from tests.integration.test_webhooks import (
    FAST,
    attempts,
    event_id_of,
    secret_of,
    wait_until,
    wait_webhook,
    webhook,
)
from tests.integration.webhook_receiver import HUGE_BODY_BYTES, Receiver
from worker.io_worker import delivery, sender

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.released.set()
        server.stop()


def figures(scenario: str, **values: Any) -> None:
    print(f"\n{scenario}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def test_f6_receiver_down_then_up(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    receiver.secrets = [secret_of(api, key)]
    receiver.reserve_port()  # down: connections refused
    io_workers(**{**FAST, "WEBHOOK_RETRY_SCHEDULE": "0.5,1,1,1,1,1,1,1,1,1,1,1,1,1,1"})
    jobs = [api.submit(key, message=f"turn {i}", webhook_url=receiver.url) for i in range(5)]
    for job in jobs:
        api.wait(key, job["id"])
    for job in jobs:
        wait_until(lambda j=job: webhook(api, key, j["id"])["attempts"] >= 2, 60, "two attempts")
    failed_attempts = attempts(api, key, jobs[0]["id"])
    assert all(a["status_code"] is None and a["error"] for a in failed_attempts)
    assert webhook(api, key, jobs[0]["id"])["status"] == "pending"

    up_at = time.monotonic()
    receiver.start()
    for job in jobs:
        wait_webhook(api, key, job["id"], "delivered")
    recovered = time.monotonic() - up_at
    time.sleep(1.0)
    seen = Counter(d.webhook_id for d in receiver.deliveries)
    assert len(seen) == len(jobs)
    assert set(seen.values()) == {1}, seen
    assert all(d.verified_by for d in receiver.deliveries)
    logs = [attempts(api, key, job["id"]) for job in jobs]
    for log in logs:
        assert [a["attempt"] for a in log] == list(range(1, len(log) + 1))
        assert log[-1]["status_code"] == 200 and all(a["status_code"] is None for a in log[:-1])
    figures(
        "F6",
        events=len(jobs),
        delivered=len(seen),
        duplicate_ids=sum(n - 1 for n in seen.values()),
        attempts_per_event=[len(log) for log in logs],
        seconds_to_deliver_all_after_up=round(recovered, 2),
    )


def test_f7_a_redirect_is_not_followed(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    receiver.mode = "redirect"
    receiver.start()
    io_workers(**{**FAST, "WEBHOOK_RETRY_SCHEDULE": "0.2,0.2"})
    job = api.submit(key, message="x", webhook_url=receiver.url)
    api.wait(key, job["id"])
    state = wait_webhook(api, key, job["id"], "failed")
    assert state["attempts"] == 3
    assert len(receiver.to("/hooks/parley")) == 3
    assert receiver.to("/landed") == []
    log = attempts(api, key, job["id"])
    assert [a["status_code"] for a in log] == [307, 307, 307]
    assert all("redirect not followed" in a["error"] for a in log)
    figures("F7 redirect", attempts=len(log), followed=len(receiver.to("/landed")))


def test_f7_a_slow_receiver_is_cut_off_at_the_timeout(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    receiver.mode, receiver.slow_seconds = "slow", 8.0
    receiver.start()
    io_workers(**{**FAST, "WEBHOOK_TIMEOUT_SECONDS": "1", "WEBHOOK_RETRY_SCHEDULE": "0.2"})
    job = api.submit(key, message="x", webhook_url=receiver.url)
    api.wait(key, job["id"])
    wait_webhook(api, key, job["id"], "failed", timeout=40)
    log = attempts(api, key, job["id"])
    assert len(log) == 2
    for attempt in log:
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("timeout")
        # Aborted at the 1 s timeout, long before the receiver would have answered.
        assert attempt["duration_ms"] < receiver.slow_seconds * 1000 / 2
    figures(
        "F7 slow", timeout_s=1, receiver_sleep_s=8, durations_ms=[a["duration_ms"] for a in log]
    )


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def test_f7_a_huge_answer_is_read_only_up_to_the_cap(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    key = api.create_key("acme")
    receiver.mode = "huge"
    receiver.start()
    worker = io_workers(**FAST)
    job = api.submit(key, message="x", webhook_url=receiver.url)
    api.wait(key, job["id"])
    wait_webhook(api, key, job["id"], "delivered")
    wait_until(lambda: receiver.huge_bytes_sent > 0, 10, "the body to be streamed")
    time.sleep(0.5)
    # The worker hung up after reading its cap: what the receiver could push before the
    # connection closed is the cap plus the sockets' buffers, not the gigabyte offered.
    assert receiver.huge_bytes_sent < 64 * 1024 * 1024
    [attempt] = attempts(api, key, job["id"])
    assert attempt["status_code"] == 200
    figures(
        "F7 huge",
        offered_bytes=HUGE_BODY_BYTES,
        read_cap_bytes=sender.MAX_RESPONSE_BYTES,
        bytes_sent_before_hangup=receiver.huge_bytes_sent,
        io_worker_peak_rss_kib=_peak_rss_kib(worker.pid),
    )


ENCODED_PRIVATE = [
    "http://169.254.169.254/",
    "http://10.0.0.1/",
    "http://167772161/",  # 10.0.0.1
    "http://0xa000001/",
    "http://012.1/",  # 10.0.0.1, octal and short
    "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a00:1]/",
    "http://[fd00:ec2::254]/",
    "http://[::1]/",
    "http://192.168.1.1:8080/hook",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://metadata.google.internal/",
    "http://private.parley.test/",
    "ftp://example.com/",
]


@dataclass
class FakeDns:
    answers: dict[str, list[str]]
    asked: list[str] = field(default_factory=list)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    """The resolver, stubbed: tests never send a query or traffic beyond loopback."""
    dns = FakeDns({"private.parley.test": ["10.20.30.40"]})

    def fake(host: str, port: int, timeout: float) -> list[ssrf.IPAddress]:
        dns.asked.append(host)
        if host not in dns.answers:
            raise ssrf.UnsafeWebhookUrl(f"the host {host!r} does not resolve")
        return [ipaddress.ip_address(a) for a in dns.answers[host]]

    async def fake_at_submit(host: str, port: int, seconds: float) -> list[ssrf.IPAddress]:
        return fake(host, port, seconds)

    monkeypatch.setattr(ssrf, "resolve_host", fake)
    monkeypatch.setattr(ssrf, "resolve_dns", fake_at_submit)
    return dns


def test_f8_refused_at_submit(api_no_workers: Api, fake_dns: FakeDns) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    for url in ENCODED_PRIVATE:
        answer = api.request("POST", "/v1/jobs", key, json={"message": "x", "webhook_url": url})
        assert answer.status_code == 422, (url, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["errors"][0]["loc"] == ["body", "webhook_url"]
    assert api.request("GET", "/v1/conversations", key).json()["data"] == []
    assert fake_dns.asked == ["private.parley.test"]
    figures("F8 submit", refused=len(ENCODED_PRIVATE), of=len(ENCODED_PRIVATE))


def test_f8_refused_at_delivery_when_the_name_rebinds(
    api: Api, receiver: Receiver, fake_dns: FakeDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that passed at submit and resolves to a private address by delivery time is
    refused without a connection (run in this process, to stub its resolver)."""
    receiver.start()
    key = api.create_key("acme")
    fake_dns.answers["rebind.parley.test"] = ["127.0.0.1"]
    job = api.submit(key, message="x", webhook_url=f"http://rebind.parley.test:{receiver.port}/h")
    api.wait(key, job["id"])
    fake_dns.answers["rebind.parley.test"] = ["169.254.169.254"]
    connections: list[Any] = []

    async def no_connection(*args: Any) -> tuple[int, int]:
        connections.append(args)
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(sender, "_exchange", no_connection)
    state = delivery.deliver(event_id_of(job["id"]), get_settings())
    assert state == "pending"
    [attempt] = attempts(api, key, job["id"])
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("refused, no connection made")
    assert "metadata" in attempt["error"]
    assert connections == [] and receiver.deliveries == []
    assert fake_dns.asked == ["rebind.parley.test", "rebind.parley.test"]


def test_a_killed_io_worker_loses_no_retry(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    """kill -9 the I/O worker between attempts; another one delivers from the database."""
    key = api.create_key("acme")
    receiver.secrets = [secret_of(api, key)]
    receiver.reserve_port()
    settings = {**FAST, "WEBHOOK_RETRY_SCHEDULE": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"}
    first = io_workers(**settings)
    job = api.submit(key, message="x", webhook_url=receiver.url)
    api.wait(key, job["id"])
    # Two attempts made and recorded: the kill falls between attempts (the next is due 1 s on).
    wait_until(
        lambda: (
            len(attempts(api, key, job["id"])) >= 2
            and webhook(api, key, job["id"])["attempts"] == len(attempts(api, key, job["id"]))
        ),
        60,
        "two recorded attempts",
    )
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    killed_after = webhook(api, key, job["id"])["attempts"]
    receiver.start()
    time.sleep(1.5)
    assert receiver.deliveries == []  # nobody delivers while no I/O worker runs
    io_workers(**settings)
    wait_webhook(api, key, job["id"], "delivered")
    assert [d.webhook_id for d in receiver.deliveries] == [event_id_of(job["id"])]
    log = attempts(api, key, job["id"])
    # The new worker went on from the recorded attempts: none numbered twice, and none missing
    # but, should the kill have met one in flight, that one.
    numbers = [a["attempt"] for a in log]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1, numbers
    assert numbers[-1] - len(numbers) <= 1, numbers
    assert len(log) > killed_after
    assert webhook(api, key, job["id"])["attempts"] == numbers[-1]
    assert [a["status_code"] for a in log][-1] == 200
    assert all(a["status_code"] != 200 for a in log[:-1])
    figures("kill between attempts", attempts_before_kill=killed_after, attempts=len(log))


def test_a_killed_io_worker_mid_attempt_is_taken_over_after_its_lease(
    api: Api, io_workers: Callable[..., Any], receiver: Receiver
) -> None:
    """kill -9 while an attempt is in flight: the lease expires, another worker delivers;
    the receiver sees the webhook-id again (it dedupes on it)."""
    key = api.create_key("acme")
    receiver.secrets = [secret_of(api, key)]
    receiver.mode = "hold"
    receiver.start()
    settings = {**FAST, "WEBHOOK_TIMEOUT_SECONDS": "2"}
    first = io_workers(**settings)
    job = api.submit(key, message="x", webhook_url=receiver.url)
    api.wait(key, job["id"])
    wait_until(lambda: receiver.deliveries, 30, "the first attempt to arrive")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    killed_at = time.monotonic()
    receiver.mode = "ok"
    receiver.released.set()
    io_workers(**settings)
    wait_webhook(api, key, job["id"], "delivered", timeout=60)
    taken_over = time.monotonic() - killed_at
    seen = Counter(d.webhook_id for d in receiver.deliveries)
    assert list(seen) == [event_id_of(job["id"])]
    assert webhook(api, key, job["id"])["attempts"] == 2
    # The killed attempt left no record; the one that delivered did.
    assert [(a["attempt"], a["status_code"]) for a in attempts(api, key, job["id"])] == [(2, 200)]
    figures(
        "kill mid-attempt",
        receiver_saw=dict(seen),
        seconds_to_take_over=round(taken_over, 1),
        lease_s=delivery.attempt_lease(
            get_settings().model_copy(update={"webhook_timeout_seconds": 2.0})
        ).total_seconds(),
    )
