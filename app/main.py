"""create_app(): routers, middleware, error handlers and the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.admin.keys_router import router as keys_router
from app.admin.router import router as admin_router
from app.auth.service import ensure_bootstrap_admin
from app.config import get_settings
from app.conversations.router import router as conversations_router
from app.db import make_async_pool, session_scope, set_statement_timeout
from app.deps import ASYNC_POOL_SIZE, ASYNC_REDIS_CONNECTIONS, OPS_SLOTS, SESSION_SLOTS
from app.errors import (
    OPENAI_ERROR_SCHEMA,
    OPENAI_PATHS,
    PROBLEM_JSON,
    PROBLEM_SCHEMA,
    install_error_handlers,
)
from app.health import router as health_router
from app.jobs.intake import Intake
from app.jobs.router import router as jobs_router
from app.jobs.submission import UnsentCounts
from app.jobs.waiter import JobWaiter
from app.logs import configure_logging
from app.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.redis import warn_about_the_broker
from app.responses.router import router as responses_router
from app.webhooks.router import router as webhooks_router


def _bootstrap() -> None:
    settings = get_settings()
    if settings.parley_admin_key:
        with session_scope() as session:
            ensure_bootstrap_admin(session, secret=settings.parley_admin_key)
    warn_about_the_broker(settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    configure_logging()
    # This process serves requests: its statements are bounded (a worker's are not).
    set_statement_timeout(get_settings().api_statement_timeout_seconds)
    await run_in_threadpool(_bootstrap)
    settings = get_settings()
    pool = make_async_pool(settings.database_url, size=ASYNC_POOL_SIZE)
    # Opened in the background: the API starts (and answers 503) while the database is away.
    await pool.open(wait=False)
    app.state.async_pool = pool
    app.state.async_slots = asyncio.Semaphore(ASYNC_POOL_SIZE)
    intake = Intake(pool, app.state.async_slots, UnsentCounts())
    app.state.intake = intake
    intake.start()
    app.state.session_slots = asyncio.Semaphore(SESSION_SLOTS)
    app.state.ops_slots = asyncio.Semaphore(OPS_SLOTS)
    waiter = JobWaiter(settings.redis_url)
    app.state.job_waiter = waiter
    await waiter.start()
    # For the readers of job event streams (app.jobs.event_stream), on the event loop. A
    # burst of readers (a thousand streams opened at once) waits its turn for a connection,
    # up to 5 s, rather than failing past the pool's size mid-stream.
    app.state.async_redis = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=ASYNC_REDIS_CONNECTIONS,
            timeout=5,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
    )
    try:
        yield
    finally:
        await intake.stop()
        await waiter.stop()
        await app.state.async_redis.aclose()
        await pool.close()


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


_CLIENT_ERRORS = _problem(
    "Problem details (api.md): 401 without a valid key, 403 without the scope, 404 an unknown "
    "or another tenant's object (a malformed id included), 409 a conflict, 413 a body over "
    "the limit, 422 an invalid request (with `errors`), 429 too many requests (`Retry-After`)."
)
_UNAVAILABLE = _problem("The database or Redis is unavailable (`Retry-After`).")
_OPENAI_ERRORS = {
    "description": "OpenAI's error shape, with the status codes of the rest of the API.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
}


def document_errors(document: dict[str, Any]) -> None:
    """Errors as the API answers them, in the OpenAPI document: problem+json, not FastAPI's
    default 422 body (`{"detail": [...]}` as application/json), and bearer keys on /v1."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["OpenAIError"] = OPENAI_ERROR_SCHEMA
    components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith(OPENAI_PATHS):
                operation["security"] = [{"apiKey": []}]
                responses["4XX"] = responses["503"] = _OPENAI_ERRORS
            elif path.startswith("/v1/"):
                operation["security"] = [{"apiKey": []}]
                responses["4XX"] = _CLIENT_ERRORS
                responses["503"] = _UNAVAILABLE
    if "/readyz" in document.get("paths", {}):
        document["paths"]["/readyz"]["get"]["responses"]["503"] = _problem(
            "Not ready: names what is missing (database, redis, worker)."
        )


class ParleyAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document_errors(super().openapi())
        assert self.openapi_schema is not None
        return self.openapi_schema


def create_app() -> FastAPI:
    settings = get_settings()
    app = ParleyAPI(
        title="Parley",
        version="0.1.0",
        summary="A queue-backed asynchronous job API for multi-turn chat.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for router in (
        jobs_router,
        conversations_router,
        webhooks_router,
        keys_router,
        admin_router,
        health_router,
        responses_router,
    ):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
