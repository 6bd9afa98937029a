"""Turn a conversation into prompt token ids: chat template plus a context window.

Pure functions over a tokenizer; no torch. The window rule is the API's promise: the system
prompt and the new user message are always in the prompt, and the oldest earlier turns are
dropped first, a whole turn at a time, until the prompt leaves room for the reply.

A conversation's next turn on the same worker reuses the token ids of its last one (a
`Transcript`: that turn's prompt and the ids the model generated), not ids re-encoded from the
stored reply text: decoding and encoding again need not give the same ids (a byte-level BPE
merges the model's tokens its own way), and the next turn's prefix would then match the cached
keys and values only up to the last reply. The ids are spliced in only where the text they
stand for is the text the prompt renders (up to the whitespace the stored reply was stripped
of); elsewhere, as on a worker that did not generate the last turn, the prompt is encoded from
its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# For models that ship no chat template (base models such as the original GPT-2): a plain
# transcript the model can continue after "Assistant:". No special tokens, because nothing is
# known about the tokenizer's.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- message['content'] ~ '\\n\\n' -}}"
    "{%- else -%}"
    "{{- message['role'] | capitalize ~ ': ' ~ message['content'] ~ '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)
# Where a model continuing the fallback transcript starts a turn that is not its own.
FALLBACK_ROLE_MARKERS: tuple[str, ...] = ("\nUser:", "\nAssistant:", "\nSystem:")


class ChatMessage(Protocol):
    """A message of the history as the prompt reads it. The service's is app.schemas.ChatMessage;
    any object with these two attributes will do (the engine does not import the app)."""

    @property
    def role(self) -> str: ...  # "user" | "assistant"

    @property
    def content(self) -> str: ...


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    context_messages: int  # how many of `history` made it into the prompt
    text: str = ""  # the rendered prompt the ids stand for ("" for ids given as they are)


@dataclass(frozen=True)
class Transcript:
    """A conversation's last turn as the model saw and wrote it."""

    prompt_text: str  # its rendered prompt
    ids: list[int]  # its prompt's ids, then those of the reply it generated (no stop token)
    reply: str  # the reply as stored (and so as the next turn's history holds it)


# Stands in for the last reply's content while the template renders, to find where it goes.
_REPLY_PLACEHOLDER = "\ue000parley-reply\ue000"


class PromptTooLong(Exception):
    """The system prompt and the new message alone leave no room for the reply."""

    def __init__(self, *, prompt_tokens: int, budget: int) -> None:
        super().__init__(
            f"the system prompt and message take {prompt_tokens} tokens; "
            f"at most {budget} fit beside the requested reply length"
        )
        self.prompt_tokens = prompt_tokens
        self.budget = budget


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render ``messages`` with the model's chat template, ending with the assistant's cue."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def build_prompt(
    tokenizer: Any,
    *,
    system_prompt: str | None,
    history: Sequence[ChatMessage],
    message: str,
    max_context_tokens: int,
    max_new_tokens: int,
    last_turn: Transcript | None = None,
) -> Prompt:
    """Build the longest prompt that keeps the newest turns and leaves ``max_new_tokens`` free.
    ``last_turn``: the conversation's last turn as generated, whose ids are reused where the
    prompt still holds it whole."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    budget = max_context_tokens - max_new_tokens

    def encode_from(start: int) -> tuple[list[int], str]:
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.extend({"role": m.role, "content": m.content} for m in history[start:])
        messages.append({"role": "user", "content": message})
        text = render_chat(tokenizer, messages)
        reused = _reusing_last_turn(tokenizer, messages, text, last_turn)
        # Reused ids may number more than the text's own encoding: where they do not fit, the
        # window is what it would be without them.
        if reused is not None and len(reused) <= budget:
            return reused, text
        return _encode(tokenizer, text), text

    starts = _turn_starts(history)
    # Tokenizing the exact rendered text (rather than summing per-message counts) is what makes
    # the count right for every template; a binary search over the allowed starting points keeps
    # that to O(log turns) tokenizations. Most prompts fit whole, so that is tried first.
    ids, text = encode_from(starts[0])
    if len(ids) <= budget:
        return Prompt(input_ids=ids, context_messages=len(history) - starts[0], text=text)
    shortest = encode_from(starts[-1]) if len(starts) > 1 else (ids, text)
    if len(shortest[0]) > budget:
        raise PromptTooLong(prompt_tokens=len(shortest[0]), budget=max(budget, 0))

    # Invariant: starts[too_long] does not fit, starts[fits] does (and `best` is its prompt).
    too_long, fits, best = 0, len(starts) - 1, shortest
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        candidate = encode_from(starts[middle])
        if len(candidate[0]) <= budget:
            fits, best = middle, candidate
        else:
            too_long = middle
    return Prompt(input_ids=best[0], context_messages=len(history) - starts[fits], text=best[1])


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any BOS or role tokens the model needs; letting the
    # tokenizer add its own would duplicate them.
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def _reusing_last_turn(
    tokenizer: Any, messages: list[dict[str, str]], text: str, last_turn: Transcript | None
) -> list[int] | None:
    """The last turn's ids, then those of the text rendered after its reply, where ``messages``
    (rendered as ``text``) hold that turn whole (its prompt as it was, then its reply as
    stored); else None."""
    # A window that dropped the start of the last turn's prompt is told apart without
    # rendering again (the binary search over windows tries several).
    if last_turn is None or len(messages) < 2 or not text.startswith(last_turn.prompt_text):
        return None
    reply = messages[-2]
    if reply["role"] != "assistant" or reply["content"] != last_turn.reply:
        return None
    marked = [*messages[:-2], {**reply, "content": _REPLY_PLACEHOLDER}, messages[-1]]
    before, found, after = render_chat(tokenizer, marked).partition(_REPLY_PLACEHOLDER)
    if not found or _REPLY_PLACEHOLDER in after:
        return None
    # The generated ids may begin with whitespace the stored reply was stripped of (a
    # template that cues "Assistant:" renders "Assistant: " before the stored reply).
    if not before.startswith(last_turn.prompt_text) or before[len(last_turn.prompt_text) :].strip():
        return None
    return last_turn.ids + _encode(tokenizer, after)


def _turn_starts(history: Sequence[ChatMessage]) -> list[int]:
    """Indices the kept history may start at, oldest first; the last one keeps nothing.

    A turn is a user message and the replies that follow it, so the history may start at any
    user message, never at an assistant reply cut off from its question. Index 0 is allowed
    whatever its role: keeping everything orphans nothing.
    """
    starts = [0]
    starts.extend(i for i, m in enumerate(history) if i > 0 and m.role == "user")
    if starts[-1] != len(history):
        starts.append(len(history))
    return starts
