"""The Responses API with OpenAI's own Python client against a real `parley api` process and
real workers: background and foreground, multi-turn, streams and their resume, cancel, and
errors as the SDK's own exception types."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response

from tests.integration.helpers import Api

ENDED = ("completed", "incomplete", "failed", "cancelled")


@pytest.fixture
def key(api: Api) -> str:
    return api.create_key("acme")


@pytest.fixture
def client(live_api: str, key: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live_api}/v1", api_key=key, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def _poll(client: OpenAI, response_id: str, timeout: float = 60) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        response = client.responses.retrieve(response_id)
        if response.status in ENDED:
            return response
        assert time.monotonic() < deadline, f"{response_id} still {response.status}"
        time.sleep(0.1)


def _post_response(live_api: str, key: str, body: dict[str, Any]) -> httpx.Response:
    """POST /v1/responses as it is sent, for bodies the SDK would not send."""
    return httpx.post(
        f"{live_api}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def _text(response: Response) -> str:
    return "".join(part.text for item in response.output for part in item.content)  # type: ignore[union-attr]


def test_models_lists_the_served_model(client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [os.environ["MODEL_ID"]]
    assert models[0].object == "model" and models[0].owned_by == "parley"


def test_background_create_then_poll(client: OpenAI, model: str, api: Api, key: str) -> None:
    created = client.responses.create(
        model=model, input="Hello!", background=True, max_output_tokens=16, metadata={"k": "v"}
    )
    assert created.status == "queued" and created.background is True
    assert created.object == "response" and created.output == []
    ended = _poll(client, created.id)
    assert ended.status in ("completed", "incomplete"), ended
    job = api.wait(key, created.id)  # a response is a job
    assert ended.output_text == _text(ended) == job["reply"]["content"]
    assert (
        ended.usage is not None and ended.usage.output_tokens == job["usage"]["completion_tokens"]
    )
    assert ended.usage.total_tokens == ended.usage.input_tokens + ended.usage.output_tokens
    assert ended.metadata == {"k": "v"} and ended.max_output_tokens == 16


def test_a_foreground_call_answers_the_ended_response(client: OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input="Say something.", max_output_tokens=4)
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens <= 4


def test_previous_response_id_continues_the_conversation(
    client: OpenAI, model: str, api: Api, key: str
) -> None:
    first = client.responses.create(
        model=model, input="My name is Ada.", instructions="Be brief.", max_output_tokens=8
    )
    second = client.responses.create(
        model=model, input="What is my name?", previous_response_id=first.id, max_output_tokens=8
    )
    assert second.previous_response_id == first.id
    assert second.instructions == first.instructions == "Be brief."
    job = api.wait(key, second.id)
    assert job["context_messages"] == 2  # the first turn was in the second's prompt
    # Only the conversation's latest response can be continued.
    with pytest.raises(openai.ConflictError):
        client.responses.create(model=model, input="Again?", previous_response_id=first.id)


def test_an_input_transcript_starts_a_conversation(
    client: OpenAI, model: str, api: Api, key: str
) -> None:
    response = client.responses.create(
        model=model,
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour !"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "How are you?"}]},
        ],
        max_output_tokens=8,
    )
    assert response.instructions == "Answer in French."
    job = api.wait(key, response.id)
    assert job["context_messages"] == 2
    messages = api.request(
        "GET", f"/v1/conversations/{job['conversation_id']}/messages", key
    ).json()["data"]
    assert [(m["role"], m["content"]) for m in messages][:3] == [
        ("user", "Hi"),
        ("assistant", "Bonjour !"),
        ("user", "How are you?"),
    ]


def test_stream_gives_openais_event_sequence(client: OpenAI, model: str) -> None:
    with client.responses.create(
        model=model, input="Tell me a story.", stream=True, max_output_tokens=24
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    final: Response = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == events[-4].text  # type: ignore[union-attr]
    assert kinds.count("response.output_text.delta") > 1


def test_a_stream_resumes_after_a_sequence_number(client: OpenAI, model: str) -> None:
    created = client.responses.create(
        model=model, input="Go on.", background=True, max_output_tokens=24
    )
    with client.responses.retrieve(created.id, stream=True) as stream:
        whole = [(e.sequence_number, e.type) for e in stream]
    with client.responses.retrieve(created.id, stream=True, starting_after=3) as stream:
        resumed = [(e.sequence_number, e.type) for e in stream]
    assert resumed == whole[4:]


def test_cancel_a_queued_response(client: OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model, input="Talk at length.", background=True, max_output_tokens=256
    )
    # Behind the first turn of its conversation: queued while it is cancelled.
    second = client.responses.create(
        model=model, input="And then?", previous_response_id=first.id, background=True
    )
    cancelled = client.responses.cancel(second.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.responses.cancel(second.id)
    _poll(client, first.id)


def test_errors_are_the_sdks_own(client: OpenAI, model: str, live_api: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{live_api}/v1", api_key="pk_wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
    with pytest.raises(openai.NotFoundError) as missing_model:
        client.responses.create(model="gpt-unknown", input="Hi")
    assert missing_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tools:
        client.responses.create(
            model=model,
            input="Hi",
            tools=[{"type": "function", "name": "f", "parameters": {}, "strict": True}],
        )
    assert tools.value.param == "tools" and "tools" in tools.value.message


def test_another_tenants_response_is_not_found(
    client: OpenAI, model: str, api: Api, live_api: str
) -> None:
    created = client.responses.create(model=model, input="Mine.", background=True)
    other = OpenAI(base_url=f"{live_api}/v1", api_key=api.create_key("globex"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=model, input="Hi", previous_response_id=created.id)
    _poll(client, created.id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "Hi", "store": False}, "store"),
        ({"input": "Hi", "text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "assistant", "content": "Hello"}]}, "input"),
    ],
)
def test_what_parley_does_not_do_is_a_clear_400(
    live_api: str, key: str, model: str, body: dict[str, Any], param: str
) -> None:
    answer = _post_response(live_api, key, {"model": model, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "Hi", "temperature": 0.001}, "temperature"),
        ({"input": "   "}, "input"),
        ({"input": "Hi", "instructions": "x" * 32_001}, "instructions"),
        ({"input": "Hi", "max_output_tokens": 10**6}, "max_output_tokens"),
        (
            {
                "input": [
                    {"role": "user", "content": "Hi\u0000"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Go on."},
                ]
            },
            "input",
        ),
    ],
)
def test_an_invalid_value_is_a_422_naming_it(
    live_api: str, key: str, model: str, body: dict[str, Any], param: str
) -> None:
    answer = _post_response(live_api, key, {"model": model, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == param
