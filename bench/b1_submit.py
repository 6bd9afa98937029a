"""B1 Submit: POST /v1/jobs under load.

500 concurrent connections, each request a new turn with a durable job row (no worker runs:
this measures accepting work). In the same run, under the same load:
- the baseline GET /livez, the most requests/s the API's processes answer at all;
- the peer: the FastAPI + Celery service every tutorial writes (bench/tutorial_peer.py,
  `POST /chat` -> `task.delay()`, no durable row), as many processes as Parley's API.
After the run every 202 is checked against the jobs table: each answered job is stored.
Targets: submit >= 50% of livez requests/s, p99 < 200 ms, 0 errors, ahead of the peer.

The three runs alternate, in rounds (3 by default, of 10 s each run): each round's ratios
are its own, and their medians are printed.

Run: python -m bench.b1_submit [--rounds 3] [--seconds 10] [--connections 500]
  [--api-processes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from app.config import normalize_database_url
from app.dev.stack import Stack, free_port, wait_http
from bench.cpu_budget import CpuBudget
from bench.loadgen import LoadResult, http_request, run_load
from bench.report import percentile, say
from bench.stack import DEFAULT_REDIS, BenchStack

TENANTS = 50
MESSAGE = "Hello, how are you today?"
# The peer's broker: a Redis database of its own, flushed before and after.
PEER_REDIS_DB = 14


def _errors(result: LoadResult, ok: int) -> int:
    return result.errors + sum(n for status, n in result.statuses.items() if status != ok)


def _report(label: str, result: LoadResult, ok: int) -> None:
    lat = result.latencies
    say(
        f"  {label}: {result.per_second:.0f} requests/s, p50 {percentile(lat, 0.5) * 1000:.1f} ms,"
        f" p95 {percentile(lat, 0.95) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms,"
        f" errors {_errors(result, ok)} (statuses {dict(sorted(result.statuses.items()))})"
    )


def _mean_group(port: int) -> float:
    """The mean size of the API's submit groups, from its /metrics (one process's)."""
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(metrics):
        if family.name == "parley_submit_group_size":
            values = {sample.name: sample.value for sample in family.samples}
    count = values.get("parley_submit_group_size_count", 0.0)
    return values.get("parley_submit_group_size_sum", 0.0) / count if count else 0.0


def _peer_broker() -> str:
    base = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS).rsplit("/", 1)[0]
    return f"{base}/{PEER_REDIS_DB}"


@contextmanager
def tutorial_peer(processes: int) -> Iterator[tuple[int, int]]:
    """bench/tutorial_peer.py under uvicorn (uvloop and httptools, as `parley api`); its port
    and pid."""
    broker = _peer_broker()
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    stack = Stack({"PEER_BROKER_URL": broker})
    argv = ["uvicorn", "bench.tutorial_peer:app", "--port", str(port), "--workers"]
    argv += [str(processes), "--log-level", "warning", "--no-access-log"]
    process = stack.start(argv)
    try:
        if not wait_http(f"http://127.0.0.1:{port}/openapi.json", timeout=60, procs=stack.procs):
            raise RuntimeError("the tutorial peer did not start")
        yield port, process.pid
    finally:
        stack.stop()
        redis.Redis.from_url(broker).flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.b1_submit")
    parser.add_argument("--seconds", type=float, default=10, help="each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--api-processes", type=int, default=1)
    args = parser.parse_args()
    load = {"connections": args.connections, "seconds": args.seconds}
    say(
        f"B1: {args.connections} connections, {args.rounds} rounds of three {args.seconds:.0f} s"
        f" runs (peer, livez, submit), {args.api_processes} API process(es),"
        f" {os.cpu_count()} cores"
    )

    body = json.dumps({"message": MESSAGE}).encode()
    chat = http_request("POST", "/chat", {"Content-Type": "application/json"}, body)
    settings = {"API_PROCESSES": str(args.api_processes)}
    with (
        tutorial_peer(args.api_processes) as (peer_port, peer_pid),
        BenchStack("b1", model="tiny", workers=False, **settings) as stack,
    ):
        keys = [stack.create_key(f"tenant-{i}") for i in range(TENANTS)]
        livez = http_request("GET", "/livez", {})
        bodies = [
            http_request(
                "POST",
                "/v1/jobs",
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                json.dumps({"message": MESSAGE}).encode(),
            )
            for key in keys
        ]
        # The three runs alternate, round after round, and each round's ratios are its own:
        # a shared machine drifts by a third within minutes, which a ratio of runs minutes
        # apart would take for a difference.
        rounds: list[tuple[LoadResult, LoadResult, LoadResult]] = []
        for number in range(1, args.rounds + 1):
            last = number == args.rounds
            say(f"  round {number}" + (" (with each part's CPU)" if last else ""))
            with CpuBudget.of_stack(api=peer_pid) as peer_cpu:
                peer = run_load("127.0.0.1", peer_port, lambda _: chat, **load)
            _report("peer POST /chat (FastAPI + Celery, no durable row)", peer, 202)
            with CpuBudget.of_stack(api=stack.api_pid) as livez_cpu:
                baseline = run_load("127.0.0.1", stack.port, lambda _: livez, **load)
            _report("baseline GET /livez", baseline, 200)
            with CpuBudget.of_stack(api=stack.api_pid) as submit_cpu:
                submit = run_load("127.0.0.1", stack.port, lambda n: bodies[n % TENANTS], **load)
            _report("POST /v1/jobs", submit, 202)
            say(
                f"    submit / livez {submit.per_second / baseline.per_second:.0%},"
                f" submit / peer {submit.per_second / peer.per_second:.2f}x"
            )
            if last:
                say("  the peer's CPU:")
                peer_cpu.report(peer.requests, "request")
                say("  GET /livez's CPU:")
                livez_cpu.report(baseline.requests, "request")
                say("  POST /v1/jobs's CPU:")
                submit_cpu.report(submit.requests, "submit")
            rounds.append((peer, baseline, submit))
        say(f"  turns stored per transaction (group commit): {_mean_group(stack.port):.1f}")
        assert stack.database_url is not None
        engine = create_engine(normalize_database_url(stack.database_url))
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
        engine.dispose()
    accepted = sum(submit.statuses.get(202, 0) for _, _, submit in rounds)
    errors = sum(_errors(submit, 202) for _, _, submit in rounds)
    latencies = [latency for _, _, submit in rounds for latency in submit.latencies]
    of_livez = statistics.median(s.per_second / b.per_second for _, b, s in rounds)
    of_peer = statistics.median(s.per_second / p.per_second for p, _, s in rounds)
    say(f"  202s answered {accepted}, job rows stored {stored}")
    say(f"  ratio submit / livez, median of the rounds: {of_livez:.0%}")
    say(f"  ratio submit / peer, median of the rounds:  {of_peer:.2f}x")
    p99 = percentile(latencies, 0.99) * 1000
    say(
        f"  targets: submit >= 50% of livez, p99 < 200 ms ({p99:.0f}), 0 errors"
        f" ({errors}), ahead of the peer, every 202 stored"
    )
    if stored < accepted:
        say("  FAILED: a 202 without its stored job")
        sys.exit(1)


if __name__ == "__main__":
    main()
