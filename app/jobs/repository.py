"""The SQL of the API's hot paths, for its async pool (app.db.make_async_pool).

A submit, and a request held by `Prefer: wait` re-reading its job's status: their statements
are written once here, as text, and sent by psycopg (prepared by the server after a few uses),
with no statement built, compiled or cached per request. Each one says where the rest of the
code states the same rule (app.jobs.fair_share, app.jobs.lifecycle); "unfinished" is
`status IN ('queued', 'running')` (app.models.UNFINISHED).
"""

from __future__ import annotations

# A submit's statements take a whole group of turns at once (app.jobs.submission, one
# transaction for the submits of the same moment): each is one statement over arrays, one row
# of them a turn, a tenant or a conversation, so the group costs what one submit did.

# Each tenant's unfinished jobs, counted up to its limit (a deep queue costs no more), and its
# jobs sent and waiting in the broker, up to its share (fair_share._sent_waiting).
TENANT_LOADS = """
SELECT t.tenant,
  (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = t.tenant
     AND status IN ('queued', 'running') LIMIT t.cap) AS unfinished),
  (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = t.tenant
     AND status = 'queued' AND enqueued_at IS NOT NULL LIMIT t.share) AS sent)
FROM unnest(%(tenants)s::text[], %(limits)s::int[], %(shares)s::int[]) AS t(tenant, cap, share)
"""

SENT_WAITING = """
SELECT t.tenant,
  (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = t.tenant
     AND status = 'queued' AND enqueued_at IS NOT NULL LIMIT t.share) AS sent)
FROM unnest(%(tenants)s::text[], %(shares)s::int[]) AS t(tenant, share)
"""

# fair_share.lock_tenant, for each tenant, until the transaction ends. Taken in the order of
# the locks' own keys, as every group takes them, so two groups never wait on each other.
TENANT_LOCKS = """
SELECT pg_advisory_xact_lock(%(namespace)s, k.key)
FROM (SELECT DISTINCT hashtext(t) AS key FROM unnest(%(tenants)s::text[]) AS t ORDER BY 1) AS k
"""

NEW_CONVERSATIONS = """
INSERT INTO conversations
  (id, tenant_id, system_prompt, metadata, turn_count, message_count, created_at, updated_at)
SELECT c.id, c.tenant, c.system_prompt, c.metadata, c.turns, 2 * c.turns - 1, %(now)s, %(now)s
FROM unnest(%(ids)s::text[], %(tenants)s::text[], %(system_prompts)s::text[],
  %(metadata)s::jsonb[], %(turns)s::int[]) AS c(id, tenant, system_prompt, metadata, turns)
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

# The tenants' conversations that new turns continue, locked until the end of the
# transaction (in the order of their ids, as every group locks them), so that turns of one
# conversation are numbered one at a time. A missing row: not the tenant's (or no such
# conversation), and no other tenant's row is locked or waited for.
LOCK_CONVERSATIONS = """
SELECT c.id, c.tenant_id, c.turn_count FROM conversations AS c
JOIN unnest(%(ids)s::text[], %(tenants)s::text[]) AS w(id, tenant)
  ON c.id = w.id AND c.tenant_id = w.tenant
ORDER BY c.id
FOR UPDATE OF c
"""

# Each conversation locked above, `added` turns longer.
ADD_TURNS = """
UPDATE conversations AS c
SET turn_count = c.turn_count + w.added, message_count = c.message_count + w.added,
  updated_at = %(now)s
FROM unnest(%(ids)s::text[], %(added)s::int[]) AS w(id, added)
WHERE c.id = w.id
"""

# lifecycle.is_next_in_conversation, negated: the conversations with an unfinished turn
# (queued or running, app.models.UNFINISHED) before `turn`, whose new turns wait for it.
EARLIER_UNFINISHED = """
SELECT w.id FROM unnest(%(ids)s::text[], %(turns)s::int[]) AS w(id, turn)
WHERE EXISTS (SELECT 1 FROM jobs WHERE conversation_id = w.id AND turn < w.turn
  AND status IN ('queued', 'running'))
"""

# The jobs and their users' messages, in one statement. `ready` and `sent` stamp ready_at and
# enqueued_at with the transaction's moment.
NEW_JOBS = """
WITH j AS (
  SELECT * FROM unnest(%(ids)s::text[], %(tenants)s::text[], %(conversations)s::text[],
    %(turns)s::int[], %(generations)s::jsonb[], %(metadata)s::jsonb[],
    %(webhook_urls)s::text[], %(ready)s::bool[], %(sent)s::bool[], %(backgrounds)s::bool[],
    %(message_ids)s::text[], %(seqs)s::int[], %(contents)s::text[])
  AS j(id, tenant, conversation, turn, generation, metadata, webhook_url, ready, sent,
    background, message_id, seq, content)
), job AS (
  INSERT INTO jobs (id, tenant_id, conversation_id, turn, status, generation, metadata,
    webhook_url, attempts, cancel_requested, created_at, ready_at, enqueued_at, background)
  SELECT id, tenant, conversation, turn, 'queued', generation, metadata, webhook_url, 0,
    false, %(now)s, CASE WHEN ready THEN %(now)s END, CASE WHEN sent THEN %(now)s END,
    background
  FROM j
  RETURNING id
)
INSERT INTO messages (id, conversation_id, job_id, seq, role, content, created_at)
SELECT j.message_id, j.conversation, job.id, j.seq, 'user', j.content, %(now)s
FROM j JOIN job ON job.id = j.id
"""

IDEMPOTENCY_DONE = """
UPDATE idempotency_keys AS k SET job_id = w.job
FROM unnest(%(jobs)s::text[], %(tenants)s::text[], %(keys)s::text[]) AS w(job, tenant, key)
WHERE k.tenant_id = w.tenant AND k.key = w.key
"""

# fair_share.queue_position of sent jobs: for each, the jobs sent before it (the broker is
# FIFO).
SENT_BEFORE = """
SELECT w.id, (SELECT count(*) FROM jobs WHERE status = 'queued' AND enqueued_at IS NOT NULL
  AND (enqueued_at, id) < (%(at)s, w.id))
FROM unnest(%(ids)s::text[]) AS w(id)
"""

# fair_share.queue_position of jobs not sent: every sent job, and for each job its tenant's
# own unsent jobs accepted before it...
SENT_AND_OWN_UNSENT_BEFORE = """
SELECT w.id, (SELECT count(*) FROM jobs WHERE status = 'queued' AND enqueued_at IS NOT NULL),
  (SELECT count(*) FROM jobs WHERE tenant_id = w.tenant AND status = 'queued'
     AND enqueued_at IS NULL AND (created_at, id) < (%(at)s, w.id))
FROM unnest(%(ids)s::text[], %(tenants)s::text[]) AS w(id, tenant)
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
