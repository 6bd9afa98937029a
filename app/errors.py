"""RFC 9457 problem details: every error the API returns, and their handlers."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("parley.errors")

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ProblemError(Exception):
    """Raised anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type_
        self.headers = headers or {}
        self.errors = errors
        # For the routes that answer in OpenAI's error shape (openai_error_response).
        self.param = param
        self.code = code


# The problem document in JSON Schema, for the OpenAPI document (app.main).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; validation errors (422) add `errors`.",
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
                "required": ["loc", "msg"],
            },
        },
    },
    "required": ["type", "title", "status", "detail"],
}


def problem_response(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


# The routes of the OpenAI-compatible API answer errors in OpenAI's shape, which its SDKs
# read: `{"error": {"message", "type", "param", "code"}}`, with the same status codes.
OPENAI_PATHS = ("/v1/responses", "/v1/models")
_OPENAI_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "insufficient_permissions",
    404: "not_found",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}
_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


def openai_error_response(
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    if param is None and errors:
        # The first invalid field, as OpenAI names it: `input`, `metadata.key`.
        loc = [str(part) for part in errors[0]["loc"] if part != "body"]
        param = ".".join(loc) or None
    if errors:
        detail = f"{detail} {errors[0]['msg']}" + (f" ({param})" if param else "")
    kind = "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")
    body = {
        "error": {
            "message": detail,
            "type": kind,
            "param": param,
            "code": code or _OPENAI_CODES.get(status, "error"),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(
    request: Request,
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """The error in the shape the route's clients read: OpenAI's on OPENAI_PATHS, else a
    problem document."""
    if request.url.path.startswith(OPENAI_PATHS):
        return openai_error_response(
            status, detail, headers=headers, errors=errors, param=param, code=code
        )
    return problem_response(status, detail, type_=type_, headers=headers, errors=errors)


def not_found(what: str) -> ProblemError:
    return ProblemError(404, f"{what} not found")


def _loc(loc: Any) -> list[str | int]:
    return [part if isinstance(part, int) else str(part) for part in loc]


def _safe_msg(msg: Any) -> str:
    # Validation messages may quote the input; keep them printable and short.
    return str(msg)[:300]


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return error_response(
        request,
        exc.status,
        exc.detail,
        type_=exc.type,
        headers=exc.headers,
        errors=exc.errors,
        param=exc.param,
        code=exc.code,
    )


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": _loc(e.get("loc", ())), "msg": _safe_msg(e.get("msg"))} for e in exc.errors()]
    return error_response(request, 422, "The request is not valid.", errors=errors)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI answers a JSON body that is not UTF-8 with a bare 400; it is an invalid body,
        # like one that is not JSON (a 422 naming the body).
        return error_response(
            request,
            422,
            "The request is not valid.",
            errors=[{"loc": ["body"], "msg": "JSON text must be valid UTF-8"}],
        )
    return error_response(
        request, exc.status_code, str(exc.detail), headers=dict(exc.headers or {})
    )


# PostgreSQL's query_canceled: a statement stopped by the statement timeout (app.db).
QUERY_CANCELED = "57014"


def statement_timed_out(exc: BaseException) -> bool:
    # SQLAlchemy's errors wrap the driver's (`orig`); the async pool's are psycopg's own.
    driver_error = getattr(exc, "orig", exc)
    return getattr(driver_error, "sqlstate", None) == QUERY_CANCELED


async def _database(request: Request, exc: Exception) -> JSONResponse:
    if statement_timed_out(exc):
        # The statement's text says which query was slow; its bound values (search text,
        # message content) are never logged.
        statement = str(getattr(exc, "statement", "") or "")[:2000]
        log.error(
            "a statement ran past the statement timeout on %s %s: %s",
            request.method,
            request.url.path,
            " ".join(statement.split()),
        )
        return error_response(
            request,
            503,
            "The request ran past the database's time limit and was stopped; try again "
            "shortly, or narrow it (a more specific search, a shorter period).",
            headers={"Retry-After": "5"},
        )
    # A database that cannot be reached is an outage, not a client error, and not a 500.
    log.error(
        "a backing service is unavailable on %s %s: %s", request.method, request.url.path, exc
    )
    return error_response(
        request,
        503,
        "A backing service is unavailable; try again shortly.",
        headers={"Retry-After": "5"},
    )


async def _data(request: Request, exc: Exception) -> JSONResponse:
    # A value PostgreSQL refuses (a NUL in a query parameter, say) is the client's input.
    return error_response(
        request, 422, "The request holds a value that cannot be stored or searched."
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "An unexpected error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DataError, _data)
    app.add_exception_handler(OperationalError, _database)
    app.add_exception_handler(InterfaceError, _database)
    # No connection free in the pool within its timeout: the database is overloaded or away.
    app.add_exception_handler(PoolTimeoutError, _database)
    # The same, from the async pool's plain psycopg (app.db.make_async_pool); PoolTimeout is
    # an OperationalError.
    app.add_exception_handler(psycopg.DataError, _data)
    app.add_exception_handler(psycopg.OperationalError, _database)
    app.add_exception_handler(psycopg.InterfaceError, _database)
    app.add_exception_handler(RedisConnectionError, _database)
    app.add_exception_handler(RedisTimeoutError, _database)
    app.add_exception_handler(Exception, _unexpected)
