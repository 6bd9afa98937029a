"""The engine in a process of its own (as a worker runs it) generates what the engine in the
caller's process does, streams, cancels, keeps conversations' prefixes, and fails its turns in
flight, telling the worker, when that process dies."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.schemas import ChatMessage
from worker.inference.engine import Engine, GenerationParams
from worker.inference.engine_process import (
    EngineLost,
    EngineProcess,
    EngineSpec,
    start_engine_process,
)
from worker.inference.loader import load_model
from worker.inference.model_init import build_model
from worker.inference.prompt import Prompt, build_prompt

GREEDY = GenerationParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0))


@pytest.fixture(scope="module")
def remote(model_dir: str) -> Iterator[Engine]:
    engine = start_engine_process(
        EngineSpec(model_id=model_dir, max_batch=8, prefix_cache_bytes=64 * 2**20)
    )
    yield engine
    engine.close()


def _prompts(engine: Engine, count: int) -> list[Prompt]:
    return [
        build_prompt(
            engine.tokenizer,
            system_prompt="Be brief.",
            history=[],
            message=f"Question number {i}: what is a lighthouse for?",
            max_context_tokens=engine.max_context_tokens,
            max_new_tokens=GREEDY.max_new_tokens,
        )
        for i in range(count)
    ]


def test_greedy_turns_match_the_engine_in_this_process(model_dir: str, remote: Engine) -> None:
    local = Engine.in_process(load_model(model_dir), max_batch=8)
    prompts = _prompts(remote, 6)
    shown: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    with ThreadPoolExecutor(len(prompts)) as pool:  # together: they share the batch there
        results = list(
            pool.map(
                lambda i: remote.generate(prompts[i], GREEDY, on_text=shown[i].append),
                range(len(prompts)),
            )
        )
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        assert result == local.generate(prompt, GREEDY)
        assert result.completion_tokens > 0
        assert "".join(shown[i]) == result.text  # streamed from there, whole here
        assert result.time_to_first_token_s is not None
    local.close()


def test_a_conversation_next_turn_reuses_its_prefix_there(remote: Engine) -> None:
    first_prompt = _prompts(remote, 1)[0]
    key = "conv_engine_process"
    first = remote.generate(first_prompt, GREEDY, prefix_key=key)
    last = remote.last_turn(key)
    assert last is not None and last.reply == first.text
    assert last.ids[: len(first_prompt.input_ids)] == first_prompt.input_ids
    counts = remote.prefix_cache
    assert counts is not None
    hits_before = counts.hits
    second_prompt = build_prompt(
        remote.tokenizer,
        system_prompt="Be brief.",
        history=[
            ChatMessage(role="user", content="Question number 0: what is a lighthouse for?"),
            ChatMessage(role="assistant", content=first.text),
        ],
        message="And who keeps it?",
        max_context_tokens=remote.max_context_tokens,
        max_new_tokens=GREEDY.max_new_tokens,
        last_turn=last,
    )
    remote.generate(second_prompt, GREEDY, prefix_key=key)
    deadline = time.monotonic() + 5  # the counts come with the engine process's next report
    while counts.hits == hits_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counts.hits == hits_before + 1


def test_a_cancel_reaches_the_turn_there(remote: Engine) -> None:
    cancel = threading.Event()
    endless = GenerationParams(max_new_tokens=10_000, time_limit_s=60)
    long_prompt = _prompts(remote, 1)[0]
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    result = remote.generate(long_prompt, endless, should_cancel=cancel.is_set)
    assert result.finish_reason == "cancelled"
    assert time.monotonic() - started < 5


def test_turns_in_flight_fail_and_the_worker_is_told_when_the_engine_process_dies(
    model_dir: str,
) -> None:
    lost = threading.Event()
    engine = start_engine_process(EngineSpec(model_id=model_dir), on_lost=lost.set)
    core = engine._core
    assert isinstance(core, EngineProcess) and core.pid is not None
    prompt = _prompts(engine, 1)[0]
    endless = GenerationParams(max_new_tokens=10_000, time_limit_s=60)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.generate, prompt, endless)
        deadline = time.monotonic() + 10
        while core.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(core.pid, signal.SIGKILL)
        with pytest.raises(EngineLost):
            running.result(timeout=10)
    assert lost.wait(5)
    with pytest.raises(EngineLost):  # and later turns fail at once, not hang
        engine.generate(prompt, GREEDY)
    engine.close()


def test_a_model_that_does_not_load_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="could not load the model"):
        start_engine_process(EngineSpec(model_id=str(tmp_path)))


def test_an_error_there_is_stored_by_its_name_there() -> None:
    from worker.inference.engine_process import _error
    from worker.turn_worker.run_turn import failure_name

    failure = _error("IndexError", "index out of range")
    assert isinstance(failure, Exception) and str(failure) == "IndexError: index out of range"
    assert failure_name(failure) == "IndexError"
    assert failure_name(ValueError("here")) == "ValueError"
