"""Unit tests of the pieces that need no services."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from app.auth.service import generate_secret, hash_key, shown_prefix
from app.config import Settings, next_redis_database, normalize_database_url
from app.errors import ProblemError
from app.ids import new_id, plausible_id
from app.jobs.schemas import JobCreate
from app.pagination import decode_cursor, encode_cursor
from worker.gpus import plan, worker_spec


def test_database_url_uses_psycopg() -> None:
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_broker_gets_its_own_redis_database() -> None:
    assert next_redis_database("redis://h:6379/0") == "redis://h:6379/1"
    assert next_redis_database("redis://h:6379/4?x=1") == "redis://h:6379/5?x=1"
    assert next_redis_database("redis://h:6379") == "redis://h:6379/1"
    settings = Settings(redis_url="redis://h:1/2", broker_url=None)
    assert settings.celery_broker_url == "redis://h:1/3"
    assert Settings(broker_url="amqp://b//").celery_broker_url == "amqp://b//"


def test_weak_admin_key_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(parley_admin_key="short")


def test_ids_are_time_ordered_and_opaque() -> None:
    ids = [new_id("job") for _ in range(200)]
    assert all(i.startswith("job_") and len(i) == 30 for i in ids)
    assert len(set(ids)) == 200
    assert plausible_id(ids[0])
    # Below the millisecond the bits are random: ids a few milliseconds apart sort in the
    # order they were made.
    spaced = []
    for _ in range(20):
        spaced.append(new_id("job"))
        time.sleep(0.002)
    assert sorted(spaced) == spaced
    for bad in ["", "a" * 65, "a\x00b", "ü", "a b\n"]:
        assert not plausible_id(bad)


def test_cursor_round_trip_and_rejects_garbage() -> None:
    assert decode_cursor(encode_cursor([3]), (int,)) == [3]
    assert decode_cursor(None, (int,)) is None
    for bad in ["!!", encode_cursor(["3"]), encode_cursor([1, 2]), encode_cursor([True]), "e30"]:
        with pytest.raises(ProblemError):
            decode_cursor(bad, (int,))
    with pytest.raises(ProblemError):
        decode_cursor(encode_cursor(["not a date", "x"]), (__import__("datetime").datetime, str))


@pytest.mark.parametrize("message", ["", " ", "\n", "a\x00", "x" * 32_001, "\ud800"])
def test_message_validation(message: str) -> None:
    with pytest.raises(ValidationError):
        JobCreate(message=message)


def test_message_accepts_any_language() -> None:
    assert JobCreate(message="实现多轮对话的原理 🚀").message == "实现多轮对话的原理 🚀"


def test_gpu_plan() -> None:
    assert plan("cpu") == [None]
    assert plan("0,1") == ["0", "1"]
    assert plan(" 1 , 1 ") == ["1"]
    for bad in ["", "x", "0,a", "-1"]:
        with pytest.raises(ValueError):
            plan(bad)


def test_worker_processes_are_pinned_and_do_not_oversubscribe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    gpu = worker_spec("1", gpu_count=2)
    assert gpu.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert gpu.env["OMP_NUM_THREADS"] == "8"
    cpu = worker_spec(None, gpu_count=1)
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu.env["OMP_NUM_THREADS"] == "16"
    # Its OpenMP threads spin only briefly between parallel regions on shared cores, unless
    # the operator chose their wait policy.
    assert cpu.env["GOMP_SPINCOUNT"] == "3000" and "GOMP_SPINCOUNT" not in gpu.env
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "GOMP_SPINCOUNT" not in worker_spec(None, gpu_count=1).env
    assert "--concurrency" in cpu.command


def test_fair_shares_per_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIR_SHARE_TENANTS", " ten_a=16, ten_b=1 ")
    settings = Settings(_env_file=None)
    assert settings.fair_share("ten_a") == 16 and settings.fair_share("ten_b") == 1
    assert settings.fair_share("ten_other") == settings.fair_share_default
    for bad in ("ten_a", "ten_a=0", "=3", "ten_a=x"):
        monkeypatch.setenv("FAIR_SHARE_TENANTS", bad)
        with pytest.raises(ValidationError):
            Settings(_env_file=None)


def test_what_a_key_shows_in_clear_is_no_part_of_its_secret() -> None:
    made = {generate_secret() for _ in range(100)}
    assert len(made) == 100
    for key in made:
        identifier, underscore, secret = key[:9], key[9], key[10:]
        assert shown_prefix(key) == identifier and underscore == "_"
        assert len(secret) == 43  # 256 random bits, none of them shown
    operators = "pk_admin_correct-horse-battery"
    shown = shown_prefix(operators)
    assert shown == "sha256:" + hash_key(operators)[:6]
    # A chosen key shaped like a made one but not one (too short a secret) is fingerprinted.
    assert shown_prefix("pk_1a2b3c_short-secret").startswith("sha256:")
