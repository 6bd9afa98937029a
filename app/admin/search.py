"""Transcript search: what `q` means, as SQL over `messages.content`, and the snippet.

Two ways to match, each backed by indexes (migrations 0003 and 0007):
- words: English full-text search (`websearch_to_tsquery('english', q)`): case and word forms
  ("Running" finds "run"), quoted phrases, `or` and `-word`; the GIN index on
  `to_tsvector('english', content)`.
- substrings: for scripts written without spaces between words (Chinese, Japanese, Thai...),
  where a word parser cannot find words, every term of `q` (a quoted phrase is one term) must
  appear in the message, case-insensitively (`ILIKE`). A term with 3 letters or digits in a
  row is found by the pg_trgm GIN index on `content`; a shorter one in those scripts ("对话")
  by the GIN index on `unspaced_grams(content)`, its characters and pairs of characters.
  Also used when `q` holds no word the English parser keeps (only stop words, punctuation or
  emoji), so that such a query can still match literally.

A message matches when it holds the whole query; a conversation matches when one of its
messages does. A query no index can serve would read every message: it is refused (422),
saying why: one that only excludes words ("-cats"), and substrings with no term an index
finds ("or", "%", "😀").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnClause, ColumnElement, and_, func, literal_column, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from app.errors import ProblemError
from app.models import Message

_ENGLISH: ColumnClause[Any] = literal_column("'english'::regconfig")
# Scripts written without spaces between words, or (Hangul) whose words carry particles that
# a word match would miss: CJK ideographs and punctuation, kana, Hangul, Thai, Lao, Tibetan,
# Myanmar, Khmer.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3000-\u303f\u3040-\u30ff"
    "\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
    "\U00020000-\U0003134f]"
)
_TERM = re.compile(r'"([^"]*)"|(\S+)')
# What gives pg_trgm a trigram to look up in a LIKE pattern: 3 letters or digits in a row.
_TRIGRAM = re.compile(r"[^\W_]{3}")
SNIPPET_CHARS = 160
HIGHLIGHT = "**"


@dataclass(frozen=True)
class SearchQuery:
    text: str
    # None: match words (full-text search); else the substrings every match must hold.
    substrings: tuple[str, ...] | None


def _terms(text: str) -> tuple[str, ...]:
    found = [m.group(1) if m.group(1) is not None else m.group(2) for m in _TERM.finditer(text)]
    terms = tuple(dict.fromkeys(t.strip() for t in found if t.strip()))
    return terms or (text.strip(),)


def _refused(detail: str, msg: str) -> ProblemError:
    return ProblemError(422, detail, errors=[{"loc": ["query", "q"], "msg": msg}])


def parse_query(session: Session, text: str) -> SearchQuery:
    """How `text` will be matched: by words when the English parser finds any, else by
    substrings; a problem (422) when no index could find its matches."""
    if not _UNSPACED.search(text):
        query = func.websearch_to_tsquery(_ENGLISH, text)
        nodes, indexed = session.execute(select(func.numnode(query), func.querytree(query))).one()
        if nodes and indexed in ("", "T"):
            raise _refused(
                "q only excludes words (-word, or an alternative that does): name at least "
                "one word the messages must hold.",
                "only excluded words",
            )
        if nodes:
            return SearchQuery(text, None)
    terms = _terms(text)
    if not any(_TRIGRAM.search(t) or _UNSPACED.search(t) for t in terms):
        raise _refused(
            'q has nothing to search for: no word (stop words such as "a" or "of", '
            "punctuation and emoji are not words) and no 3 letters or digits in a row to match "
            "as text. Send a word, or a longer piece of the text.",
            "nothing to search for",
        )
    return SearchQuery(text, terms)


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _tsquery(query: SearchQuery) -> ColumnElement[object]:
    return func.websearch_to_tsquery(_ENGLISH, query.text)


def message_matches(query: SearchQuery) -> ColumnElement[bool]:
    """The condition on `Message` rows; written as the indexes' expressions so they are used."""
    if query.substrings is None:
        document = func.to_tsvector(_ENGLISH, Message.content)
        return document.bool_op("@@")(_tsquery(query))
    return and_(*(_substring_matches(t) for t in query.substrings))


def _substring_matches(term: str) -> ColumnElement[bool]:
    condition = Message.content.ilike(_like_pattern(term), escape="\\")
    if _TRIGRAM.search(term) or not _UNSPACED.search(term):
        return condition
    # Too short for a trigram: its characters and pairs (lower-cased by the same function as
    # the messages', so the same as ILIKE's) narrow the messages, ILIKE decides.
    grams = func.unspaced_grams(Message.content).bool_op("@>")(func.unspaced_grams(term))
    return and_(grams, condition)


def snippets(
    session: Session, *, query: SearchQuery, conversation_ids: list[str]
) -> dict[str, str]:
    """For each conversation, an excerpt of its first matching message, matches in `**`."""
    if not conversation_ids:
        return {}
    first = (
        select(Message.conversation_id, Message.content)
        .where(Message.conversation_id.in_(conversation_ids), message_matches(query))
        .ext(distinct_on(Message.conversation_id))
        .order_by(Message.conversation_id, Message.seq)
        .subquery()
    )
    if query.substrings is None:
        headline = func.ts_headline(
            _ENGLISH,
            first.c.content,
            _tsquery(query),
            f"StartSel={HIGHLIGHT}, StopSel={HIGHLIGHT}, MaxWords=30, MinWords=12, "
            'ShortWord=2, MaxFragments=1, FragmentDelimiter=" … "',
        )
        rows = session.execute(select(first.c.conversation_id, headline)).all()
        return {conversation_id: text for conversation_id, text in rows}
    rows = session.execute(select(first.c.conversation_id, first.c.content)).all()
    return {cid: substring_snippet(content, query.substrings) for cid, content in rows}


def substring_snippet(content: str, terms: tuple[str, ...]) -> str:
    """A window of `content` around the first term found, every term found in it marked."""
    pattern = re.compile("|".join(re.escape(t) for t in terms), re.IGNORECASE)
    first = pattern.search(content)
    # PostgreSQL's and Python's case folding differ for a few characters: show the start.
    center = first.start() if first else 0
    start = max(0, center - SNIPPET_CHARS // 3)
    end = min(len(content), start + SNIPPET_CHARS)
    window = pattern.sub(lambda m: f"{HIGHLIGHT}{m.group(0)}{HIGHLIGHT}", content[start:end])
    return ("…" if start > 0 else "") + window + ("…" if end < len(content) else "")
