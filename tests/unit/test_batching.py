"""Continuous batching on the real tiny model: a turn's output is the same batched or alone,
and each turn keeps its own limits, sampling and cancellation inside a batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from app.schemas import ChatMessage
from worker.inference.engine import Engine, GenerationParams, GenerationResult, StepStats
from worker.inference.engine_types import NumericalError
from worker.inference.loader import LoadedModel, load_model
from worker.inference.model_init import build_model
from worker.inference.prompt import Prompt, build_prompt

MESSAGES = [
    "Hi",
    "Tell me about lighthouses and the people who kept them.",
    "¿Qué tal?",
    "实现多轮对话的原理",
    "A much longer message " * 12,
    "def f(x): return x * 2",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)))


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[Prompt]:
    history = [
        ChatMessage(role="user", content="Earlier question"),
        ChatMessage(role="assistant", content="Earlier answer"),
    ]
    return [
        build_prompt(
            loaded.tokenizer,
            system_prompt="Be brief." if i % 2 else None,
            history=history if i % 3 == 0 else [],
            message=message,
            max_context_tokens=loaded.max_context_tokens,
            max_new_tokens=64,
        )
        for i, message in enumerate(MESSAGES)
    ]


class Recorder:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, stats: StepStats) -> None:
        self.batch_sizes.append(stats.batch_size)


def _together(
    engine: Engine,
    prompts: list[Prompt],
    params: list[GenerationParams],
    cancel_when: Callable[[int], Callable[[], bool]] = lambda i: lambda: False,
) -> list[GenerationResult]:
    """Submit every turn from its own thread at once, as Celery's task threads do."""
    results: list[GenerationResult | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(prompts[i], params[i], should_cancel=cancel_when(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_greedy_output_is_the_same_batched_or_alone(
    loaded: LoadedModel, prompts: list[Prompt]
) -> None:
    recorder = Recorder()
    engine = Engine.in_process(loaded, max_batch=16, on_step=recorder)
    params = [GenerationParams(max_new_tokens=24 + 7 * i) for i in range(len(prompts))]
    alone = [engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    assert max(recorder.batch_sizes) == 1
    recorder.batch_sizes.clear()
    batched = _together(engine, prompts, params)
    assert max(recorder.batch_sizes) > 1, "the turns never shared a step"
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
    # Per-turn max_new_tokens held inside the batch.
    for result, param in zip(batched, params, strict=True):
        assert result.completion_tokens <= param.max_new_tokens


def test_prompts_prefilled_in_chunks_match_whole(
    loaded: LoadedModel, prompts: list[Prompt]
) -> None:
    # A budget of 8 prompt tokens a step: every prompt here is prefilled in chunks, one prompt
    # at a time in the staging slot, while the turns already in the batch go on decoding.
    assert min(len(p.input_ids) for p in prompts) > 8
    recorder = Recorder()
    chunked = Engine.in_process(loaded, max_batch=16, prefill_tokens=8, on_step=recorder)
    whole = Engine.in_process(loaded, max_batch=16)
    params = [GenerationParams(max_new_tokens=20 + 5 * i) for i in range(len(prompts))]
    alone = [whole.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    together = _together(chunked, prompts, params)
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]
    assert max(recorder.batch_sizes) > 1, "the turns never shared a step"


def test_turns_that_join_a_running_batch_match_alone(
    loaded: LoadedModel, prompts: list[Prompt]
) -> None:
    long_params = GenerationParams(max_new_tokens=300)
    short = GenerationParams(max_new_tokens=20)
    solo = Engine.in_process(loaded, max_batch=4)
    alone_long = solo.generate(prompts[1], long_params)
    alone_short = [solo.generate(p, short) for p in prompts[2:6]]

    # The short turns are submitted once the long one has decoded a step, and the loop is held
    # in that step until all four are queued: a turn polls should_cancel a second time only
    # after it has submitted its request and waited for it.
    recorder = Recorder()
    decoding = threading.Event()
    queued = threading.Event()
    polls = [0] * 4
    lock = threading.Lock()

    def on_step(stats: StepStats) -> None:
        recorder(stats)
        if len(recorder.batch_sizes) == 1:
            decoding.set()
            queued.wait(10)

    def cancel_when(i: int) -> Callable[[], bool]:
        def should_cancel() -> bool:
            with lock:
                polls[i] += 1
                if min(polls) >= 2:
                    queued.set()
            return False

        return should_cancel

    engine = Engine.in_process(loaded, max_batch=4, on_step=on_step)
    results: dict[str, GenerationResult] = {}

    def long_turn() -> None:
        results["long"] = engine.generate(prompts[1], long_params)

    thread = threading.Thread(target=long_turn)
    thread.start()
    assert decoding.wait(60), "the long turn never decoded a step"
    # Four more than the batch has room for beside the long one: some wait for a slot.
    joined = _together(engine, prompts[2:6], [short] * 4, cancel_when)
    thread.join(60)
    assert queued.is_set()
    assert results["long"].text == alone_long.text
    assert [r.text for r in joined] == [r.text for r in alone_short]

    # A step makes one token for each turn in it, and the long turn, first in, is in every
    # step up to its last; the steps before its last are all recorded once it has returned.
    sizes = recorder.batch_sizes
    before_last = results["long"].completion_tokens - 1
    short_tokens = sum(r.completion_tokens for r in joined)
    assert sizes[0] == 1, "the long turn did not decode alone first"
    assert max(sizes[:before_last]) == 4, "the batch never filled while the long turn ran"
    # Every short turn, the one that waited for a slot too, ran entirely beside the long one.
    assert sum(sizes[:before_last]) == before_last + short_tokens, sizes


def test_seeded_sampling_holds_inside_a_batch(loaded: LoadedModel, prompts: list[Prompt]) -> None:
    engine = Engine.in_process(loaded, max_batch=8)
    params = [
        GenerationParams(max_new_tokens=32, temperature=0.9, top_p=0.9, seed=100 + i)
        for i in range(len(prompts))
    ]
    alone = [engine.generate(p, q).text for p, q in zip(prompts, params, strict=True)]
    batched = [r.text for r in _together(engine, prompts, params)]
    assert batched == alone
    # A different seed gives a different reply (the seed is really used per turn).
    other = engine.generate(prompts[0], GenerationParams(32, temperature=0.9, top_p=0.9, seed=7))
    assert other.text != alone[0]


def test_cancelling_one_turn_leaves_the_others_untouched(
    loaded: LoadedModel, prompts: list[Prompt]
) -> None:
    engine = Engine.in_process(loaded, max_batch=8)
    params = [GenerationParams(max_new_tokens=200) for _ in prompts]
    alone = [engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    asked = threading.Event()

    def cancel_when(i: int) -> Callable[[], bool]:
        def should_cancel() -> bool:
            # Turn 1 is cancelled once it is under way (its first check passes).
            if i != 1:
                return False
            if asked.is_set():
                return True
            asked.set()
            return False

        return should_cancel

    results = _together(engine, prompts, params, cancel_when)
    assert results[1].finish_reason == "cancelled"
    assert results[1].completion_tokens < 200
    others = [r for i, r in enumerate(results) if i != 1]
    assert [r.text for r in others] == [r.text for i, r in enumerate(alone) if i != 1]


def test_time_cap_inside_a_batch(loaded: LoadedModel, prompts: list[Prompt]) -> None:
    engine = Engine.in_process(loaded, max_batch=8)
    params = [GenerationParams(max_new_tokens=1000, time_limit_s=0.2)] + [
        GenerationParams(max_new_tokens=40) for _ in prompts[1:]
    ]
    results = _together(engine, prompts, params)
    assert results[0].finish_reason == "time"
    assert all(r.finish_reason in ("length", "stop") for r in results[1:])


def test_a_conversations_next_turn_reuses_its_cache_with_the_same_output(
    loaded: LoadedModel,
) -> None:
    """Turn after turn of one conversation: the next prompt starts with the previous prompt
    and the ids the model generated, so the cached prefix matches through the last reply and
    only the rest is prefilled; greedy output is what a cold engine gives on that prompt."""
    warm = Engine.in_process(loaded, max_batch=4, prefix_cache_bytes=64 * 2**20)
    cold = Engine.in_process(loaded, max_batch=4)
    history: list[ChatMessage] = []
    spliced = 0
    for turn in range(6):
        message = f"Turn {turn}: and what happened next?"
        window = {
            "system_prompt": "Be brief.",
            "history": history,
            "message": message,
            "max_context_tokens": loaded.max_context_tokens,
            "max_new_tokens": 24,
        }
        last = warm.last_turn("conv_1")
        prompt = build_prompt(loaded.tokenizer, **window, last_turn=last)
        if last is not None:
            # The whole last turn, reply included, is a prefix of this one, and in the cache
            # (but the last token sampled, which was never run through the model).
            assert prompt.input_ids[: len(last.ids)] == last.ids
            cache = warm.prefix_cache
            assert cache is not None
            hit = cache.lookup("conv_1", prompt.input_ids)
            assert hit is not None and hit.shared >= len(last.ids) - 1
            plain = build_prompt(loaded.tokenizer, **window)
            spliced += plain.input_ids != prompt.input_ids
        params = GenerationParams(max_new_tokens=24)
        reused = warm.generate(prompt, params, prefix_key="conv_1")
        fresh = cold.generate(prompt, params)
        assert reused.text == fresh.text
        assert reused.completion_tokens == fresh.completion_tokens
        history += [
            ChatMessage(role="user", content=message),
            ChatMessage(role="assistant", content=reused.text),
        ]
    # The random model's replies re-encode to other ids: reuse needed the generated ones.
    assert spliced > 0
    cache = warm.prefix_cache
    assert cache is not None
    assert cache.hits >= 4, (cache.hits, cache.misses)


def test_next_turns_prefilled_together_each_after_its_own_cached_prefix_match_alone(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conversations whose next turns arrive together are prefilled in one forward pass, each
    row from the end of its own cached prefix (of another length than the others'); greedy
    output is still what a cold engine gives each prompt alone."""
    warm = Engine.in_process(loaded, max_batch=8, prefix_cache_bytes=64 * 2**20)
    cold = Engine.in_process(loaded, max_batch=8)
    params = GenerationParams(max_new_tokens=16)
    firsts = ["Hi", "Tell me about lighthouses.", "实现多轮对话", "A longer opening " * 6]
    window = loaded.max_context_tokens
    histories = []
    for i, message in enumerate(firsts):
        prompt = build_prompt(
            loaded.tokenizer,
            system_prompt=None,
            history=[],
            message=message,
            max_context_tokens=window,
            max_new_tokens=16,
        )
        reply = warm.generate(prompt, params, prefix_key=f"conv_{i}")
        histories.append(
            [
                ChatMessage(role="user", content=message),
                ChatMessage(role="assistant", content=reply.text),
            ]
        )
    nexts = [
        build_prompt(
            loaded.tokenizer,
            system_prompt=None,
            history=history,
            message=f"And then, {i}?",
            max_context_tokens=window,
            max_new_tokens=16,
            last_turn=warm.last_turn(f"conv_{i}"),
        )
        for i, history in enumerate(histories)
    ]
    starts_seen: list[list[int]] = []
    runner = warm._core._runner  # type: ignore[attr-defined]
    prefill, decode = runner.prefill, runner.decode
    in_step, go_on = threading.Event(), threading.Event()

    def recording(first: int, prompts: Any, starts: Any) -> Any:
        starts_seen.append(list(starts))
        return prefill(first, prompts, starts)

    def held_once(tokens: Any) -> Any:
        # The first step waits until every next turn has arrived: they are admitted together.
        in_step.set()
        go_on.wait(10)
        return decode(tokens)

    monkeypatch.setattr(runner, "prefill", recording)
    monkeypatch.setattr(runner, "decode", held_once)
    results: list[GenerationResult | None] = [None] * len(nexts)

    def run(i: int) -> None:
        results[i] = warm.generate(nexts[i], params, prefix_key=f"conv_{i}")

    blocker = threading.Thread(target=warm.generate, args=(nexts[0], params))
    blocker.start()
    assert in_step.wait(10)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nexts))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    go_on.set()
    for thread in (blocker, *threads):
        thread.join(60)
    alone = [cold.generate(prompt, params) for prompt in nexts]
    assert [r.text if r else None for r in results] == [r.text for r in alone]
    # At least one forward pass prefilled rows after cached prefixes of different lengths.
    assert any(len(set(starts)) > 1 and min(starts) > 0 for starts in starts_seen), starts_seen


def test_a_poison_turn_fails_alone_and_the_batch_goes_on(
    loaded: LoadedModel, prompts: list[Prompt]
) -> None:
    """A temperature so small that the scores overflow (the API refuses it; a stored job may
    still carry one) fails its own turn; the turns beside it end as they would alone."""
    recorder = Recorder()
    engine = Engine.in_process(loaded, max_batch=16, on_step=recorder)
    params = [GenerationParams(max_new_tokens=16) for _ in prompts]
    alone = [engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    poison = GenerationParams(max_new_tokens=16, temperature=1e-300)
    failures: list[BaseException] = []
    results: list[GenerationResult] = []

    def run_poison() -> None:
        try:
            engine.generate(prompts[0], poison)
        except BaseException as exc:
            failures.append(exc)

    recorder.batch_sizes.clear()
    thread = threading.Thread(target=run_poison)
    thread.start()
    results = _together(engine, prompts, params)
    thread.join(60)
    assert [type(f) for f in failures] == [NumericalError]
    assert max(recorder.batch_sizes) > 1
    assert [r.text for r in results] == [r.text for r in alone]
    # And the engine serves the next turn.
    assert engine.generate(prompts[1], params[1]).text == alone[1].text
