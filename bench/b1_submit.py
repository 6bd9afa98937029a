"""B1 Submit: POST /v1/jobs under load.

500 concurrent connections for 30 s, each request a new turn with a durable job row (no
worker runs: this measures accepting work). Baseline in the same run: GET /livez under the
same load, the most requests/s this API process can answer at all.
Target: 0 errors, p99 under 200 ms, at least 1,500 requests/s on 2 cores (generator included).

Run: python -m bench.b1_submit [--seconds 30] [--connections 500]
"""

from __future__ import annotations

import argparse
import json

from bench.loadgen import LoadResult, http_request, run_load
from bench.report import percentile, say
from bench.stack import BenchStack

TENANTS = 50


def _report(label: str, result: LoadResult, ok: int) -> None:
    errors = result.errors + sum(n for status, n in result.statuses.items() if status != ok)
    lat = result.latencies
    say(
        f"  {label}: {result.per_second:.0f} requests/s, p50 {percentile(lat, 0.5) * 1000:.1f} ms,"
        f" p95 {percentile(lat, 0.95) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms,"
        f" errors {errors} (statuses {dict(sorted(result.statuses.items()))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.b1_submit")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args()
    with BenchStack("b1", model="tiny", workers=False) as stack:
        keys = [stack.create_key(f"tenant-{i}") for i in range(TENANTS)]
        livez = http_request("GET", "/livez", {})
        bodies = [
            http_request(
                "POST",
                "/v1/jobs",
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                json.dumps({"message": "Hello, how are you today?"}).encode(),
            )
            for key in keys
        ]
        say(f"B1: {args.connections} connections, {args.seconds:.0f} s each run")
        baseline = run_load(
            "127.0.0.1", stack.port, lambda _: livez,
            connections=args.connections, seconds=min(args.seconds, 10),
        )  # fmt: skip
        _report("baseline GET /livez", baseline, 200)
        submit = run_load(
            "127.0.0.1", stack.port, lambda n: bodies[n % TENANTS],
            connections=args.connections, seconds=args.seconds,
        )  # fmt: skip
        _report("POST /v1/jobs", submit, 202)
    say(f"  ratio submit / livez: {submit.per_second / baseline.per_second:.0%}")
    say("  targets: 0 errors, p99 < 200 ms, >= 1500 requests/s")


if __name__ == "__main__":
    main()
