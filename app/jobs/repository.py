"""The SQL of the API's hot paths, for its async pool (app.db.make_async_pool).

A submit, and a request held by `Prefer: wait` re-reading its job's status: their statements
are written once here, as text, and sent by psycopg (prepared by the server after a few uses),
with no statement built, compiled or cached per request. Each one says where the rest of the
code states the same rule (app.jobs.fair_share, app.jobs.lifecycle); "unfinished" is
`status IN ('queued', 'running')` (app.models.UNFINISHED).
"""

from __future__ import annotations

# The tenant's unfinished jobs, counted up to its limit (a deep queue costs no more), and its
# jobs sent and waiting in the broker, up to its share (fair_share._sent_waiting).
TENANT_LOAD = """
SELECT
  (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = %(tenant)s
     AND status IN ('queued', 'running') LIMIT %(limit)s) AS unfinished),
  (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = %(tenant)s
     AND status = 'queued' AND enqueued_at IS NOT NULL LIMIT %(share)s) AS sent)
"""

SENT_WAITING = """
SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = %(tenant)s
  AND status = 'queued' AND enqueued_at IS NOT NULL LIMIT %(share)s) AS sent
"""

# fair_share.lock_tenant: until the transaction ends.
TENANT_LOCK = "SELECT pg_advisory_xact_lock(%(namespace)s, hashtext(%(tenant)s))"

NEW_CONVERSATION = """
INSERT INTO conversations
  (id, tenant_id, system_prompt, metadata, turn_count, message_count, created_at, updated_at)
VALUES (%(id)s, %(tenant)s, %(system_prompt)s, %(metadata)s, %(turns)s, %(messages)s, %(now)s,
  %(now)s)
"""

# An earlier turn a new conversation starts with (a Responses API `input` that holds the
# transcript so far): a succeeded job with its two messages, as if it had run here, so that
# prompts, transcripts and exports read it like any other. It never ran: no started_at.
IMPORTED_TURN = """
WITH job AS (
  INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation, metadata,
    attempts, cancel_requested, created_at, finished_at)
  VALUES (%(id)s, %(tenant)s, %(conversation)s, %(turn)s, 'succeeded', %(generation)s,
    %(metadata)s, 0, false, %(now)s, %(now)s)
  RETURNING id
)
INSERT INTO messages (id, conversation_id, job_id, seq, role, content, created_at)
SELECT %(user_id)s, %(conversation)s, job.id, %(user_seq)s, 'user', %(user)s, %(now)s FROM job
UNION ALL
SELECT %(reply_id)s, %(conversation)s, job.id, %(reply_seq)s, 'assistant', %(reply)s, %(now)s
FROM job
"""

# The next turn of the tenant's conversation; the UPDATE holds its row lock until the end of
# the transaction, so turns of one conversation are numbered one at a time. No row: not the
# tenant's (or no such conversation), and no other tenant's row is locked or waited for.
NEXT_TURN = """
UPDATE conversations
SET turn_count = turn_count + 1, message_count = message_count + 1, updated_at = %(now)s
WHERE id = %(id)s AND tenant_id = %(tenant)s
RETURNING turn_count
"""

# lifecycle.is_next_in_conversation, negated: an earlier turn of the conversation is
# unfinished (queued or running, app.models.UNFINISHED), so this one waits for it.
EARLIER_UNFINISHED = """
SELECT EXISTS (SELECT 1 FROM jobs WHERE conversation_id = %(conversation)s
  AND turn < %(turn)s AND status IN ('queued', 'running'))
"""

# The job and the user's message, in one statement.
NEW_JOB = """
WITH job AS (
  INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation, metadata,
    webhook_url, attempts, cancel_requested, created_at, ready_at, enqueued_at, background)
  VALUES (%(id)s, %(tenant)s, %(conversation)s, %(turn)s, 'queued', %(generation)s,
    %(metadata)s, %(webhook_url)s, 0, false, %(now)s, %(ready_at)s, %(enqueued_at)s,
    %(background)s)
  RETURNING id
)
INSERT INTO messages (id, conversation_id, job_id, seq, role, content, created_at)
SELECT %(message_id)s, %(conversation)s, job.id, %(seq)s, 'user', %(content)s, %(now)s
FROM job
"""

IDEMPOTENCY_DONE = """
UPDATE idempotency_keys SET job_id = %(job)s WHERE tenant_id = %(tenant)s AND key = %(key)s
"""

# fair_share.queue_position of a sent job: the jobs sent before it (the broker is FIFO).
SENT_BEFORE = """
SELECT count(*) FROM jobs WHERE status = 'queued' AND enqueued_at IS NOT NULL
  AND (enqueued_at, id) < (%(at)s, %(id)s)
"""

# fair_share.queue_position of a job not sent: every sent job, and the tenant's own unsent
# jobs accepted before this one...
SENT_AND_OWN_UNSENT_BEFORE = """
SELECT
  (SELECT count(*) FROM jobs WHERE status = 'queued' AND enqueued_at IS NOT NULL),
  (SELECT count(*) FROM jobs WHERE tenant_id = %(tenant)s AND status = 'queued'
     AND enqueued_at IS NULL AND (created_at, id) < (%(at)s, %(id)s))
"""

# ...and the other tenants' unsent jobs (app.jobs.service.UnsentCounts reads these).
UNSENT_BY_TENANT = """
SELECT tenant_id, count(*) FROM jobs WHERE status = 'queued' AND enqueued_at IS NULL
GROUP BY tenant_id
"""

# A held request's re-read (app.jobs.router._wait_for_end): the job's status alone, by primary
# key, and only the tenant's (a NULL tenant is an admin's key, which reads every tenant's).
JOB_STATUS = """
SELECT status FROM jobs WHERE id = %(id)s
  AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
"""
