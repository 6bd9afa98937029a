"""F10 (reliability.md): the OpenAPI document fuzzed with schemathesis, and hand-made bad input.

Every operation of /openapi.json gets generated requests, valid and invalid (schemathesis's
examples, coverage and fuzzing phases), sent to the real app (the session's TestClient over
real PostgreSQL and Redis) with a real tenant's key, or the operator's on /v1/admin. No answer
is a 5xx, every error is problem+json with the fields api.md names, and answers conform to the
document. Derandomized, with a fixed number of examples per operation: CI sends the same
requests every run.

The hand-made inputs are those test_api_contract.py does not already send.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, CheckFunction, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select

from app.db import session_scope
from app.errors import OPENAI_PATHS
from app.main import create_app
from app.models import ApiKey, Job, Message
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration

PROBLEM_JSON = "application/problem+json"
JSON = {"Content-Type": "application/json"}

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 10,
        "generation": {
            "mode": "all",  # valid and invalid requests
            "max-examples": 100,  # per operation, in the fuzzing phase
            "deterministic": True,  # Hypothesis's derandomize
            "database": "none",
            # The key is the test's, below; generated Authorization headers would only be 401s.
            "with-security-parameters": False,
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=CONFIG)


def problem_details(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """api.md: every error is an RFC 9457 problem document, validation errors with `errors`;
    on the OpenAI-compatible routes, OpenAI's error object."""
    if response.status_code < 400:
        return None
    if case.path.startswith(OPENAI_PATHS):
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"] and error["type"], error
        return True
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == PROBLEM_JSON, f"a {response.status_code} answered as {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict), body
    missing = {"type", "title", "status", "detail"} - body.keys()
    assert not missing, f"a problem without {sorted(missing)}: {body}"
    assert body["status"] == response.status_code, body
    for error in body.get("errors", []):
        assert {"loc", "msg"} <= error.keys(), body
    return True


CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    problem_details,
]


def send(api: Api, case: Case[Any], key: str) -> httpx.Response:
    """The generated request, through the session's TestClient (its lifespan is running)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    request: dict[str, Any] = {"headers": kwargs["headers"], "params": kwargs.get("params") or None}
    if "json" in kwargs:
        request["json"] = kwargs["json"]
        if case.path == "/v1/responses" and isinstance(kwargs["json"], dict):
            # No worker runs here: a response held to its end, or streamed, would wait for
            # ever. Those are tested with workers (test_responses_api.py).
            request["json"] = {**kwargs["json"], "background": True, "stream": False}
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data.encode() if isinstance(data, str) else data
    return api.request(kwargs["method"], kwargs["url"], key, **request)


@dataclass
class Tenant:
    """The tenant the generated requests act for, with a real job, conversation and key, whose
    ids replace the generated ones in every other request (else all of them would be 404s)."""

    key: str
    ids: dict[str, str]
    sent: int = 0

    def real_ids(self, case: Case[Any]) -> None:
        path = case.meta.components.get(ParameterLocation.PATH) if case.meta else None
        if not case.path_parameters or (path and path.mode is GenerationMode.NEGATIVE):
            return
        self.sent += 1
        if self.sent % 2 == 0:
            case.path_parameters = {
                name: self.ids.get(name, value) for name, value in case.path_parameters.items()
            }


@pytest.fixture
def tenant(api_no_workers: Api) -> Tenant:
    api = api_no_workers
    key = api.create_key("fuzz")
    job = api.submit(key, message="hello", webhook_url="http://127.0.0.1:9/hook")
    # Ended, so that its event streams end too: no worker runs here.
    assert api.request("POST", f"/v1/jobs/{job['id']}/cancel", key).status_code == 200
    keys = api.request("GET", "/v1/admin/keys", api.admin_key).json()["data"]
    key_id = next(k["id"] for k in keys if k["tenant"] == "fuzz")
    ids = {
        "job_id": job["id"],
        "response_id": job["id"],
        "conversation_id": job["conversation_id"],
        "key_id": key_id,
    }
    return Tenant(key=key, ids=ids)


@schema.parametrize()
# The fixtures are the API handle and its tenant: examples share them, as the requests of one
# client sent one after another would.
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_openapi_document_fuzzed(case: Case[Any], api_no_workers: Api, tenant: Tenant) -> None:
    api = api_no_workers
    tenant.real_ids(case)
    key = api.admin_key if case.path.startswith("/v1/admin") else tenant.key
    response = send(api, case, key)
    # /readyz is 503 by contract here: no worker runs in this test (still a problem document).
    excluded: list[CheckFunction] = [not_a_server_error] if case.path == "/readyz" else []
    case.validate_response(response, checks=CHECKS, excluded_checks=excluded)


# Hand-made bad input (the rest of F10 is in test_api_contract.py).


def _counts() -> tuple[int, int, int]:
    with session_scope() as session:
        return (
            session.execute(select(func.count()).select_from(Job)).scalar_one(),
            session.execute(select(func.count()).select_from(Message)).scalar_one(),
            session.execute(select(func.count()).select_from(ApiKey)).scalar_one(),
        )


def _problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    body = dict(answer.json())
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


def test_bodies_that_are_not_utf8_are_422(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    for path, auth, raw in [
        ("/v1/jobs", key, b'{"message": "caf\xe9"}'),  # Latin-1, not UTF-8
        ("/v1/jobs", key, b"\xb1\x98\x18#\xc6"),
        ("/v1/admin/keys", api.admin_key, b'{"tenant": "\xff"}'),
    ]:
        problem = _problem(api.request("POST", path, auth, content=raw, headers=JSON), 422)
        assert problem["errors"] == [{"loc": ["body"], "msg": "JSON text must be valid UTF-8"}]
    # A UTF-8-encoded surrogate: Python's parser lets it through, as a lone surrogate.
    raw = b'{"message": "\xed\xa0\x80"}'
    problem = _problem(api.request("POST", "/v1/jobs", key, content=raw, headers=JSON), 422)
    assert problem["errors"][0]["loc"] == ["body", "message"], problem
    assert _counts() == before


def test_a_10_mb_body_is_413_and_stores_nothing(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    body = b'{"message": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    _problem(api.request("POST", "/v1/jobs", key, content=body, headers=JSON), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it is read
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    _problem(api.request("POST", "/v1/jobs", key, content=chunks(), headers=JSON), 413)
    _problem(api.request("POST", "/v1/admin/keys", api.admin_key, content=body, headers=JSON), 413)
    assert _counts() == before


def test_nul_and_surrogates_in_the_other_fields(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    for raw, status in [
        # A NUL or lone surrogate in an id is only an unknown id (api.md), not a 422 or a 500.
        (json.dumps({"message": "x", "conversation_id": "conv_\x00"}), 404),
        ('{"message": "x", "conversation_id": "conv_\\ud800"}', 404),
        (json.dumps({"message": "x", "webhook_url": "https://a\x00.example.com/"}), 422),
        ('{"message": "x", "webhook_url": "https://\\udfff.example.com/"}', 422),
        (json.dumps({"message": "x", "metadata": {"k\x00": "v"}}), 422),
    ]:
        _problem(api.request("POST", "/v1/jobs", key, content=raw, headers=JSON), status)
    for raw in [
        json.dumps({"tenant": "acme", "name": "a\x00"}),
        '{"tenant": "acme", "name": "\\udfff"}',
        json.dumps({"tenant": "ac\x00me"}),
    ]:
        answer = api.request("POST", "/v1/admin/keys", api.admin_key, content=raw, headers=JSON)
        _problem(answer, 422)
    for path in ["/v1/admin/keys/%00", "/v1/admin/conversations/%00", "/v1/jobs/%ED%A0%80"]:
        method = "DELETE" if "keys" in path else "GET"
        _problem(api.request(method, path, api.admin_key), 404)
    _problem(api.request("GET", "/v1/admin/export", api.admin_key, params={"q": "a\x00"}), 422)
    assert _counts() == before


def test_deep_json_within_the_parsers_limit(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    deep = b"[" * 900 + b"]" * 900
    for raw in [
        b'{"message": "hi", "metadata": {"k": ' + deep + b"}}",
        b'{"message": "hi", "generation": ' + deep + b"}",
        b'{"message": ' + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}",
    ]:
        _problem(api.request("POST", "/v1/jobs", key, content=raw, headers=JSON), 422)
    assert _counts() == before


def test_huge_numbers(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    for raw, status in [
        # 1e400 reads as infinity.
        (b'{"message": "hi", "generation": {"max_new_tokens": 1e400}}', 422),
        (b'{"message": "hi", "generation": {"temperature": -1e400}}', 422),
        (b'{"message": "hi", "generation": {"seed": 1e300}}', 422),
        (b'{"message": "hi", "generation": {"max_new_tokens": -' + b"9" * 400 + b"}}", 422),
        # Past the parser's integer-digit limit: it cannot be read.
        (b'{"message": "hi", "generation": {"seed": ' + b"9" * 5000 + b"}}", 400),
    ]:
        _problem(api.request("POST", "/v1/jobs", key, content=raw, headers=JSON), status)
    assert _counts() == before
    huge = "9" * 40
    for path, params in [
        ("/v1/conversations", {"limit": huge}),
        ("/v1/admin/keys", {"limit": "-" + huge}),
        ("/v1/admin/conversations", {"since": "9" * 20 + "-01-01T00:00:00Z"}),
    ]:
        _problem(api.request("GET", path, api.admin_key, params=params), 422)
    job = api.submit(key, message="hi")
    # A wait beyond the maximum is not honoured: the current state at once.
    answer = api.request("GET", f"/v1/jobs/{job['id']}", key, headers={"Prefer": "wait=" + huge})
    assert answer.status_code == 200 and "preference-applied" not in answer.headers


def test_unknown_fields_anywhere_are_422(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    before = _counts()
    for body in [
        {"message": "hi", "generation": {"max_new_tokens": 4, "top_k": 5}},
        {"message": "hi", "Message": "hi"},
    ]:
        problem = _problem(api.request("POST", "/v1/jobs", key, json=body), 422)
        assert problem["errors"], problem
    answer = api.request("POST", "/v1/admin/keys", api.admin_key, json={"tenant": "a", "role": 1})
    _problem(answer, 422)
    assert _counts() == before


def test_times_are_rfc3339(api_no_workers: Api) -> None:
    api = api_no_workers
    for path in ("/v1/admin/conversations", "/v1/admin/export"):
        for value in ("2024", "0.5", "1700000000"):
            for name in ("since", "until"):
                answer = api.request("GET", path, api.admin_key, params={name: value})
                _problem(answer, 422)


def test_a_webhook_host_that_is_not_valid_idna_is_422(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    for url in ("http://xn--/", "https://xn--a.example.com/"):
        body = {"message": "hi", "webhook_url": url}
        _problem(api.request("POST", "/v1/jobs", key, json=body), 422)
    assert _counts()[0] == 0
