"""Time to first token through the API: from a turn's start to its first delta reaching a
reader of `GET /v1/jobs/{id}/events`, against the engine's own time to first token.

One turn at a time (a quiet service), each a new conversation with the tiny model: submit,
read the job's event stream, note when the first `delta` arrives. A turn starts when a worker
claims it (the job's `started_at`, this machine's clock). In the same run: the worker's engine
(its `parley_worker_time_to_first_token_seconds`, from the turn reaching the engine to its
first token) and, once the service is stopped, the engine alone on the same prompts, its
first streamed text included. Target: the reader's time within 30 ms of the engine's.

Run: python -m bench.time_to_first_token
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime

import httpx
from httpx_sse import connect_sse

from bench.report import percentile, say
from bench.stack import BenchStack
from worker.inference.engine import Engine, GenerationParams
from worker.inference.loader import load_model
from worker.inference.prompt import build_prompt

TURNS, NEW_TOKENS = 40, 16
MESSAGES = [f"Tell me something about lighthouses, number {n}." for n in range(TURNS)]
METRIC = "parley_worker_time_to_first_token_seconds"


def _first_delta_after_start(client: httpx.Client, key: str, message: str) -> float:
    """Seconds from the turn's start to its first delta reaching this reader."""
    answer = client.post(
        "/v1/jobs",
        json={"message": message, "generation": {"max_new_tokens": NEW_TOKENS}},
        headers={"Authorization": f"Bearer {key}"},
    )
    answer.raise_for_status()
    job_id = answer.json()["id"]
    first_at, job = None, {}
    with connect_sse(
        client, "GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"}
    ) as source:
        for event in source.iter_sse():
            if event.event == "delta" and first_at is None:
                first_at = time.time()
            if event.event == "done":
                job = json.loads(event.data)
    assert first_at is not None and job["status"] == "succeeded", job
    return first_at - datetime.fromisoformat(job["started_at"]).timestamp()


def _engine_alone(model: str) -> tuple[list[float], list[float]]:
    """The engine alone on the same prompts, one at a time: its time to first token, and to
    its first streamed text."""
    loaded = load_model(model)
    engine = Engine.in_process(loaded)
    tokens, texts = [], []
    try:
        for message in ["Warm-up.", *MESSAGES]:
            prompt = build_prompt(
                loaded.tokenizer,
                system_prompt=None,
                history=[],
                message=message,
                max_context_tokens=loaded.max_context_tokens,
                max_new_tokens=NEW_TOKENS,
            )
            shown: list[float] = []

            def note(_: str, shown: list[float] = shown) -> None:
                shown.append(time.monotonic())

            started = time.monotonic()
            result = engine.generate(
                prompt, GenerationParams(max_new_tokens=NEW_TOKENS), on_text=note
            )
            if message != "Warm-up." and result.time_to_first_token_s is not None and shown:
                tokens.append(result.time_to_first_token_s)
                texts.append(shown[0] - started)
    finally:
        engine.close()
    return tokens, texts


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f} ms"


def main() -> None:
    # Workers publish their metrics with each heartbeat: every second here.
    with BenchStack("ttft", model="tiny", WORKER_HEARTBEAT_SECONDS="1") as stack:
        key = stack.create_key("bench")
        say(f"Time to first token: {TURNS} turns one at a time, {NEW_TOKENS} tokens, tiny model")
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            _first_delta_after_start(client, key, "Warm-up.")
            sum_before, count_before = (
                stack.worker_metric(METRIC + "_sum"),
                stack.worker_metric(METRIC + "_count"),
            )
            service = [_first_delta_after_start(client, key, m) for m in MESSAGES]
            time.sleep(3)  # two heartbeats: the worker's metrics include every turn
            count = stack.worker_metric(METRIC + "_count") - count_before
            in_service = (stack.worker_metric(METRIC + "_sum") - sum_before) / max(count, 1)
        model = str(stack.model)
    # The baseline on a quiet machine: the service is stopped.
    alone_tokens, alone_texts = _engine_alone(model)
    say(
        f"  through the API (turn start -> first delta at a reader): p50 {_ms(service, 0.5)},"
        f" p95 {_ms(service, 0.95)}, mean {statistics.mean(service) * 1000:.1f} ms"
    )
    say(f"  the worker's engine, same turns (mean over {count:.0f}): {in_service * 1000:.1f} ms")
    say(
        f"  engine alone, same prompts: first token p50 {_ms(alone_tokens, 0.5)},"
        f" first streamed text p50 {_ms(alone_texts, 0.5)}"
    )
    gap = percentile(service, 0.5) - percentile(alone_tokens, 0.5)
    say(f"  reader p50 above the engine alone's: {gap * 1000:.1f} ms (target <= 30 ms)")
    above_worker = percentile(service, 0.5) - in_service
    say(f"  reader p50 above the worker's engine: {above_worker * 1000:.1f} ms")


if __name__ == "__main__":
    main()
