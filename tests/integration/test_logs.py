"""Invariant 7: a request and a job can be followed through the logs by their ids."""

from __future__ import annotations

import logging
import time

import pytest

from tests.integration.conftest import WORKER_LOG
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def test_the_submit_logs_the_new_job_with_its_request_id(
    api_no_workers: Api, caplog: pytest.LogCaptureFixture
) -> None:
    key = api_no_workers.create_key("acme")
    with caplog.at_level(logging.INFO, logger="parley.jobs"):
        answer = api_no_workers.request(
            "POST", "/v1/jobs", key, json={"message": "hi"}, headers={"X-Request-Id": "req-7"}
        )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    accepted = [r for r in caplog.records if r.name == "parley.jobs"]
    assert len(accepted) == 1
    assert accepted[0].request_id == "req-7"  # type: ignore[attr-defined]
    assert accepted[0].job_id == job_id  # type: ignore[attr-defined]
    assert answer.headers["x-request-id"] == "req-7"


def test_every_worker_log_line_of_a_turn_carries_its_job_id(api: Api) -> None:
    key = api.create_key("acme")
    job_id = api.submit(key, message="follow me", generation={"max_new_tokens": 4})["id"]
    assert api.wait(key, job_id)["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in WORKER_LOG.read_text().splitlines() if job_id in line]
        if any("succeeded" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any("claimed (attempt 1)" in line for line in lines), lines
    assert any("succeeded" in line for line in lines), lines
    # Celery's own lines name the task, not the job; every line of Parley's names the job.
    ours = [line for line in lines if " parley." in line]
    assert ours and all(f"job_id={job_id} " in line for line in ours), ours
