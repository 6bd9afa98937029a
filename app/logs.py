"""Log set-up shared by the API, the workers and the command line.

Invariant 7: a request, a job and a webhook attempt can each be followed through the logs by
its id. The ids of what a thread is working on are kept in context variables (`log_context`)
and every log record gets them as attributes, `request_id` and `job_id`, and in its text:

    2026-12-02 06:10:01,123 INFO parley.jobs request_id=req_... job_id=job_... job accepted

An API request's context is set by the request-id middleware, a turn's by `parley.run_turn`;
context variables follow a request into FastAPI's threadpool, and stay with a Celery task's
thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(log_ids)s%(message)s"

_request_id: ContextVar[str | None] = ContextVar("parley_request_id", default=None)
_job_id: ContextVar[str | None] = ContextVar("parley_job_id", default=None)
_base_factory = logging.getLogRecordFactory()


def _record_with_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.request_id = request_id = _request_id.get()
    record.job_id = job_id = _job_id.get()
    record.log_ids = (f"request_id={request_id} " if request_id else "") + (
        f"job_id={job_id} " if job_id else ""
    )
    return record


# At import: records made before configure_logging() carry the ids too.
logging.setLogRecordFactory(_record_with_ids)


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Within the block, this thread's (or task's) log records carry these ids."""
    tokens = []
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def configure_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=FORMAT, force=False)
