"""Generation on the real tiny model: limits, determinism, cancellation, storable text."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.inference import engine as engine_module
from worker.inference.engine import Engine, GenerationParams, decode_reply
from worker.inference.loader import LoadedModel, load_model
from worker.inference.model_init import build_model
from worker.inference.prompt import FALLBACK_ROLE_MARKERS, Prompt, build_prompt
from worker.inference.reply_text import decoded_reply


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)
    # device=None: the GPU when the machine has one, so the same tests cover both paths.
    return load_model(str(directory))


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Engine:
    return Engine.in_process(loaded)


@pytest.fixture(scope="module")
def prompt(loaded: LoadedModel) -> Prompt:
    return build_prompt(
        loaded.tokenizer,
        system_prompt="You are a helpful assistant.",
        history=[],
        message="Tell me about lighthouses.",
        max_context_tokens=loaded.max_context_tokens,
        max_new_tokens=64,
    )


def _steered(loaded: LoadedModel, token: str) -> Engine:
    """The tiny model with its last layer norm rewired so that greedy decoding emits `token`.

    With the norm's scale at zero its output is its bias; set to the token's embedding row,
    the tied output layer scores that token highest (its self-similarity beats every other
    row's). It is the real model and generate loop, made to produce a chosen token.
    """
    token_id = loaded.tokenizer.convert_tokens_to_ids(token)
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[token_id])
    return Engine.in_process(
        LoadedModel(model, loaded.tokenizer, loaded.device, loaded.max_context_tokens)
    )


def test_max_new_tokens_is_respected(engine: Engine, prompt: Prompt) -> None:
    result = engine.generate(prompt, GenerationParams(max_new_tokens=8))
    assert result.completion_tokens == 8
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(prompt.input_ids)
    assert result.text


def test_greedy_is_deterministic_and_ignores_seed(engine: Engine, prompt: Prompt) -> None:
    first = engine.generate(prompt, GenerationParams(max_new_tokens=32))
    assert engine.generate(prompt, GenerationParams(max_new_tokens=32, seed=5)) == first


def test_seeded_sampling_is_reproducible(engine: Engine, prompt: Prompt) -> None:
    params = GenerationParams(max_new_tokens=48, temperature=1.0, top_p=0.95, seed=7)
    torch.manual_seed(99)
    first = engine.generate(prompt, params)
    # The seeded turn must not disturb the process-wide RNG that other code relies on.
    after = torch.rand(2)
    torch.manual_seed(99)
    assert torch.equal(torch.rand(2), after)

    assert engine.generate(prompt, params) == first
    other = engine.generate(prompt, GenerationParams(max_new_tokens=48, temperature=1.0, seed=8))
    assert other.text != first.text


def test_cancelled_before_start_generates_nothing(engine: Engine, prompt: Prompt) -> None:
    result = engine.generate(
        prompt, GenerationParams(max_new_tokens=64), should_cancel=lambda: True
    )
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 0
    assert result.text == ""


def test_cancellation_stops_generation_early(engine: Engine, prompt: Prompt) -> None:
    calls: list[float] = []

    def should_cancel() -> bool:
        calls.append(time.monotonic())
        return len(calls) >= 2  # not at the start, at the next check

    max_new = engine.max_context_tokens - len(prompt.input_ids)
    result = engine.generate(prompt, GenerationParams(max_new), should_cancel=should_cancel)

    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < max_new
    assert len(calls) == 2
    # Throttled: a network call per token would be far more often than this.
    assert calls[1] - calls[0] >= engine_module.CANCEL_CHECK_INTERVAL_S


def test_time_cap_stops_with_reason_time(engine: Engine, prompt: Prompt) -> None:
    max_new = engine.max_context_tokens - len(prompt.input_ids)
    result = engine.generate(prompt, GenerationParams(max_new, time_limit_s=0.03))
    assert result.finish_reason == "time"
    assert 0 < result.completion_tokens < max_new


def test_reply_is_capped_by_the_context_window(engine: Engine, loaded: LoadedModel) -> None:
    filler = loaded.tokenizer.convert_tokens_to_ids("Ġthe")
    long_prompt = Prompt(input_ids=[filler] * (loaded.max_context_tokens - 5), context_messages=0)
    result = engine.generate(long_prompt, GenerationParams(max_new_tokens=100))
    assert result.completion_tokens == 5
    assert result.finish_reason == "length"


def test_a_prompt_filling_the_window_is_refused(engine: Engine, loaded: LoadedModel) -> None:
    full = Prompt(input_ids=[5] * loaded.max_context_tokens, context_messages=0)
    with pytest.raises(ValueError, match="no room"):
        engine.generate(full, GenerationParams(max_new_tokens=1))


@pytest.mark.parametrize("marker", ["<|end|>", "<|user|>", "<|system|>"])
def test_end_of_turn_and_role_tokens_stop_the_reply(
    loaded: LoadedModel, prompt: Prompt, marker: str
) -> None:
    result = _steered(loaded, marker).generate(prompt, GenerationParams(max_new_tokens=20))
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 1
    assert result.text == ""


def test_text_has_no_nul_even_when_the_model_emits_it(loaded: LoadedModel, prompt: Prompt) -> None:
    nul_byte = "Ā"  # byte-level BPE's symbol for the byte 0x00
    assert loaded.tokenizer.decode([loaded.tokenizer.convert_tokens_to_ids(nul_byte)]) == "\x00"
    result = _steered(loaded, nul_byte).generate(prompt, GenerationParams(max_new_tokens=10))
    assert result.completion_tokens == 10
    assert "\x00" not in result.text
    result.text.encode("utf-8")  # valid UTF-8: no lone surrogates


def test_sampled_text_is_storable(engine: Engine, prompt: Prompt) -> None:
    for seed in range(5):
        params = GenerationParams(max_new_tokens=64, temperature=1.5, seed=seed)
        text = engine.generate(prompt, params).text
        assert "\x00" not in text
        text.encode("utf-8")


def test_decode_reply_trims_at_role_tokens(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode("Fine, thanks.<|user|>\nAnd you?", add_special_tokens=False)
    stop_ids = {tokenizer.convert_tokens_to_ids("<|user|>")}
    assert decode_reply(tokenizer, ids, stop_ids=stop_ids) == ("Fine, thanks.", True)
    assert decode_reply(tokenizer, ids[:3], stop_ids=stop_ids) == (
        tokenizer.decode(ids[:3]).strip(),
        False,
    )


def test_decode_reply_trims_at_fallback_markers(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(" Sure thing.\nUser: and then?", add_special_tokens=False)
    text, stopped = decode_reply(tokenizer, ids, stop_ids=(), text_markers=FALLBACK_ROLE_MARKERS)
    assert (text, stopped) == ("Sure thing.", True)


def test_a_reply_stands_for_its_ids_unless_a_marker_cut_it(loaded: LoadedModel) -> None:
    # The ids kept for the next turn's prompt are those the stored text stands for whole.
    tokenizer = loaded.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    reply = tokenizer.encode(" Sure thing.", add_special_tokens=False)
    text, stopped, ids = decoded_reply(
        tokenizer, [*reply, end, 7], stop_ids={end}, text_markers=FALLBACK_ROLE_MARKERS
    )
    assert (text, stopped, ids) == ("Sure thing.", True, reply)
    cut = tokenizer.encode(" Sure thing.\nUser: and then?", add_special_tokens=False)
    _, stopped, ids = decoded_reply(
        tokenizer, cut, stop_ids={end}, text_markers=FALLBACK_ROLE_MARKERS
    )
    assert stopped and ids is None


def test_decode_reply_replaces_invalid_utf8(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    # The first byte of a three-byte character, cut off as max_new_tokens would cut it.
    partial = tokenizer.convert_tokens_to_ids("ä")
    text, _ = decode_reply(tokenizer, [partial], stop_ids=())
    assert text == "\ufffd"


def test_engine_serves_a_model_without_chat_template(loaded: LoadedModel) -> None:
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = None
    plain = LoadedModel(loaded.model, tokenizer, loaded.device, loaded.max_context_tokens)
    prompt = build_prompt(
        tokenizer,
        system_prompt=None,
        history=[],
        message="Hello",
        max_context_tokens=plain.max_context_tokens,
        max_new_tokens=32,
    )
    result = Engine.in_process(plain).generate(prompt, GenerationParams(max_new_tokens=32))
    assert result.finish_reason in ("stop", "length")
    assert not any(marker.strip() in result.text for marker in FALLBACK_ROLE_MARKERS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 8, "temperature": -0.1},
        {"max_new_tokens": 8, "top_p": 0.0},
        {"max_new_tokens": 8, "time_limit_s": 0.0},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GenerationParams(**kwargs)
