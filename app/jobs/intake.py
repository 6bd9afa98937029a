"""A turn accepted, whichever route it came by (`POST /v1/jobs`, `POST /v1/responses`):
stored in one transaction on the API's async pool, then, once committed, sent to the broker
(invariant 2: enqueue only after commit)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from app.config import Settings
from app.deps import pooled_connection
from app.jobs import service
from app.jobs.schemas import JobCreate
from app.logs import log_context
from app.metrics import JOBS_SUBMITTED
from app.queue import RUN_TURN, send_now

log = logging.getLogger("parley.jobs")


async def accept(
    request: Request, *, tenant_id: str, body: JobCreate, settings: Settings, **options: Any
) -> service.Submitted:
    """Store the turn (service.submit_turn, with its keyword `options`) and send it."""
    async with pooled_connection(request) as conn, conn.transaction():
        submitted = await service.submit_turn(
            conn,
            tenant_id=tenant_id,
            request=body,
            settings=settings,
            unsent=request.app.state.unsent_counts,
            **options,
        )
    job = submitted.job
    if submitted.send:
        # Committed: now the broker (its client blocks, so in a thread).
        await run_in_threadpool(send_now, RUN_TURN, [job.id])
    JOBS_SUBMITTED.inc()
    with log_context(job_id=job.id):
        log.info(
            "job accepted: tenant %s, conversation %s, turn %d",
            tenant_id,
            job.conversation_id,
            submitted.turn,
        )
    return submitted
