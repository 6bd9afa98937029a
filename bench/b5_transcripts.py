"""B5 Transcript queries (docs/benchmarks.md): search latency and export throughput.

    .venv/bin/python -m bench.b5_transcripts [--conversations 100000] [--reuse]

1,000,000 messages across 100,000 conversations and 50 tenants, in a database of its own
(`bench_b5`, dropped and made again) on the server of BENCH_DATABASE_URL (default: the local
one at 127.0.0.1:5432). The API runs as `parley api` runs it, in its own process.

Reports:
- p95 latency of GET /v1/admin/conversations?q=<two words>&tenant=..., over HTTP, and the
  same query's time in SQL with and without the search indexes (the baseline: the indexes
  dropped inside a transaction that is rolled back);
- export throughput (messages/s) over HTTP, against reading the same rows from the database
  with no JSON at all, and the API process's peak memory during a full and a 1/50 export.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import httpx
import psycopg
from sqlalchemy import create_engine, text

from app.config import normalize_database_url
from app.dev.postgres import libpq_url
from app.dev.query_plans import explain_service_query
from app.migrate import upgrade_database
from bench.b5_data import CHINESE_WORDS, Shape, TextMaker, load, tenant_name
from bench.b5_measure import MemorySampler, search_once
from bench.report import percentile, say
from bench.stack import BenchStack, bench_database

DATABASE = "bench_b5"
SEARCH_INDEXES = ("ix_messages_content_fts", "ix_messages_content_trgm")


def build(url: str, shape: Shape) -> None:
    started = time.monotonic()
    upgrade_database(url, revision="0001")
    messages = load(url, shape)
    loaded = time.monotonic()
    say(f"loaded {messages:,} messages, {shape.conversations:,} conversations, "
         f"{shape.tenants} tenants in {loaded - started:.0f}s")  # fmt: skip
    # Index builds are what the migration does on a live database; give them memory.
    os.environ["PGOPTIONS"] = "-c maintenance_work_mem=512MB"
    upgrade_database(url, revision="heads")
    os.environ.pop("PGOPTIONS")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        sizes = conn.execute(
            "SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class"
            " WHERE relname = ANY(%s) ORDER BY relname",
            (["messages", *SEARCH_INDEXES],),
        ).fetchall()
    took = time.monotonic() - loaded
    say(f"migrated to heads (search indexes built) and analysed in {took:.0f}s; "
         + ", ".join(f"{name} {size}" for name, size in sizes))  # fmt: skip


def _queries(url: str, shape: Shape, count: int, seed: int) -> list[tuple[str, str]]:
    """(tenant, two words): three in four are two words of one of the tenant's messages (so
    something is found), one in four two random words of ranks 20 to 2,000 (mostly nothing)."""
    rng = random.Random(seed)
    words = TextMaker(shape).words
    rank = {word: n for n, word in enumerate(words)}
    queries: list[tuple[str, str]] = []
    with psycopg.connect(url) as conn:
        while len(queries) < count:
            c = rng.randrange(shape.conversations)
            tenant = tenant_name(c % shape.tenants)
            if len(queries) % 4 == 3:
                queries.append((tenant, " ".join(rng.sample(words[20:2000], 2))))
                continue
            row = conn.execute(
                "SELECT content FROM messages WHERE conversation_id = %s AND seq = %s",
                (f"conv_{c:026d}", rng.randint(1, 2 * shape.turns)),
            ).fetchone()
            candidates = sorted(
                {w for w in (row[0].split() if row else []) if rank.get(w, 0) >= 20}
            )
            if len(candidates) >= 2:
                queries.append((tenant, " ".join(rng.sample(candidates, 2))))
    return queries


def bench_search(url: str, server: BenchStack, shape: Shape, samples: int) -> None:
    queries = _queries(url, shape, samples, seed=11)
    rng = random.Random(12)
    chinese = [
        (tenant_name(rng.randrange(shape.tenants)), "".join(rng.sample(CHINESE_WORDS, 2)))
        for _ in range(samples // 4)
    ]
    with httpx.Client(
        base_url=server.base_url,
        headers=server.admin_headers,
        timeout=60,
    ) as client:
        for tenant, q in queries[:10]:  # warm the caches
            search_once(client, tenant, q)
        http = [search_once(client, tenant, q) for tenant, q in queries]
        http_cjk = [search_once(client, tenant, q) for tenant, q in chinese]
        hits = [
            len(client.get("/v1/admin/conversations", params={"tenant": t, "q": q}).json()["data"])
            for t, q in queries
        ]
    say(f"search over HTTP, {len(http)} two-word English queries, one tenant each: "
         f"p50 {percentile(http, 0.5) * 1000:.1f} ms, p95 {percentile(http, 0.95) * 1000:.1f} ms "
         f"(target < 100 ms); {sum(1 for h in hits if h)} of them found some, "
         f"{max(hits)} at most (a page is 50)")  # fmt: skip
    say(
        f"search over HTTP, {len(http_cjk)} Chinese substring queries: "
        f"p50 {percentile(http_cjk, 0.5) * 1000:.1f} ms, "
        f"p95 {percentile(http_cjk, 0.95) * 1000:.1f} ms"
    )

    engine = create_engine(normalize_database_url(url))
    baseline_queries = queries[:20]
    with engine.connect() as conn:
        indexed = [explain_service_query(conn, t, q, analyze=True)[0] for t, q in baseline_queries]
        plan = explain_service_query(conn, *queries[0], analyze=True)[1]
        plan_cjk = explain_service_query(conn, *chinese[0], analyze=True)[1]
        conn.rollback()
        # DDL is transactional: the indexes are back after the rollback.
        for index in SEARCH_INDEXES:
            conn.execute(text(f"DROP INDEX {index}"))
        baseline = [explain_service_query(conn, t, q, analyze=True)[0] for t, q in baseline_queries]
        conn.rollback()
    engine.dispose()
    ratio = percentile(baseline, 0.5) / percentile(indexed, 0.5)
    say(f"the same {len(baseline_queries)} queries in SQL: with the indexes median "
         f"{percentile(indexed, 0.5):.2f} ms, without (baseline) median "
         f"{percentile(baseline, 0.5):.1f} ms: {ratio:.0f}x faster with the indexes")  # fmt: skip
    say("plan, English words:\n" + plan)
    say("plan, Chinese substring:\n" + plan_cjk)


def _export(server: BenchStack, params: dict[str, str]) -> tuple[int, int, float, int]:
    """(conversations, messages, seconds, peak RSS growth in bytes) of one export."""
    sampler = MemorySampler(server.api_pid)
    lines = messages = 0
    started = time.monotonic()
    tail = b""
    with (
        sampler,
        httpx.Client(
            base_url=server.base_url,
            headers=server.admin_headers,
            timeout=600,
        ) as client,
        client.stream("GET", "/v1/admin/export", params=params) as answer,
    ):
        answer.raise_for_status()
        for chunk in answer.iter_bytes():
            lines += chunk.count(b"\n")
            # The 6 bytes before the chunk complete a '"role":' cut by the chunk's start.
            messages += (tail + chunk).count(b'"role":')
            tail = chunk[-6:]
    return lines, messages, time.monotonic() - started, sampler.growth


def bench_export(url: str, server: BenchStack, shape: Shape) -> None:
    _export(server, {"tenant": tenant_name(1)})  # warm-up: first-use allocations
    small = _export(server, {"tenant": tenant_name(0)})
    full = _export(server, {})
    started = time.monotonic()
    raw = 0
    with psycopg.connect(url) as conn, conn.cursor(name="raw") as cur:
        cur.itersize = 2000
        cur.execute(
            "SELECT c.id, c.tenant_id, c.created_at, c.system_prompt, m.role, m.content,"
            " m.created_at FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id"
            " ORDER BY c.created_at, c.id, m.seq"
        )
        for _ in cur:
            raw += 1
    raw_rate = raw / (time.monotonic() - started)
    lines, messages, seconds, growth = full
    rate = messages / seconds
    say(f"export over HTTP: {lines:,} conversations, {messages:,} messages in {seconds:.1f}s: "
         f"{rate:,.0f} messages/s (target >= 20,000); reading the same rows without JSON "
         f"(baseline): {raw_rate:,.0f} rows/s: {rate / raw_rate:.2f}x of it")  # fmt: skip
    say(f"export peak memory (API process RSS above its level before): full export "
         f"{growth / 2**20:.1f} MiB for {messages:,} messages; one tenant "
         f"{small[3] / 2**20:.1f} MiB for {small[1]:,} messages "
         f"({messages / max(1, small[1]):.0f}x the data)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.b5_transcripts")
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="keep the loaded database")
    args = parser.parse_args(argv)
    shape = Shape(conversations=args.conversations)
    # libpq's spelling: the loader and the SQL measurements use psycopg directly.
    url = libpq_url(bench_database(DATABASE, fresh=not args.reuse))
    started = time.monotonic()
    if not args.reuse:
        build(url, shape)
    with BenchStack("b5", model=None, workers=False, database_url=url) as server:
        bench_search(url, server, shape, args.samples)
        bench_export(url, server, shape)
    say(f"B5 done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
