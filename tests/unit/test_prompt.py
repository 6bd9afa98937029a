"""Chat rendering and the context window, on the real tiny tokenizer."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.schemas import ChatMessage
from worker.inference.model_init import build_model
from worker.inference.prompt import (
    Prompt,
    PromptTooLong,
    Transcript,
    build_prompt,
    render_chat,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = build_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def plain_tokenizer(tokenizer: Any) -> Any:
    """The same tokenizer as a base model would ship it: no chat template."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def _conversation(turns: int) -> list[ChatMessage]:
    history: list[ChatMessage] = []
    for i in range(turns):
        history.append(ChatMessage(role="user", content=f"question number {i} about the harbour"))
        history.append(
            ChatMessage(role="assistant", content=f"answer number {i}, with some detail")
        )
    return history


def _build(tokenizer: Any, history: list[ChatMessage], max_context_tokens: int) -> Prompt:
    return build_prompt(
        tokenizer,
        system_prompt="You are terse.",
        history=history,
        message="the newest question",
        max_context_tokens=max_context_tokens,
        max_new_tokens=16,
    )


def _text(tokenizer: Any, prompt: Prompt) -> str:
    return str(tokenizer.decode(prompt.input_ids))


def test_render_chat_uses_the_model_template(tokenizer: Any) -> None:
    rendered = render_chat(tokenizer, [{"role": "user", "content": "Hello"}])
    assert rendered == "<|user|>\nHello<|end|>\n<|assistant|>\n"


def test_render_chat_falls_back_without_a_template(plain_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert render_chat(plain_tokenizer, messages) == (
        "Be kind.\n\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    )


def test_prompt_with_fallback_template_is_the_plain_transcript(plain_tokenizer: Any) -> None:
    prompt = _build(plain_tokenizer, _conversation(1), max_context_tokens=1024)
    assert _text(plain_tokenizer, prompt) == (
        "You are terse.\n\nUser: question number 0 about the harbour\n"
        "Assistant: answer number 0, with some detail\nUser: the newest question\nAssistant:"
    )
    assert prompt.context_messages == 2


def test_everything_fits_in_a_large_window(tokenizer: Any) -> None:
    history = _conversation(3)
    prompt = _build(tokenizer, history, max_context_tokens=1024)
    assert prompt.context_messages == 6
    expected = render_chat(
        tokenizer,
        [{"role": "system", "content": "You are terse."}]
        + [{"role": m.role, "content": m.content} for m in history]
        + [{"role": "user", "content": "the newest question"}],
    )
    assert prompt.input_ids == tokenizer.encode(expected, add_special_tokens=False)


def test_window_drops_oldest_whole_turns_first(tokenizer: Any) -> None:
    history = _conversation(10)
    whole = len(_build(tokenizer, history, max_context_tokens=1024).input_ids)
    # Room for roughly half of the conversation.
    prompt = _build(tokenizer, history, max_context_tokens=whole // 2 + 16)

    kept = prompt.context_messages
    assert 0 < kept < len(history)
    assert kept % 2 == 0, "a turn is dropped with its reply, never half of it"
    text = _text(tokenizer, prompt)
    assert text.startswith("<|system|>\nYou are terse.<|end|>\n<|user|>\n")
    assert text.endswith("<|user|>\nthe newest question<|end|>\n<|assistant|>\n")
    first_kept = (len(history) - kept) // 2
    for i in range(10):
        assert (f"question number {i} " in text) == (i >= first_kept)
        assert (f"answer number {i}," in text) == (i >= first_kept)
    assert len(prompt.input_ids) <= whole // 2


def test_window_keeps_as_many_turns_as_fit(tokenizer: Any) -> None:
    history = _conversation(10)
    window = len(_build(tokenizer, history, max_context_tokens=1024).input_ids) // 2
    prompt = _build(tokenizer, history, max_context_tokens=window)
    assert 0 < prompt.context_messages < len(history)
    assert len(prompt.input_ids) <= window - 16
    one_more = history[len(history) - prompt.context_messages - 2 :]
    longer = _build(tokenizer, one_more, max_context_tokens=1024)
    assert len(longer.input_ids) > window - 16


def test_window_never_starts_with_an_orphan_reply(tokenizer: Any) -> None:
    # A greeting before the first question and two questions in a row (the reply to the
    # first failed): the kept history must still begin with a user message.
    history = [
        ChatMessage(role="assistant", content="Welcome aboard, how can I help?"),
        ChatMessage(role="user", content="first question"),
        ChatMessage(role="user", content="first question, asked again"),
        ChatMessage(role="assistant", content="first answer"),
        ChatMessage(role="user", content="second question"),
        ChatMessage(role="assistant", content="second answer"),
    ]
    whole = len(_build(tokenizer, history, max_context_tokens=1024).input_ids)
    for budget in range(whole - 1, 0, -1):
        try:
            prompt = _build(tokenizer, history, max_context_tokens=budget + 16)
        except PromptTooLong:
            break
        kept = history[len(history) - prompt.context_messages :]
        assert not kept or kept[0].role == "user", budget
    assert prompt.context_messages == 0


def test_system_prompt_and_message_are_always_kept(tokenizer: Any) -> None:
    alone = _build(tokenizer, [], max_context_tokens=1024)
    prompt = _build(tokenizer, _conversation(20), max_context_tokens=len(alone.input_ids) + 16)
    assert prompt.context_messages == 0
    assert prompt.input_ids == alone.input_ids


def test_prompt_too_long_when_system_and_message_do_not_fit(tokenizer: Any) -> None:
    alone = len(_build(tokenizer, [], max_context_tokens=1024).input_ids)
    with pytest.raises(PromptTooLong) as raised:
        _build(tokenizer, _conversation(3), max_context_tokens=alone + 15)
    assert raised.value.prompt_tokens == alone
    assert raised.value.budget == alone - 1


def test_no_system_prompt(tokenizer: Any) -> None:
    prompt = build_prompt(
        tokenizer,
        system_prompt=None,
        history=[],
        message="hello",
        max_context_tokens=64,
        max_new_tokens=8,
    )
    assert _text(tokenizer, prompt) == "<|user|>\nhello<|end|>\n<|assistant|>\n"


def test_same_inputs_give_same_ids(tokenizer: Any) -> None:
    history = _conversation(30)
    first = _build(tokenizer, history, max_context_tokens=400)
    assert _build(tokenizer, list(history), max_context_tokens=400) == first


class _CountingTokenizer:
    """The real tokenizer, counting how often a whole prompt is tokenized."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.encodes = 0

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.encodes += 1
        return self._inner.encode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_long_history_is_tokenized_a_logarithmic_number_of_times(tokenizer: Any) -> None:
    counting = _CountingTokenizer(tokenizer)
    prompt = _build(counting, _conversation(500), max_context_tokens=1024)
    assert 0 < prompt.context_messages < 1000
    assert counting.encodes <= 2 + 10  # full, shortest, then log2(500) steps


def test_max_new_tokens_must_be_positive(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_prompt(
            tokenizer,
            system_prompt=None,
            history=[],
            message="hello",
            max_context_tokens=64,
            max_new_tokens=0,
        )


# -- the last turn's ids ------------------------------------------------------------------


def _next_turn(
    tokenizer: Any,
    reply: str,
    last: Transcript | None,
    *,
    earlier: list[ChatMessage] | None = None,
    max_context_tokens: int = 1024,
) -> Prompt:
    history = [*(earlier or []), ChatMessage(role="user", content="Hi")]
    return build_prompt(
        tokenizer,
        system_prompt=None,
        history=[*history, ChatMessage(role="assistant", content=reply)],
        message="And then?",
        max_context_tokens=max_context_tokens,
        max_new_tokens=16,
        last_turn=last,
    )


def _generated(
    tokenizer: Any, raw_reply: str, earlier: list[ChatMessage] | None = None
) -> tuple[Prompt, Transcript]:
    """A turn ("Hi" after ``earlier``) whose reply the model wrote a character a token (ids
    a re-encoding of the stored reply would not give)."""
    first = build_prompt(
        tokenizer,
        system_prompt=None,
        history=earlier or [],
        message="Hi",
        max_context_tokens=1024,
        max_new_tokens=16,
    )
    reply_ids = [i for ch in raw_reply for i in tokenizer.encode(ch, add_special_tokens=False)]
    stored = raw_reply.strip()
    return first, Transcript(first.text, first.input_ids + reply_ids, stored)


@pytest.mark.parametrize("templated", [True, False], ids=["chat template", "fallback"])
def test_the_next_turn_starts_with_the_last_turns_own_ids(
    tokenizer: Any, plain_tokenizer: Any, templated: bool
) -> None:
    tok = tokenizer if templated else plain_tokenizer
    # The fallback template cues "Assistant:" and renders "Assistant: reply": the space the
    # model generated, stripped from the stored reply, is the one the template writes.
    _, last = _generated(tok, "Hello there" if templated else " Hello there")
    reused = _next_turn(tok, last.reply, last)
    plain = _next_turn(tok, last.reply, None)
    assert reused.input_ids[: len(last.ids)] == last.ids
    assert plain.input_ids[: len(last.ids)] != last.ids  # re-encoded, the reply's ids differ
    # The ids stand for the same text, and the rest is the same encoding of it.
    assert tok.decode(reused.input_ids) == tok.decode(plain.input_ids) == reused.text
    assert reused.text == plain.text


def test_the_last_turns_ids_are_not_reused_where_the_prompt_does_not_hold_it(
    tokenizer: Any,
) -> None:
    _, last = _generated(tokenizer, "Hello there")
    # The stored reply is not the one generated (edited, or cut at a role marker).
    assert _next_turn(tokenizer, "Hello", last) == _next_turn(tokenizer, "Hello", None)
    # The window dropped the start of the last turn's prompt: it is not this one's prefix.
    earlier = _conversation(4)
    _, long_last = _generated(tokenizer, "Hello there", earlier)
    whole = _next_turn(tokenizer, long_last.reply, long_last, earlier=earlier)
    assert whole.input_ids[: len(long_last.ids)] == long_last.ids
    plain = _next_turn(tokenizer, long_last.reply, None, earlier=earlier)
    # One token short of either encoding of the whole history: the oldest turn goes.
    window = min(len(whole.input_ids), len(plain.input_ids)) + 16 - 1
    cut = _next_turn(
        tokenizer, long_last.reply, long_last, earlier=earlier, max_context_tokens=window
    )
    assert cut.context_messages < whole.context_messages
    assert cut == _next_turn(
        tokenizer, long_last.reply, None, earlier=earlier, max_context_tokens=window
    )
    # Where the reused ids do not fit but the text's own encoding does, the window keeps
    # what it would keep without them.
    assert len(whole.input_ids) > len(plain.input_ids)
    snug = len(plain.input_ids) + 16
    assert _next_turn(
        tokenizer, long_last.reply, long_last, earlier=earlier, max_context_tokens=snug
    ) == _next_turn(tokenizer, long_last.reply, None, earlier=earlier, max_context_tokens=snug)
    # A last turn whose prompt was other text is not reused.
    other = Transcript(last.prompt_text + " ", last.ids, last.reply)
    assert _next_turn(tokenizer, last.reply, other) == _next_turn(tokenizer, last.reply, None)
