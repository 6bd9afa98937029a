"""Turn a conversation into prompt token ids: chat template plus a context window.

Pure functions over a tokenizer; no torch. The window rule is the API's promise: the system
prompt and the new user message are always in the prompt, and the oldest earlier turns are
dropped first, a whole turn at a time, until the prompt leaves room for the reply.
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
) -> Prompt:
    """Build the longest prompt that keeps the newest turns and leaves ``max_new_tokens`` free."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    budget = max_context_tokens - max_new_tokens

    def encode_from(start: int) -> list[int]:
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.extend({"role": m.role, "content": m.content} for m in history[start:])
        messages.append({"role": "user", "content": message})
        # The template already wrote any BOS or role tokens the model needs; letting the
        # tokenizer add its own would duplicate them.
        ids: list[int] = tokenizer.encode(
            render_chat(tokenizer, messages), add_special_tokens=False
        )
        return ids

    starts = _turn_starts(history)
    # Tokenizing the exact rendered text (rather than summing per-message counts) is what makes
    # the count right for every template; a binary search over the allowed starting points keeps
    # that to O(log turns) tokenizations. Most prompts fit whole, so that is tried first.
    ids = encode_from(starts[0])
    if len(ids) <= budget:
        return Prompt(input_ids=ids, context_messages=len(history) - starts[0])
    shortest = encode_from(starts[-1]) if len(starts) > 1 else ids
    if len(shortest) > budget:
        raise PromptTooLong(prompt_tokens=len(shortest), budget=max(budget, 0))

    # Invariant: starts[too_long] does not fit, starts[fits] does (and `best` is its prompt).
    too_long, fits, best = 0, len(starts) - 1, shortest
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        ids = encode_from(starts[middle])
        if len(ids) <= budget:
            fits, best = middle, ids
        else:
            too_long = middle
    return Prompt(input_ids=best, context_messages=len(history) - starts[fits])


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
