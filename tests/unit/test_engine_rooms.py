"""The engine's rooms one at a time: request state, stop rules, the scheduler's admission and
grouping, the cache manager's join/select/trim (against plain torch), the sampler's top_p,
and the loop failing requests rather than leaving them waiting."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from worker.inference.engine import Engine, GenerationParams
from worker.inference.kv_cache import SlotCache
from worker.inference.loader import LoadedModel, load_model
from worker.inference.model_init import build_model
from worker.inference.prefix_cache import Layers, PrefixCache
from worker.inference.prompt import Prompt
from worker.inference.request import GenerationRequest, RequestStatus
from worker.inference.sampler import NO_TOKEN, Sampler, sample_row
from worker.inference.scheduler import Admitted, Scheduler, similar_lengths, within
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
    admitted = [Admitted(_request(n), None) for n in (50, 900, 40, 1000, 66, 67, 200)]
    groups = similar_lengths(admitted)
    assert [[m.new_tokens for m in group] for group in groups] == [
        [40, 50, 66],
        [67],
        [200],
        [900, 1000],
    ]


def test_admission_fills_the_batch_and_no_more() -> None:
    scheduler = Scheduler(max_batch=3, prefill_tokens=512)
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
    scheduler = Scheduler(max_batch=8, prefill_tokens=512)
    cancelled, expired, live = _request(), _request(time_limit_s=0.01), _request()
    cancelled.cancel()
    for request in (cancelled, expired, live):
        scheduler.submit(request)
    time.sleep(0.02)
    groups = scheduler.schedule(running=0)
    assert [group.requests for group in groups] == [[live]]
    assert (cancelled.status, cancelled.finish_reason) == (RequestStatus.FINISHED, "cancelled")
    assert (expired.status, expired.finish_reason) == (RequestStatus.FINISHED, "time")


def test_requests_are_grouped_by_what_they_prefill_after_their_cached_prefix() -> None:
    cache = PrefixCache(max_bytes=2**20)
    layers = [(torch.zeros(1, 2, 30, 4), torch.zeros(1, 2, 30, 4))]
    cache.store("conv", list(range(1, 31)), layers)
    scheduler = Scheduler(max_batch=8, prefill_tokens=512, prefix_cache=cache)
    cold_short, cold_long = _request(12), _request(40)
    # 40 tokens, 30 of them cached: it prefills 10, and goes with the 12, not with the 40.
    warm = GenerationRequest(
        list(range(1, 41)), GenerationParams(max_new_tokens=8), 8, prefix_key="conv"
    )
    for request in (cold_long, warm, cold_short):
        scheduler.submit(request)
    groups = scheduler.schedule(running=0)
    assert [group.requests for group in groups] == [[warm, cold_short], [cold_long]]
    hits = [member.hit for member in groups[0].members]
    assert hits[0] is not None and hits[0].shared == 30 and hits[1] is None


def test_wake_returns_from_a_waiting_schedule() -> None:
    scheduler = Scheduler(max_batch=2, prefill_tokens=512)
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


# -- the slot cache, against plain torch --------------------------------------------------


def _random_layers(length: int, seed: int) -> Layers:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, 2, length, 3, generator=generator),
            torch.randn(1, 2, length, 3, generator=generator),
        )
        for _ in range(2)
    ]


def _prefilled(rows: list[Layers], *, slots: int = 4) -> SlotCache:
    """A slot cache whose slots 0.. hold ``rows``, written as a model's forward passes would."""
    cache = SlotCache(slots=slots, capacity=16, device=CPU)
    for slot, layers in enumerate(rows):
        length = layers[0][0].shape[-2]
        view = cache.prefill_args(slot, [0], length)["cache"]
        for index, (k, v) in enumerate(layers):
            view.update(k, v, index)
        cache.lengths[slot] = length
    return cache


def _assert_rows(cache: SlotCache, expected: list[Layers]) -> None:
    for row, layers in enumerate(expected):
        length, got = cache.row_prefix(row)
        assert length == layers[0][0].shape[-2]
        for (k, v), (want_k, want_v) in zip(got, layers, strict=True):
            assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_a_decoding_step_writes_each_row_at_its_own_length() -> None:
    rows = [_random_layers(n, seed) for seed, n in enumerate((5, 3, 4))]
    cache = _prefilled(rows)
    args = cache.decode_args(3)
    # Each row sees its own tokens and the one it writes now; positions are its own counts.
    assert args["position_ids"].tolist() == [[5], [3], [4]]
    assert args["attention_mask"][:, 0, 0].int().tolist() == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ]
    new = torch.randn(3, 2, 1, 3)
    keys, _ = args["cache"].update(new, new, 0)
    assert keys.shape == (3, 2, 6, 3)
    for row, length in enumerate((5, 3, 4)):
        assert torch.equal(keys[row, :, length], new[row, :, 0])
        assert torch.equal(keys[row, :, :length], rows[row][0][0][0])


def test_a_prefill_is_causal_from_the_tokens_already_in_its_slot() -> None:
    cache = _prefilled([_random_layers(2, 0)])
    args = cache.prefill_args(0, [2], 3)
    assert args["position_ids"].tolist() == [[2, 3, 4]]
    assert args["attention_mask"][0, 0].int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    with pytest.raises(ValueError, match="capacity"):
        cache.prefill_args(0, [2], 15)


def test_rows_of_one_prefill_each_start_after_their_own_cached_tokens() -> None:
    rows = [_random_layers(n, seed) for seed, n in enumerate((2, 4))]
    cache = _prefilled(rows)
    args = cache.prefill_args(0, [2, 4], 2)
    assert args["position_ids"].tolist() == [[2, 3], [4, 5]]
    assert args["attention_mask"][:, 0].int().tolist() == [
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
        [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
    ]
    new = torch.randn(2, 2, 2, 3)
    keys, values = args["cache"].update(new, new, 0)
    assert keys.shape == (2, 2, 6, 3)
    for row, start in enumerate((2, 4)):
        # Its cached tokens kept, its new ones after them, each row in its own slot.
        assert torch.equal(keys[row, :, :start], rows[row][0][0][0])
        assert torch.equal(keys[row, :, start : start + 2], new[row])
        assert torch.equal(values[row, :, start : start + 2], new[row])


def test_leaving_rows_are_replaced_by_the_last_ones_in_place() -> None:
    rows = [_random_layers(n, seed) for seed, n in enumerate((5, 3, 4, 2))]
    cache = _prefilled(rows)
    order = cache.compact([0, 2, 3])  # row 1 leaves: the last row takes its slot
    assert order == [0, 3, 2]
    _assert_rows(cache, [rows[0], rows[3], rows[2]])
    assert cache.compact([1]) == [1]  # only the middle row stays: it moves to slot 0
    _assert_rows(cache, [rows[3]])


def test_a_cached_prefix_loads_into_a_slot() -> None:
    cache = _prefilled([_random_layers(3, 0)])
    prefix = _random_layers(4, 9)
    assert cache.load_prefix(2, prefix, 4)
    length, got = cache.row_prefix(2)
    assert length == 4 and all(
        torch.equal(k, want_k) for (k, _), (want_k, _) in zip(got, prefix, strict=True)
    )
    assert not SlotCache(slots=2, capacity=8, device=CPU).load_prefix(0, prefix, 4)


def test_a_kept_prefix_is_copied_into_the_buffers_it_replaces_when_they_have_room() -> None:
    rows = [_random_layers(5, 0), _random_layers(9, 1)]
    cache = _prefilled(rows)
    length, kept = cache.row_prefix(0)
    assert length == 5 and kept[0][0].shape == (1, 2, 5, 3)
    # Its buffers have room to grow (up to the slot's 16 columns): the next copy goes there.
    length, again = cache.row_prefix(1, reuse=kept)
    assert length == 9 and again[0][0].shape == (1, 2, 9, 3)
    assert again[0][0].data_ptr() == kept[0][0].data_ptr()
    for (k, v), (want_k, want_v) in zip(again, rows[1], strict=True):
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
    # Buffers without room for the row are left alone.
    small = _random_layers(3, 2)
    length, fresh = cache.row_prefix(1, reuse=small)
    assert fresh[0][0].data_ptr() != small[0][0].data_ptr()
    assert torch.equal(fresh[0][0], rows[1][0][0]) and torch.equal(
        small[0][0], _random_layers(3, 2)[0][0]
    )


def test_a_store_past_the_budget_drops_what_was_kept_for_its_key() -> None:
    """A store may have been copied into the key's kept buffers: what they held is gone."""
    cache = PrefixCache(max_bytes=4096)
    small = [(torch.zeros(1, 2, 20, 4), torch.zeros(1, 2, 20, 4))]  # 1,280 bytes
    cache.store("conv", list(range(20)), small)
    assert cache.kept("conv") is small
    # A view counts its whole buffer: 2 x 2 x 200 x 4 floats, past the budget.
    buffer = torch.zeros(1, 2, 200, 4)
    cache.store("conv", list(range(30)), [(buffer[:, :, :30], buffer[:, :, :30])])
    assert cache.kept("conv") is None
    assert cache.lookup("conv", list(range(40))) is None


def test_groups_are_cut_to_the_prefill_budget() -> None:
    admitted = [Admitted(_request(n), None) for n in (10, 10, 12, 30, 600)]
    parts = within(admitted, 40)
    assert [[m.new_tokens for m in part] for part in parts] == [[10, 10, 12], [30], [600]]


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
    engine = Engine.in_process(
        LoadedModel(flaky, loaded.tokenizer, loaded.device, loaded.max_context_tokens)
    )
    assert engine.running == 0 and engine.prefix_cache is None
    prompt = Prompt(input_ids=list(range(20, 40)), context_messages=0)
    failed = _generate_within(engine, prompt, 10)
    assert isinstance(failed, RuntimeError) and "fell over" in str(failed)
    flaky.failing = False
    assert _generate_within(engine, prompt, 10) == Engine.in_process(loaded).generate(
        prompt, GenerationParams(max_new_tokens=6)
    )


def test_a_worker_window_shorter_than_the_models_bounds_its_cache(loaded: LoadedModel) -> None:
    # WORKER_MAX_CONTEXT_TOKENS lowers max_context_tokens: slots hold that many tokens, and
    # a prompt that fills them leaves no room for a reply.
    short = LoadedModel(loaded.model, loaded.tokenizer, loaded.device, 64)
    engine = Engine.in_process(short, max_batch=2)
    fits = engine.generate(Prompt(list(range(20, 80)), 0), GenerationParams(max_new_tokens=50))
    assert fits.prompt_tokens == 60 and fits.completion_tokens <= 4
    with pytest.raises(ValueError, match="no room"):
        engine.generate(Prompt(list(range(20, 84)), 0), GenerationParams(max_new_tokens=4))
    engine.close()
