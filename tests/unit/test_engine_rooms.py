"""The engine's rooms one at a time: request state, stop rules, the scheduler's admission and
grouping, the cache manager's join/select/trim (against plain torch), the sampler's top_p,
and the loop failing requests rather than leaving them waiting."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker.inference.engine import Engine, GenerationParams
from worker.inference.kv_cache import BatchCache
from worker.inference.loader import LoadedModel, load_model
from worker.inference.model_init import build_model
from worker.inference.prefix_cache import Layers, PrefixCache
from worker.inference.prompt import Prompt
from worker.inference.request import GenerationRequest, RequestStatus
from worker.inference.sampler import NO_TOKEN, Sampler, sample_row
from worker.inference.scheduler import Scheduler, similar_lengths
from worker.inference.stopping import StopRules

CPU = torch.device("cpu")


def _request(length: int = 4, **params: Any) -> GenerationRequest:
    settings = {"max_new_tokens": 8, **params}
    return GenerationRequest(list(range(1, length + 1)), GenerationParams(**settings), 8)


# -- request state and stop rules ---------------------------------------------------------


def test_a_request_ends_once() -> None:
    request = _request()
    assert request.status.value == "waiting"  # (`is` would narrow the type past start())
    assert not request.wait(0)
    request.start()
    assert request.status is RequestStatus.RUNNING
    request.finish("length")
    request.fail(RuntimeError("the batch failed after it ended"))
    request.finish("stop")
    assert request.wait(0)
    assert (request.status, request.finish_reason, request.error) == (
        RequestStatus.FINISHED,
        "length",
        None,
    )
    failed = _request()
    failed.fail(error := RuntimeError("boom"))
    failed.finish("stop")
    assert (failed.status, failed.finish_reason, failed.error) == (
        RequestStatus.FAILED,
        None,
        error,
    )


def test_stop_rules_in_order_of_precedence() -> None:
    rules = StopRules(frozenset({0}), check=lambda r: r.generated[-1] == 7)
    now = time.monotonic()
    request = _request(time_limit_s=1.0)
    request.generated = [5]
    assert rules.finish_reason(request, 5, now) is None
    assert rules.finish_reason(request, 5, now + 2) == "time"
    request.generated = [5] * 8
    assert rules.finish_reason(request, 5, now + 2) == "length"
    assert rules.finish_reason(request, 0, now + 2) == "stop"
    request.generated = [7]
    assert rules.finish_reason(request, 7, now) == "stop"
    request.cancel()
    assert rules.finish_reason(request, 0, now + 2) == "cancelled"


# -- scheduler ----------------------------------------------------------------------------


def test_cold_prompts_are_grouped_by_similar_length() -> None:
    # A group takes prompts up to 1.25 times its shortest plus 16 tokens: 66 for 40.
    requests = [_request(n) for n in (50, 900, 40, 1000, 66, 67, 200)]
    groups = similar_lengths(requests)
    assert [[len(r.input_ids) for r in group] for group in groups] == [
        [40, 50, 66],
        [67],
        [200],
        [900, 1000],
    ]


def test_admission_fills_the_batch_and_no_more() -> None:
    scheduler = Scheduler(max_batch=3)
    requests = [_request(10 + i) for i in range(4)]
    for request in requests:
        scheduler.submit(request)
    first = [r for group in scheduler.schedule(running=1) for r in group.requests]
    assert first == requests[:2]
    assert all(r.status is RequestStatus.RUNNING for r in first)
    assert scheduler.schedule(running=3) == []  # full: nothing admitted, and no waiting
    rest = [r for group in scheduler.schedule(running=0) for r in group.requests]
    assert rest == requests[2:]


def test_requests_that_end_while_waiting_are_never_admitted() -> None:
    scheduler = Scheduler(max_batch=8)
    cancelled, expired, live = _request(), _request(time_limit_s=0.01), _request()
    cancelled.cancel()
    for request in (cancelled, expired, live):
        scheduler.submit(request)
    time.sleep(0.02)
    groups = scheduler.schedule(running=0)
    assert [group.requests for group in groups] == [[live]]
    assert (cancelled.status, cancelled.finish_reason) == (RequestStatus.FINISHED, "cancelled")
    assert (expired.status, expired.finish_reason) == (RequestStatus.FINISHED, "time")


def test_a_cached_prefix_is_prefilled_alone_and_first() -> None:
    cache = PrefixCache(max_bytes=2**20)
    layers = [(torch.zeros(1, 2, 30, 4), torch.zeros(1, 2, 30, 4))]
    cache.store("conv", list(range(1, 31)), layers)
    scheduler = Scheduler(max_batch=8, prefix_cache=cache)
    cold_a, cold_b = _request(12), _request(14)
    warm = GenerationRequest(
        list(range(1, 41)), GenerationParams(max_new_tokens=8), 8, prefix_key="conv"
    )
    for request in (cold_a, warm, cold_b):
        scheduler.submit(request)
    groups = scheduler.schedule(running=0)
    assert [group.requests for group in groups] == [[warm], [cold_a, cold_b]]
    assert groups[0].hit is not None and groups[0].hit.shared == 30
    assert groups[1].hit is None


def test_wake_returns_from_a_waiting_schedule() -> None:
    scheduler = Scheduler(max_batch=2)
    returned: list[list[Any]] = []
    waiting = threading.Thread(
        target=lambda: returned.append(scheduler.schedule(running=0)), daemon=True
    )
    waiting.start()
    # With nothing running and nothing waiting, schedule blocks...
    waiting.join(0.1)
    assert waiting.is_alive(), "schedule(running=0) returned with nothing to admit"
    # ...until woken, and then admits nothing.
    scheduler.wake()
    waiting.join(5)
    assert not waiting.is_alive(), "wake did not end a waiting schedule"
    assert returned == [[]]


# -- the cache manager, against plain torch -----------------------------------------------


def _random_layers(length: int, seed: int) -> Layers:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, 2, length, 3, generator=generator),
            torch.randn(1, 2, length, 3, generator=generator),
        )
        for _ in range(2)
    ]


def _left_padded(lengths: list[int], width: int) -> torch.Tensor:
    return torch.stack([F.pad(torch.ones(n, dtype=torch.long), (width - n, 0)) for n in lengths])


def _assert_rows(cache: BatchCache, expected: list[Layers]) -> None:
    for row, layers in enumerate(expected):
        length, got = cache.row_prefix(row)
        assert length == layers[0][0].shape[-2]
        for (k, v), (want_k, want_v) in zip(got, layers, strict=True):
            assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_join_left_pads_select_keeps_rows_and_trims_shared_padding() -> None:
    rows = {5: _random_layers(5, 0), 3: _random_layers(3, 1), 4: _random_layers(4, 2)}
    batch = BatchCache.after_prefix(rows[5], 5, device=CPU)
    for n in (3, 4):
        batch.join(BatchCache.after_prefix(rows[n], n, device=CPU))
    args = batch.forward_args(2)
    assert torch.equal(args["attention_mask"], _left_padded([5, 3, 4], 5))
    # Positions count real tokens only: a padded row sees the positions it would alone.
    assert args["position_ids"].tolist() == [[3, 4], [1, 2], [2, 3]]
    _assert_rows(batch, [rows[5], rows[3], rows[4]])

    batch.select([2, 1])  # the row of 5 leaves: one column is padding in both others
    assert batch.rows == 2
    assert torch.equal(batch.forward_args(1)["attention_mask"], _left_padded([4, 3], 4))
    _assert_rows(batch, [rows[4], rows[3]])

    batch.extend()
    assert torch.equal(batch.forward_args(1)["attention_mask"], _left_padded([5, 4], 5))


def test_prompts_are_left_padded_with_the_pad_token() -> None:
    ids, batch = BatchCache.for_prompts([[7, 8, 9], [5]], pad_token_id=0, device=CPU)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    args = batch.forward_args(3)
    assert args["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert args["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


# -- sampler ------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    generator = torch.Generator().manual_seed(0)
    params = GenerationParams(max_new_tokens=1, temperature=1.0, top_p=0.7)
    draws = [int(sample_row(logits, params, generator)[0]) for _ in range(2000)]
    assert set(draws) == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert 0.55 < draws.count(1) / len(draws) < 0.70  # renormalised: 0.5 / 0.8
    narrow = GenerationParams(max_new_tokens=1, temperature=1.0, top_p=0.01)
    assert {int(sample_row(logits, narrow, generator)[0]) for _ in range(50)} == {1}


def test_a_row_with_no_valid_distribution_gets_no_token_and_the_others_do() -> None:
    sampler = Sampler(CPU)
    good = torch.tensor([[0.0, 5.0, 0.0]])
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])
    greedy = GenerationParams(max_new_tokens=4)
    # A temperature this small overflows the scores to infinity: softmax gives NaN.
    tiny = GenerationParams(max_new_tokens=4, temperature=1e-300)
    requests = [GenerationRequest([1], p, 4) for p in (greedy, greedy, tiny, greedy)]
    for request in requests:
        sampler.prepare(request)
    parts = [torch.cat([good, nan]), torch.cat([good, good])]
    assert sampler.sample(parts, requests) == [1, NO_TOKEN, NO_TOKEN, 1]


def test_sampler_rows_keep_their_own_settings_across_parts() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))

    def run() -> tuple[list[int], list[GenerationRequest]]:
        requests = [
            _request(),
            _request(temperature=1.0, seed=1),
            _request(temperature=1.0, seed=2),
        ]
        sampler = Sampler(CPU)
        for request in requests:
            sampler.prepare(request)
        draws = [sampler.sample([logits[:1], logits[1:]], requests) for _ in range(5)]
        return [token for step in draws for token in step], requests

    first, requests = run()
    assert requests[0].generator is None  # greedy: no random stream
    assert first[0::3] == [int(logits[0].argmax())] * 5
    assert run()[0] == first  # seeded rows draw the same tokens again
    with pytest.raises(ValueError):
        Sampler(CPU).sample([logits], requests[:2])


# -- the loop: a failure fails its requests, and the loop goes on ------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)))


class _Flaky:
    """The real model, but each forward pass raises while `failing` is set."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.generation_config = model.generation_config
        self.failing = True

    def __call__(self, **kwargs: Any) -> Any:
        if self.failing:
            raise RuntimeError("the device fell over")
        return self.model(**kwargs)


def _generate_within(engine: Engine, prompt: Prompt, seconds: float) -> Any:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(engine.generate(prompt, GenerationParams(max_new_tokens=6)))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "the request was left waiting"
    return outcome[0]


def test_a_failed_prefill_fails_its_request_and_the_loop_goes_on(loaded: LoadedModel) -> None:
    flaky = _Flaky(loaded.model)
    engine = Engine(LoadedModel(flaky, loaded.tokenizer, loaded.device, loaded.max_context_tokens))
    assert engine.running == 0 and engine.prefix_cache is None
    prompt = Prompt(input_ids=list(range(20, 40)), context_messages=0)
    failed = _generate_within(engine, prompt, 10)
    assert isinstance(failed, RuntimeError) and "fell over" in str(failed)
    flaky.failing = False
    assert _generate_within(engine, prompt, 10) == Engine(loaded).generate(
        prompt, GenerationParams(max_new_tokens=6)
    )
