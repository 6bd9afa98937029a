"""Signatures (checked with the standardwebhooks library, as a receiver would) and the retry
schedule's arithmetic, without services."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.config import Settings
from app.models import WebhookSecret
from app.webhooks import signing
from worker.io_worker import delivery


def test_a_signature_verifies_with_each_signing_secret_and_no_other() -> None:
    old, new, stranger = signing.new_secret(), signing.new_secret(), signing.new_secret()
    assert old.startswith("whsec_") and len(old) == len("whsec_") + 44 and old != new
    now = datetime.now(UTC)
    body = '{"type":"job.succeeded","data":{"reply":"h\\u00e9 \\u2603"}}'
    headers = signing.sign_headers(message_id="evt_1", body=body, keys=[new, old], at=now)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (new, old):
        assert Webhook(key).verify(body, headers)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace("succeeded", "failed"), headers)


def test_the_previous_secret_signs_only_until_it_expires() -> None:
    now = datetime.now(UTC)
    row = WebhookSecret(tenant_id="t", secret="whsec_new", previous_secret="whsec_old")
    row.previous_expires_at = now + timedelta(hours=24)
    assert signing.signing_secrets(row, now=now) == ["whsec_new", "whsec_old"]
    assert signing.signing_secrets(row, now=now + timedelta(hours=24, seconds=1)) == ["whsec_new"]
    row.previous_secret, row.previous_expires_at = None, None
    assert signing.signing_secrets(row, now=now) == ["whsec_new"]


def test_the_default_schedule_retries_for_more_than_24_hours() -> None:
    schedule = Settings().webhook_retry_schedule
    assert schedule == [5, 300, 1800, 7200, 18000, 36000, 36000]
    # Jitter only stretches delays, so the schedule's sum is the least time covered.
    assert sum(schedule) > 24 * 3600


def test_delays_follow_the_schedule_with_upward_jitter_then_give_up() -> None:
    settings = Settings(webhook_retry_schedule="1, 10,100")
    for failures, base in ((1, 1.0), (2, 10.0), (3, 100.0)):
        for _ in range(50):
            delay = delivery.next_attempt_delay(settings, failures=failures)
            assert delay is not None and base <= delay <= base * (1 + delivery.JITTER)
    assert delivery.next_attempt_delay(settings, failures=4) is None


@pytest.mark.parametrize("bad", ["", "0", "-5", "1,x", "nan"])
def test_a_bad_schedule_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Settings(webhook_retry_schedule=bad)


def test_allowed_networks_are_read_from_a_comma_separated_list() -> None:
    settings = Settings(webhook_allowed_networks="127.0.0.0/8, ::1,10.1.2.3/16")
    assert settings.webhook_allowed_networks == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
    ]
    with pytest.raises(ValueError):
        Settings(webhook_allowed_networks="10.0.0.0/33")
