"""Admin transcript search and listing: words in any language, phrases, filters, snippets,
stable pages while turns arrive, and no 500 whatever `q` holds."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from app.auth.service import ensure_tenant
from app.db import session_scope
from app.dev.query_plans import explain_service_query
from app.ids import new_id
from app.models import Conversation, Job, Message, reply_seq, user_seq
from app.schemas import GenerationSettings
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration

Turn = tuple[str, str | None, str]


def seed_conversation(
    tenant: str,
    turns: list[Turn],
    *,
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
    system_prompt: str | None = None,
) -> str:
    """A conversation written straight to the database: each turn (user message, reply or
    None, job status). Terminal statuses, so that no worker touches them."""
    created = created_at or datetime.now(UTC)
    conversation_id = new_id("conv")
    with session_scope() as session:
        ensure_tenant(session, tenant_id=tenant)
        session.add(
            Conversation(
                id=conversation_id,
                tenant_id=tenant,
                system_prompt=system_prompt,
                metadata_={},
                turn_count=len(turns),
                message_count=sum(1 + (reply is not None) for _, reply, _ in turns),
                created_at=created,
                updated_at=updated_at or created,
            )
        )
        session.flush()
        for turn, (message, reply, status) in enumerate(turns, start=1):
            at = created + timedelta(seconds=turn)
            job = Job(
                id=new_id("job"),
                tenant_id=tenant,
                conversation_id=conversation_id,
                turn=turn,
                status=status,
                generation=GenerationSettings(max_new_tokens=16),
                metadata_={},
                attempts=1,
                cancel_requested=False,
                created_at=at,
                started_at=at if status != "queued" else None,
                finished_at=at if status not in ("queued", "running") else None,
                lease_expires_at=at + timedelta(days=1) if status == "running" else None,
                enqueued_at=at,
            )
            session.add(job)
            session.flush()
            session.add(
                Message(
                    id=new_id("msg"),
                    conversation_id=conversation_id,
                    job_id=job.id,
                    seq=user_seq(turn),
                    role="user",
                    content=message,
                    created_at=at,
                )
            )
            if reply is not None:
                session.add(
                    Message(
                        id=new_id("msg"),
                        conversation_id=conversation_id,
                        job_id=job.id,
                        seq=reply_seq(turn),
                        role="assistant",
                        content=reply,
                        created_at=at,
                    )
                )
    return conversation_id


def search(api: Api, **params: Any) -> dict[str, Any]:
    answer = api.request("GET", "/v1/admin/conversations", api.admin_key, params=params)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def found_ids(api: Api, **params: Any) -> list[str]:
    return [c["id"] for c in search(api, **params)["data"]]


def test_admin_routes_refuse_client_keys_and_anonymous_calls(api_no_workers: Api) -> None:
    api = api_no_workers
    client_key = api.create_key("acme")
    conversation = seed_conversation("acme", [("hello", "hi", "succeeded")])
    for path in (
        "/v1/admin/conversations",
        f"/v1/admin/conversations/{conversation}",
        "/v1/admin/export",
        "/v1/admin/stats",
    ):
        for key, status in ((None, 401), ("pk_unknown", 401), (client_key, 403)):
            answer = api.request("GET", path, key)
            assert answer.status_code == status, (path, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
        assert api.request("GET", path, api.admin_key).status_code == 200, path


def test_english_word_forms_and_case(api_no_workers: Api) -> None:
    api = api_no_workers
    runner = seed_conversation(
        "acme", [("I was Running late to the meeting", "Hurry up!", "succeeded")]
    )
    cats = seed_conversation(
        "acme", [("Tell me about cats", "Cats are small felines.", "succeeded")]
    )
    for q in ("run", "Running", "RUNS", "meetings"):
        assert found_ids(api, q=q) == [runner], q
    assert found_ids(api, q="hurry") == [runner]  # replies are searched too
    assert found_ids(api, q="feline") == [cats]  # "felines", in a reply
    assert found_ids(api, q="dogs") == []


def test_text_without_spaces_matches_as_a_substring(api_no_workers: Api) -> None:
    api = api_no_workers
    chinese = seed_conversation("zh", [("请解释实现多轮对话的原理", "好的。", "succeeded")])
    japanese = seed_conversation("ja", [("東京タワーはどこですか", "港区です。", "succeeded")])
    assert found_ids(api, q="多轮对话") == [chinese]
    assert found_ids(api, q="对话的原理") == [chinese]
    assert found_ids(api, q="对话原理") == []  # not contiguous in the message
    assert found_ids(api, q="多轮对话 原理") == [chinese]  # every term, anywhere
    assert found_ids(api, q="タワー") == [japanese]
    assert found_ids(api, q="对话") == [chinese]  # two characters: no trigram, still found
    assert found_ids(api, q="理") == [chinese]  # one
    assert found_ids(api, q="港区") == [japanese]  # in a reply
    assert found_ids(api, q="对 原理") == [chinese]  # short terms, each anywhere
    assert found_ids(api, q="理对") == []
    hit = search(api, q="多轮对话")["data"][0]
    assert "**多轮对话**" in hit["snippet"]


def test_quoted_phrases(api_no_workers: Api) -> None:
    api = api_no_workers
    exact = seed_conversation("acme", [("the quick brown fox jumps", None, "failed")])
    shuffled = seed_conversation("acme", [("a brown and quick fox", None, "failed")])
    assert found_ids(api, q='"quick brown fox"') == [exact]
    assert sorted(found_ids(api, q="quick brown fox")) == sorted([exact, shuffled])
    assert found_ids(api, q='"brown quick"') == []


def test_snippet_shows_the_match(api_no_workers: Api) -> None:
    api = api_no_workers
    filler = " ".join(["lorem ipsum dolor sit amet"] * 30)
    seed_conversation(
        "acme", [(f"{filler} the elephant remembers everything {filler}", None, "failed")]
    )
    hit = search(api, q="elephants")["data"][0]
    assert "**elephant**" in hit["snippet"]
    assert len(hit["snippet"]) < 400
    assert search(api)["data"][0]["snippet"] is None


def test_filters_tenant_dates_and_last_job_status(api_no_workers: Api) -> None:
    api = api_no_workers
    day = timedelta(days=1)
    now = datetime.now(UTC)
    old = seed_conversation(
        "acme", [("weather today", "sunny", "succeeded")], created_at=now - 10 * day
    )
    failed = seed_conversation(
        "acme",
        [("weather tomorrow", "rain", "succeeded"), ("and after?", None, "failed")],
        created_at=now - 2 * day,
    )
    other = seed_conversation("globex", [("weather report", None, "cancelled")])
    assert found_ids(api, q="weather") == [other, failed, old]
    assert found_ids(api, q="weather", tenant="acme") == [failed, old]
    assert found_ids(api, tenant="nobody") == []
    since = (now - 5 * day).isoformat()
    assert found_ids(api, tenant="acme", since=since) == [failed]
    assert found_ids(api, until=since) == [old]
    assert found_ids(api, since=(now - 3 * day).replace(tzinfo=None).isoformat()) == [other, failed]
    assert found_ids(api, status="failed") == [failed]
    assert found_ids(api, status="succeeded") == [old]
    summary = search(api, tenant="acme", status="failed")["data"][0]
    assert summary == summary | {
        "tenant": "acme",
        "message_count": 3,
        "last_job_status": "failed",
        "snippet": None,
    }
    for bad in ({"status": "done"}, {"since": "yesterday"}, {"since": now.isoformat(),
                "until": (now - day).isoformat()}, {"limit": 201}, {"cursor": "x"}):  # fmt: skip
        answer = api.request("GET", "/v1/admin/conversations", api.admin_key, params=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"


def test_pages_have_no_duplicates_or_gaps_while_turns_arrive(api_no_workers: Api) -> None:
    api = api_no_workers
    key = api.create_key("acme")
    first = [api.submit(key, message=f"topic number {n}")["conversation_id"] for n in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"tenant": "acme", "q": "topic", "limit": 3}
        page = search(api, **params | ({"cursor": cursor} if cursor else {}))
        seen += [c["id"] for c in page["data"]]
        # New conversations and new turns in old ones between pages.
        api.submit(key, message="topic of a newcomer")
        api.submit(key, message="topic again", conversation_id=first[len(seen) % 7])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert set(first) <= set(seen)
    assert seen[: len(first)] == list(reversed(first))


def test_conversation_detail_has_messages_and_jobs(api_no_workers: Api) -> None:
    api = api_no_workers
    conversation = seed_conversation(
        "acme",
        [("first", "one", "succeeded"), ("second", None, "failed")],
        system_prompt="Be brief.",
    )
    answer = api.request("GET", f"/v1/admin/conversations/{conversation}", api.admin_key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["tenant"] == "acme"
    assert body["system_prompt"] == "Be brief."
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "first"),
        ("assistant", "one"),
        ("user", "second"),
    ]
    assert [(j["status"], j["message"]["content"]) for j in body["jobs"]] == [
        ("succeeded", "first"),
        ("failed", "second"),
    ]
    assert body["jobs"][0]["reply"] == {"role": "assistant", "content": "one"}
    for missing in ("conv_00000000000000000000000000", "not an id", "x" * 300):
        answer = api.request("GET", f"/v1/admin/conversations/{missing}", api.admin_key)
        assert answer.status_code == 404, answer.text


NASTY_QUERIES = [
    '"',
    '"""',
    '"unbalanced phrase',
    "\\",
    "\\\\'",
    "%",
    "_",
    "%_%",
    "'; DROP TABLE messages; --",
    "a & b | !c",
    "<->",
    "foo:*",
    "!(a | b) & c:A",
    "or",
    "-",
    "- - -",
    "the",
    "😀",
    "🏳️‍🌈 family 👨‍👩‍👧",
    "\u200b",
    "\ud7ff\ue000\uffff",
    "x" * 1000,
    " ".join(["word"] * 190),
    "多" * 900,
    "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c",  # fraktur "Hello"
    "İstanbul ß ﬁ",
    "\t\n\r",
    "(((((((",
    "NULL",
]


def test_no_query_string_is_a_500(api_no_workers: Api) -> None:
    api = api_no_workers
    seed_conversation("acme", [("100% sure_thing a\\b 'quoted' 😀 多轮对话", None, "failed")])
    rng = random.Random(7)
    alphabet = "\"\\%_'&|!():*<->-~ aZ9é多😀\u0301\t"
    queries = NASTY_QUERIES + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(150)
    ]
    for q in queries:
        # 422: nothing an index could look up (test_queries_no_index_serves_are_refused).
        answer = api.request("GET", "/v1/admin/conversations", api.admin_key, params={"q": q})
        assert answer.status_code in (200, 422), (q, answer.text)
        export = api.request("GET", "/v1/admin/export", api.admin_key, params={"q": q})
        assert export.status_code == answer.status_code, (q, export.text)
        if answer.status_code == 422:
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["errors"][0]["loc"] == ["query", "q"]
    for literal in ("100%", "sure_thing", "a\\b", "'quoted'", "多"):
        assert len(found_ids(api, q=literal)) == 1, literal
    for q, status in (("a\x00b", 422), ("x" * 1001, 422)):
        answer = api.request("GET", "/v1/admin/conversations", api.admin_key, params={"q": q})
        assert answer.status_code == status, (q, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    raw = api.client.get("/v1/admin/conversations?q=%FF%FE%00", headers=api.auth(api.admin_key))
    assert raw.status_code in (200, 422), raw.text


def test_queries_no_index_serves_are_refused(api_no_workers: Api) -> None:
    """What no index could find would read every message: a 422 that says why, from the list
    and the export alike. Short words of unspaced scripts, and stop words of 3 letters or
    more, are still searched."""
    api = api_no_workers
    found = seed_conversation("acme", [("the cats of 東京 are to be fed", "对", "succeeded")])
    refusals = {
        "nothing to search for": [
            "a", "of", "or", "to be", '"to be"', "%", "_", "- -", '"', "😀", "!?", "…"
        ],
        "only excluded words": ["-cats", "cats or -dogs", "-the -cats"],
    }  # fmt: skip
    for msg, queries in refusals.items():
        for q in queries:
            for path in ("/v1/admin/conversations", "/v1/admin/export"):
                answer = api.request("GET", path, api.admin_key, params={"q": q})
                assert answer.status_code == 422, (path, q, answer.text)
                assert answer.headers["content-type"] == "application/problem+json"
                problem = answer.json()
                assert problem["errors"] == [{"loc": ["query", "q"], "msg": msg}], q
                assert problem["detail"].startswith("q "), problem
    for q in ("cats -dogs", "the", "東京", "東", "对", "to be fed", "cat 東"):
        assert found_ids(api, q=q) == [found], q
    assert found_ids(api, q="-cats dogs") == []


def _bulk_messages(conversations: int) -> None:
    """`conversations` conversations of 10 messages of filler, straight in SQL, analysed."""
    with session_scope() as session:
        ensure_tenant(session, tenant_id="bulk")
        for statement in (
            "INSERT INTO conversations (id, tenant_id, metadata, turn_count, message_count)"
            " SELECT 'conv_bulk' || g, 'bulk', '{}', 5, 10 FROM generate_series(1, :n) g",
            "INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation,"
            " metadata, attempts, cancel_requested)"
            " SELECT 'job_bulk' || g || '_' || t, 'bulk', 'conv_bulk' || g, t, 'succeeded',"
            " '{\"max_new_tokens\": 16}', '{}', 1, false"
            " FROM generate_series(1, :n) g, generate_series(1, 5) t",
            "INSERT INTO messages (id, conversation_id, job_id, seq, role, content)"
            " SELECT 'msg_bulk' || g || '_' || s, 'conv_bulk' || g,"
            " 'job_bulk' || g || '_' || ((s + 1) / 2), s,"
            " CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END,"
            " 'filler words about item ' || repeat(md5(g::text || s::text) || ' ', 8)"
            " || ' 对话 ' || s"
            " FROM generate_series(1, :n) g, generate_series(1, 10) s",
        ):
            session.execute(text(statement), {"n": conversations})
    with session_scope() as session:
        session.execute(text("ANALYZE conversations, jobs, messages"))


def test_search_plans_use_the_indexes(api_no_workers: Api, database_url: str) -> None:
    _bulk_messages(3000)
    # In the tenant of the 3,000 others: walking its conversations would cost more.
    english = seed_conversation("bulk", [("zebras are striped horses", None, "failed")])
    chinese = seed_conversation("bulk", [("请解释实现多轮对话的原理", None, "failed")])
    engine = create_engine(database_url)
    with engine.connect() as connection:
        for tenant, q, index, expected in (
            (None, "zebra", "ix_messages_content_fts", english),
            ("bulk", "striped zebras", "ix_messages_content_fts", english),
            (None, "多轮对话", "ix_messages_content_trgm", chinese),
            ("bulk", "实现多轮", "ix_messages_content_trgm", chinese),
            # Too short for a trigram.
            (None, "原理", "ix_messages_content_unspaced_grams", chinese),
            ("bulk", "请", "ix_messages_content_unspaced_grams", chinese),
            (None, "实 原理", "ix_messages_content_unspaced_grams", chinese),
        ):
            _, plan = explain_service_query(connection, tenant, q, analyze=False)
            assert index in plan, plan
            assert "Seq Scan on messages" not in plan, plan
            assert found_ids(api_no_workers, q=q) == [expected]
    engine.dispose()


def test_a_new_users_session(api: Api) -> None:
    """Conversations in two tenants (one in Chinese) through real workers: each is found by a
    word of it, filtered by tenant and date, and exported."""
    acme, globex = api.create_key("acme"), api.create_key("globex")
    started = datetime.now(UTC)
    english = api.submit(acme, message="My printer keeps jamming on thick paper")
    chinese = api.submit(globex, message="请解释实现多轮对话的原理", system_prompt="用中文回答")
    for key, job in ((acme, english), (globex, chinese)):
        assert api.wait(key, job["id"])["status"] == "succeeded"
    api.wait(
        acme,
        api.submit(acme, message="Still jammed", conversation_id=english["conversation_id"])["id"],
    )
    assert found_ids(api, q="jam") == [english["conversation_id"]]
    assert found_ids(api, q="多轮对话") == [chinese["conversation_id"]]
    assert found_ids(api, tenant="globex") == [chinese["conversation_id"]]
    assert found_ids(api, since=started.isoformat(), tenant="acme") == [english["conversation_id"]]
    assert found_ids(api, until=started.isoformat()) == []
    lines = api.request("GET", "/v1/admin/export", api.admin_key).text.splitlines()
    exported = {json.loads(line)["conversation_id"]: json.loads(line) for line in lines}
    assert [m["role"] for m in exported[english["conversation_id"]]["messages"]] == [
        "user", "assistant", "user", "assistant"
    ]  # fmt: skip
    assert exported[chinese["conversation_id"]]["messages"][0] == exported[
        chinese["conversation_id"]
    ]["messages"][0] | {"role": "system", "content": "用中文回答"}
