"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.db import get_engine
from app.errors import problem_response
from app.metrics import render
from app.redis import broker_eviction_risk, get_redis, workers_alive

router = APIRouter(tags=["operations"])


@router.get("/livez")
def livez() -> dict[str, str]:
    return {"status": "ok"}


def _missing() -> list[str]:
    missing = []
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        missing.append("database")
    try:
        client = get_redis()
        client.ping()
        if workers_alive(client) == 0:
            missing.append("worker")
    except Exception:
        missing.append("redis")
    return missing


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response | dict[str, object]:
    """Ready when the database and Redis answer and a worker reported in the last 30 s. A
    ready service still names what puts accepted work at risk (`warnings`): a broker whose
    Redis may evict queued turns."""
    # Under an operations slot (app.deps.OPS_SLOTS): a probe does not queue behind submits.
    async with request.app.state.ops_slots:
        missing = await run_in_threadpool(_missing)
    if missing:
        return problem_response(503, "Not ready: " + ", ".join(missing) + " unavailable.")
    risk = await run_in_threadpool(broker_eviction_risk)
    return {"status": "ready"} if risk is None else {"status": "ready", "warnings": [risk]}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text: the API's metrics, job counts, and every live worker's metrics."""
    async with request.app.state.ops_slots:
        text = await run_in_threadpool(render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
