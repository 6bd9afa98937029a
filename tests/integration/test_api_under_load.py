"""Many submissions at once through a real `parley api` process: every one is answered 202.

Guards against a hold-and-wait between the connection pool and the threadpool: a request
holding a connection while waiting for a thread, with every thread waiting for a connection,
stalls the API until the pool's timeout and then answers 500s."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.dev.stack import Stack
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration

CONCURRENT = 150


async def _submit_all(base_url: str, key: str) -> list[int]:
    limits = httpx.Limits(max_connections=CONCURRENT)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/jobs",
                    json={"message": f"load {i}"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                for i in range(CONCURRENT)
            )
        )
    return [a.status_code for a in answers]


def test_a_burst_of_submissions_is_all_accepted(api_no_workers: Api) -> None:
    key = api_no_workers.create_key("burst")
    with Stack({"LOG_LEVEL": "WARNING"}) as stack:
        stack.api()
        assert stack.wait_ready("/livez", timeout=30), "the API did not start"
        assert stack.base_url is not None
        statuses = asyncio.run(_submit_all(stack.base_url, key))
    assert statuses == [202] * CONCURRENT, sorted(set(statuses))
