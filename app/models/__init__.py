"""All tables, imported here so that `Base.metadata` knows every one of them."""

from app.models.api_key import ApiKey, Scope
from app.models.conversation import Conversation
from app.models.idempotency_key import IdempotencyKey
from app.models.job import TERMINAL, UNFINISHED, Job, JobStatus
from app.models.message import Message, reply_seq, user_seq
from app.models.tenant import Tenant

__all__ = [
    "TERMINAL",
    "UNFINISHED",
    "ApiKey",
    "Conversation",
    "IdempotencyKey",
    "Job",
    "JobStatus",
    "Message",
    "Scope",
    "Tenant",
    "reply_seq",
    "user_seq",
]
