"""A thin client over the API for tests: keys, submissions and waiting."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import httpx
from fastapi.testclient import TestClient

from app.auth.service import ensure_bootstrap_admin
from app.db import session_scope


class Api:
    def __init__(self, client: TestClient, *, admin_key: str) -> None:
        self.client = client
        self.admin_key = admin_key
        # Tables are emptied between tests; the operator's key is made again.
        with session_scope() as session:
            ensure_bootstrap_admin(session, secret=admin_key)

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def request(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None:
            headers.update(self.auth(key))
        return self.client.request(method, path, headers=headers, **kwargs)

    def create_key(self, tenant: str, scope: str = "client") -> str:
        answer = self.request(
            "POST", "/v1/admin/keys", self.admin_key, json={"tenant": tenant, "scope": scope}
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["key"])

    def submit(self, key: str, **body: Any) -> dict[str, Any]:
        answer = self.request("POST", "/v1/jobs", key, json=body)
        assert answer.status_code == 202, answer.text
        return dict(answer.json())

    def wait(self, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            answer = self.request("GET", f"/v1/jobs/{job_id}", key, headers={"Prefer": "wait=10"})
            assert answer.status_code == 200, answer.text
            job = dict(answer.json())
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"

    def metrics(self) -> str:
        return self.request("GET", "/metrics", None).text

    def settled_metrics(self, counts: Iterable[str], timeout: float = 20) -> str:
        """/metrics once the workers have published everything they did before: no turn
        running and the `counts` (sample prefixes, see worker_total) unchanged across two
        heartbeats, since turns of earlier tests may still be ending."""
        counts = list(counts)
        deadline = time.monotonic() + timeout
        last = self.metrics()
        while time.monotonic() < deadline:
            time.sleep(2.5)  # more than two heartbeats (one second in the tests)
            now = self.metrics()
            idle = worker_total(now, "parley_worker_running_turns{") == 0
            if idle and all(worker_total(now, c) == worker_total(last, c) for c in counts):
                return now
            last = now
        raise AssertionError("the workers' metrics did not settle")


def worker_total(text: str, prefix: str, *, worker: str | None = None) -> float:
    """The sum of the /metrics samples on lines that start with `prefix` and carry a worker
    label (`worker`'s only, if given)."""
    label = 'worker="' if worker is None else f'worker="{worker}@'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and label in line
    )
