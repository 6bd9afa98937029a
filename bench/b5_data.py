"""B5's data set: tenants, conversations, jobs and messages, generated and bulk-loaded.

Words follow a Zipf distribution over a vocabulary of the words of the worker's bundled
corpus (most frequent first) followed by made-up words, so that a query word may be common
or rare as in real text. About 2% of the conversations are in Chinese. Loaded with COPY into
tables without the search indexes; the migration that creates them runs afterwards, as it
would on an existing database.
"""

from __future__ import annotations

import collections
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

CORPUS = Path(__file__).resolve().parents[1] / "worker" / "inference" / "corpus.txt"
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tus",
    "vel",
    "dor",
    "an",
    "sa",
    "pri",
    "qu",
    "ob",
    "el",
    "fin",
    "gra",
    "hol",
    "ist",
    "jun",
    "mer",
    "nor",
]
CHINESE_WORDS = [
    "实现",
    "多轮",
    "对话",
    "原理",
    "模型",
    "推理",
    "队列",
    "任务",
    "数据",
    "系统",
    "用户",
    "问题",
    "回答",
    "服务",
    "延迟",
    "缓存",
    "数据库",
    "索引",
    "搜索",
    "分词",
    "文本",
    "语言",
    "训练",
    "参数",
    "性能",
    "测试",
    "部署",
    "日志",
    "错误",
    "重试",
]
START = datetime(2026, 8, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
# Every job's generation settings, as the API stores them (app.schemas.GenerationSettings).
GENERATION = '{"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": null}'


@dataclass(frozen=True)
class Shape:
    tenants: int = 50
    conversations: int = 100_000
    turns: int = 5  # a user message and a reply each: 10 messages a conversation
    vocabulary: int = 20_000
    chinese_share: float = 0.02
    seed: int = 5


def vocabulary(size: int) -> list[str]:
    counts = collections.Counter(re.findall(r"[a-z]+", CORPUS.read_text().lower()))
    words = [w for w, _ in counts.most_common() if len(w) > 1]
    made_up = (
        "".join(parts)
        for n in (2, 3, 4)
        for parts in itertools.product(SYLLABLES, repeat=n)
        if len(set(parts)) == n
    )
    seen = set(words)
    for word in made_up:
        if len(words) >= size:
            break
        if word not in seen:
            words.append(word)
            seen.add(word)
    return words[:size]


class TextMaker:
    def __init__(self, shape: Shape) -> None:
        self.rng = random.Random(shape.seed)
        self.words = vocabulary(shape.vocabulary)
        self.cum_weights = list(
            itertools.accumulate(1.0 / r for r in range(1, len(self.words) + 1))
        )

    def english(self, length: int) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.cum_weights, k=length))

    def chinese(self, length: int) -> str:
        return "".join(self.rng.choices(CHINESE_WORDS, k=length)) + "。"


def tenant_name(n: int) -> str:
    return f"tenant{n:02d}"


def _rows(shape: Shape, maker: TextMaker) -> Iterator[tuple[str, str, str]]:
    """(conversation line, job lines, message lines) in COPY's text format."""
    rng = random.Random(shape.seed + 1)
    step = SPAN / shape.conversations
    for c in range(shape.conversations):
        tenant = tenant_name(c % shape.tenants)
        conv = f"conv_{c:026d}"
        created = START + step * c
        chinese = rng.random() < shape.chinese_share
        conv_line = (
            f"{conv}\t{tenant}\t\\N\t{{}}\t{shape.turns}\t{2 * shape.turns}\t"
            f"{(created + timedelta(minutes=shape.turns)).isoformat()}\t{created.isoformat()}\n"
        )
        jobs, messages = [], []
        for turn in range(1, shape.turns + 1):
            at = created + timedelta(minutes=turn - 1)
            started = at + timedelta(milliseconds=rng.randint(5, 400))
            finished = started + timedelta(milliseconds=rng.randint(200, 3000))
            job = f"job_{c:022d}{turn:04d}"
            jobs.append(
                f"{job}\t{tenant}\t{conv}\t{turn}\tsucceeded\t{GENERATION}\t{{}}\t1\tf\t"
                f"{started.isoformat()}\t{finished.isoformat()}\t{at.isoformat()}\n"
            )
            for seq, words in ((2 * turn - 1, rng.randint(4, 20)), (2 * turn, rng.randint(8, 40))):
                text = maker.chinese(words // 2) if chinese else maker.english(words)
                role = "user" if seq % 2 else "assistant"
                messages.append(
                    f"msg_{c:022d}{seq:04d}\t{conv}\t{job}\t{seq}\t{role}\t{text}\t"
                    f"{(finished if role == 'assistant' else at).isoformat()}\n"
                )
        yield conv_line, "".join(jobs), "".join(messages)


def load(url: str, shape: Shape) -> int:
    """Fill an empty schema (migrated to 0001); returns the number of messages."""
    maker = TextMaker(shape)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY tenants (id) FROM STDIN") as copy:
            for n in range(shape.tenants):
                copy.write(f"{tenant_name(n)}\n")
        batch: list[tuple[str, str, str]] = []
        for rows in _rows(shape, maker):
            batch.append(rows)
            if len(batch) == 5000:
                _copy_batch(cur, batch)
                batch = []
        if batch:
            _copy_batch(cur, batch)
        conn.commit()
    return shape.conversations * shape.turns * 2


def _copy_batch(cur: psycopg.Cursor[tuple[object, ...]], batch: list[tuple[str, str, str]]) -> None:
    columns = {
        "conversations": "id, tenant_id, system_prompt, metadata, turn_count, message_count, "
        "updated_at, created_at",
        "jobs": "id, tenant_id, conversation_id, turn, status, generation, metadata, attempts, "
        "cancel_requested, started_at, finished_at, created_at",
        "messages": "id, conversation_id, job_id, seq, role, content, created_at",
    }
    for index, table in enumerate(columns):
        with cur.copy(f"COPY {table} ({columns[table]}) FROM STDIN") as copy:
            copy.write("".join(rows[index] for rows in batch))
