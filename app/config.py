"""Settings: one object for the API, the worker and the command line."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Any, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_database_url(url: str) -> str:
    """Accept the usual `postgresql://` spelling and use the psycopg 3 driver for it."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", protected_namespaces=()
    )

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/parley"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Unset: the broker shares REDIS_URL's server on the next database number, so that
    # context keys and broker messages never share a keyspace (reliability F12).
    broker_url: str | None = None
    model_id: str | None = None
    # The model's name in the OpenAI-compatible API (GET /v1/models, a response's `model`);
    # MODEL_ID as given when unset.
    served_model_name: str | None = None
    parley_admin_key: str | None = None

    context_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    # Recent messages kept in the cached context; the prompt window trims further by tokens.
    context_max_messages: int = Field(default=200, ge=2)
    # Conversations last updated longer ago than this are deleted; unset: kept forever.
    transcript_retention_days: int | None = Field(default=None, ge=1)
    # How often Celery beat runs the retention task (`parley beat`).
    retention_interval_seconds: int = Field(default=3600, ge=1)

    default_max_new_tokens: int = Field(default=128, ge=1)
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    generation_time_limit_seconds: float = Field(default=120.0, gt=0)
    # Turns generated together by one worker process (its batch), and so its Celery threads.
    worker_max_batch: int = Field(default=16, ge=1, le=512)
    # The longest prompt and reply a worker runs (0: the model's own window). Its key/value
    # cache is allocated for WORKER_MAX_BATCH + 1 turns of this many tokens.
    worker_max_context_tokens: int = Field(default=0, ge=0)
    # Prompt tokens a worker prefills between two decoding steps: a longer prompt is prefilled
    # in chunks of it, so the turns already running wait at most about that long for a token.
    worker_prefill_tokens: int = Field(default=512, ge=16)
    # Memory a worker keeps conversations' key/value caches in, for their next turns (0: off).
    worker_prefix_cache_mb: int = Field(default=1024, ge=0)
    max_turn_attempts: int = Field(default=3, ge=1)
    max_unfinished_jobs_per_tenant: int = Field(default=1000, ge=1)
    # Fair share: a tenant's jobs waiting in the broker at once (its share of the queue); the
    # rest wait in PostgreSQL and are sent one by one as these start, so the broker interleaves
    # tenants. FAIR_SHARE_TENANTS ("ten_a=16,ten_b=1") gives tenants other shares (weights).
    fair_share_default: int = Field(default=2, ge=1)
    fair_share_tenants: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    # Requests per minute for one API key; 0 turns the limit off.
    rate_limit_per_minute: int = Field(default=0, ge=0)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_wait_seconds: int = Field(default=60, ge=0)
    # Requests one API key may hold open at once with `Prefer: wait` (or a stream); beyond it a
    # request is answered at once with the job's current state.
    max_held_requests_per_key: int = Field(default=100, ge=0)
    # The longest one SQL statement of an API request may run (0: no limit); over it, `503`.
    api_statement_timeout_seconds: float = Field(default=10.0, ge=0)
    # A running turn's claim lasts this long and its worker renews it with each heartbeat:
    # a worker that stops renewing (it died) loses its turns to the reconciler, which runs
    # them again. Compared on the database's clock. More than two heartbeats.
    turn_lease_seconds: int = Field(default=30, ge=2)
    reconcile_interval_seconds: int = Field(default=10, ge=1)
    worker_heartbeat_seconds: int = Field(default=10, ge=1)

    # Webhooks. Networks (comma-separated CIDRs) a webhook may reach although not public.
    webhook_allowed_networks: Annotated[list[IPNetwork], NoDecode] = Field(default_factory=list)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Seconds to wait after each failed attempt (comma-separated), jittered upwards by up to a
    # fifth; after the last, the webhook is `failed`. The default spans 27.6 hours.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        min_length=1,
    )
    webhook_sweep_interval_seconds: float = Field(default=5.0, gt=0)
    # A due attempt whose message no worker took within this long is sent again.
    webhook_redispatch_seconds: float = Field(default=300.0, gt=0)
    webhook_resolve_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    # Webhook host lookups at submit running at once in one API process; beyond it, `503`.
    webhook_resolve_concurrency: int = Field(default=16, ge=1, le=256)
    # A job's webhook may be redelivered at most once in this many seconds (`429` sooner).
    webhook_redeliver_interval_seconds: float = Field(default=60.0, ge=0)

    @field_validator("database_url")
    @classmethod
    def _driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("parley_admin_key")
    @classmethod
    def _strong_admin_key(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 20:
            raise ValueError("PARLEY_ADMIN_KEY must be at least 20 characters")
        return value

    @field_validator("transcript_retention_days", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Docker Compose passes `${TRANSCRIPT_RETENTION_DAYS:-}` as an empty string when unset.
        return None if value == "" else value

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            return [ipaddress.ip_network(part, strict=False) for part in parts]
        return value

    @field_validator("fair_share_tenants", mode="before")
    @classmethod
    def _shares(cls, value: Any) -> Any:
        if isinstance(value, str):
            shares: dict[str, int] = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                tenant, sep, share = part.partition("=")
                if not sep or not tenant.strip() or not share.strip().isdigit():
                    raise ValueError(f"expected tenant=share, got {part!r}")
                if int(share) < 1:
                    raise ValueError(f"a share is at least 1, got {part!r}")
                shares[tenant.strip()] = int(share)
            return shares
        return value

    @property
    def served_model(self) -> str | None:
        """What GET /v1/models lists and POST /v1/responses accepts as `model`."""
        return self.served_model_name or self.model_id

    def fair_share(self, tenant_id: str) -> int:
        return self.fair_share_tenants.get(tenant_id, self.fair_share_default)

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            delays = [float(part) for part in value.split(",") if part.strip()]
            if any(not 0 < delay < 10**7 for delay in delays):
                raise ValueError("each delay must be a positive number of seconds")
            return delays
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Self:
        if self.turn_lease_seconds <= 2 * self.worker_heartbeat_seconds:
            raise ValueError(
                "TURN_LEASE_SECONDS must exceed two WORKER_HEARTBEAT_SECONDS: a lease is renewed "
                "with each heartbeat, and one late heartbeat must not lose a live turn"
            )
        return self

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return next_redis_database(self.redis_url)


def next_redis_database(url: str) -> str:
    """`redis://h:p/0` -> `redis://h:p/1`: the broker's own database beside the cache."""
    base, _, tail = url.rpartition("/")
    if base.endswith(":/") or not tail.split("?")[0].isdigit():
        return url.rstrip("/") + "/1"
    db, sep, query = tail.partition("?")
    return f"{base}/{int(db) + 1}{sep}{query}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
