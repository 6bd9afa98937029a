"""admin search: an index for terms of one or two characters in scripts written without spaces

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 11:30:00

pg_trgm (ix_messages_content_trgm) finds a substring by its trigrams: a term of one or two
characters has none, and its ILIKE read every message. Chinese, Japanese and Korean words are
often that short ("对话", "東京", "환불"), so `unspaced_grams(content)` lists every character,
and every pair of neighbouring characters, of the message's runs of such scripts (lower-cased,
as ILIKE compares), and a GIN index over it finds them (app/admin/search.py). Text in other
scripts gives an empty list, for the cost of one regular expression scan; a 32,000-character
Chinese message takes about 50 ms to list. Like 0003's indexes, it is built while writes to
`messages` wait.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A run of characters of the scripts written without spaces: search.py's `_UNSPACED`, as a
# PostgreSQL regular expression. Characters by position with string_to_table and lead():
# substr() at each offset of a long text would cost the square of its length.
FUNCTION = r"""
CREATE FUNCTION unspaced_grams(content text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
  SELECT coalesce(array_agg(DISTINCT grams.gram), '{}')
  FROM (
    SELECT ch.c, lead(ch.c) OVER (PARTITION BY run.n ORDER BY ch.pos) AS next
    FROM regexp_matches(
           lower(content),
           '[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]+',
           'g'
         ) WITH ORDINALITY AS run(r, n),
         string_to_table(run.r[1], NULL) WITH ORDINALITY AS ch(c, pos)
  ) AS chars,
  LATERAL (VALUES (chars.c), (chars.c || chars.next)) AS grams(gram)
  WHERE grams.gram IS NOT NULL
$$
"""


def upgrade() -> None:
    op.execute(FUNCTION)
    op.execute(
        "CREATE INDEX ix_messages_content_unspaced_grams ON messages"
        " USING gin (unspaced_grams(content))"
    )


def downgrade() -> None:
    op.drop_index("ix_messages_content_unspaced_grams", table_name="messages")
    op.execute("DROP FUNCTION unspaced_grams(text)")
