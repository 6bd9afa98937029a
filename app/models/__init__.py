"""All tables, imported here so that `Base.metadata` knows every one of them."""

from app.models.api_key import ApiKey, Scope
from app.models.conversation import Conversation
from app.models.idempotency_key import IdempotencyKey
from app.models.job import TERMINAL, UNFINISHED, Job, JobStatus
from app.models.message import Message, reply_message_id, reply_seq, user_seq
from app.models.tenant import Tenant
from app.models.webhook_attempt import WebhookAttempt
from app.models.webhook_event import WebhookEvent, WebhookStatus
from app.models.webhook_secret import WebhookSecret

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
    "WebhookAttempt",
    "WebhookEvent",
    "WebhookSecret",
    "WebhookStatus",
    "reply_message_id",
    "reply_seq",
    "user_seq",
]
