"""A job's event stream in Redis: what `GET /v1/jobs/{id}/events` replays and follows.

The worker appends a job's `status` (running) and its reply's `delta`s as it decodes them, and
whoever ends a job appends `end` (app.redis.announce_job_ended). Each append goes to a capped
Redis Stream per job, which expires a while after its last entry, and is published on one
channel in the same script, so that every API process follows every stream it serves through
one subscription (app.jobs.event_stream) and replays from the stream itself. The database is
never read for a delta: the stream is a cache of what the job's row will hold at its end, and
a stream that is gone is replayed from that row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import redis

EVENTS_CHANNEL = "parley:job-events"
# A stream lives this long after its last entry; a reader of an older job gets its end
# replayed from the database (its whole reply as one delta).
STREAM_TTL_SECONDS = 3600
# More entries than a reply has deltas (one per token at most, and a turn's tokens are
# capped far below this), so trimming never cuts a reply.
STREAM_MAX_ENTRIES = 100_000

EventKind = Literal["status", "delta", "end"]

# XADD, EXPIRE and PUBLISH as one step: a follower that sees the published entry can find it
# in the stream, and no entry is published that the stream lacks. Returns the entry's id.
_APPEND = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[4],
  'data', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({job = ARGV[6], id = id, event = ARGV[4],
  data = ARGV[5]}))
return id
"""


@dataclass(frozen=True)
class Entry:
    """One entry of a job's stream; `id` is its Redis Stream id, `ms-seq`, increasing."""

    id: str
    event: EventKind
    data: str


def stream_key(job_id: str) -> str:
    return f"parley:events:{job_id}"


def append(
    client: redis.Redis | redis.client.Pipeline, job_id: str, event: EventKind, data: str = ""
) -> None:
    """Append to the job's stream and publish it (on a pipeline: when the pipeline runs)."""
    # Run by its digest (EVALSHA); a pipeline loads the script first if Redis lacks it.
    client.register_script(_APPEND)(
        keys=[stream_key(job_id)],
        args=[STREAM_MAX_ENTRIES, STREAM_TTL_SECONDS, EVENTS_CHANNEL, event, data, job_id],
    )


def shown_text(client: redis.Redis, job_id: str) -> str:
    """The reply text the job's stream holds so far (its deltas, joined)."""
    rows = client.xrange(stream_key(job_id))
    return "".join(entry.data for entry in parse_entries(rows) if entry.event == "delta")


def parse_published(message: str) -> tuple[str, Entry]:
    """The job id and entry of a message on EVENTS_CHANNEL."""
    fields = json.loads(message)
    return str(fields["job"]), Entry(str(fields["id"]), fields["event"], str(fields["data"]))


def parse_entries(rows: Any) -> list[Entry]:
    """Entries as XRANGE answers them: `[(id, {field: value})]`, decoded."""
    return [
        Entry(str(entry_id), fields["event"], str(fields.get("data", "")))
        for entry_id, fields in rows or ()
    ]


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id's order; ValueError if it is not one (`ms-seq`, both decimal)."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(entry_id) > 41:
        raise ValueError(f"not an event id: {entry_id!r}")
    return int(ms), int(seq)


def next_id(entry_id: str) -> str:
    """The id just after `entry_id`, for an event the reader makes up itself (an end the
    stream missed)."""
    ms, seq = id_key(entry_id)
    return f"{ms}-{seq + 1}"
