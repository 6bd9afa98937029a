"""Log records carry the ids of what their thread is working on (app/logs.py)."""

from __future__ import annotations

import logging
import threading

import pytest

from app.logs import FORMAT, log_context


def _format(record: logging.LogRecord) -> str:
    return logging.Formatter(FORMAT).format(record).split(" ", 3)[3]


def test_records_carry_the_ids_of_their_context(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("parley.test")
    with caplog.at_level(logging.INFO):
        log.info("outside")
        with log_context(request_id="req_1"):
            log.info("in the request")
            with log_context(job_id="job_1"):
                log.info("in the job")
            log.info("back in the request")
        log.info("outside again")
    assert [_format(r) for r in caplog.records] == [
        "parley.test outside",
        "parley.test request_id=req_1 in the request",
        "parley.test request_id=req_1 job_id=job_1 in the job",
        "parley.test request_id=req_1 back in the request",
        "parley.test outside again",
    ]


def test_a_context_is_its_threads_own(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("parley.test")
    inside = threading.Event()
    leave = threading.Event()

    def turn() -> None:
        with log_context(job_id="job_2"):
            inside.set()
            leave.wait(5)

    worker = threading.Thread(target=turn)
    worker.start()
    inside.wait(5)
    with caplog.at_level(logging.INFO):
        log.info("another thread")
    leave.set()
    worker.join()
    assert caplog.records[0].job_id is None  # type: ignore[attr-defined]
