"""Many submissions at once through a real `parley api` process: every one is answered 202.

Guards against a hold-and-wait between the connection pool and the threadpool: a request
holding a connection while waiting for a thread, with every thread waiting for a connection,
stalls the API until the pool's timeout and then answers 500s."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.helpers import Api

pytestmark = pytest.mark.integration

CONCURRENT = 150


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    port = _free_port()
    env = dict(os.environ, LOG_LEVEL="WARNING")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base_url + "/livez").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.2)
        statuses = asyncio.run(_submit_all(base_url, key))
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert statuses == [202] * CONCURRENT, sorted(set(statuses))
