"""GET /metrics shows the engine at work: the workers' metrics reach the API through Redis."""

from __future__ import annotations

import re
import time

import pytest

from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_show_turns_batches_and_queue(api: Api) -> None:
    key = api.create_key("acme")
    jobs = [
        api.submit(key, message=f"turn {i}", generation={"max_new_tokens": 8}) for i in range(4)
    ]
    for job in jobs:
        assert api.wait(key, job["id"])["status"] == "succeeded"
    deadline = time.monotonic() + 15
    while True:
        text = api.request("GET", "/metrics", None).text
        ended = sum(
            float(v)
            for v in re.findall(
                r'^parley_turns_ended_total\{[^}]*status="succeeded"[^}]*\} (\S+)', text, re.M
            )
        )
        if ended >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ended >= 4, text
    for family in (
        "parley_worker_batch_size_bucket",
        "parley_worker_time_to_first_token_seconds_count",
        "parley_turn_queue_wait_seconds_count",
        "parley_turn_run_seconds_count",
        "parley_worker_generated_tokens_total",
        "parley_worker_running_turns",
    ):
        assert re.search(rf'^{family}\{{[^}}]*worker="[^"]+"', text, re.M), family
    assert _sample(text, "parley_jobs_unfinished", status="queued") is not None
    assert _sample(text, "parley_jobs_unfinished", status="running") is not None
    assert "parley_jobs_submitted_total" in text


def test_liveness_and_readiness(api: Api) -> None:
    assert api.request("GET", "/livez", None).json() == {"status": "ok"}
    answer = api.request("GET", "/readyz", None)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready"}
