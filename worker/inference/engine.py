"""Generate one assistant reply from a prepared prompt.

One turn at a time for now. The work is split so that a batcher can grow out of it: checks and
stopping rules are per turn (``_TurnControl``), the model call is one place (``_run``), and
turning ids into storable text is another (``_finish``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from worker.inference.loader import LoadedModel
from worker.inference.prompt import FALLBACK_ROLE_MARKERS, Prompt

FinishReason = Literal["stop", "length", "time", "cancelled"]

# should_cancel may be a network round trip (Redis, Postgres): asking once per token would
# slow a fast model down to the speed of the network, so it is asked at most this often.
CANCEL_CHECK_INTERVAL_S = 0.05


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    time_limit_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class _Flag(StoppingCriteria):
    """A stopping rule that remembers whether it fired, so the finish reason can be told."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.fired = False
        self._check = check

    def poll(self) -> bool:
        if not self.fired:
            self.fired = self._check()
        return self.fired

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        fired = self.poll()
        return torch.full((input_ids.shape[0],), fired, dtype=torch.bool, device=input_ids.device)


class _TurnControl:
    """The per-turn stopping rules: cancellation (throttled) and the wall-clock cap."""

    def __init__(self, should_cancel: Callable[[], bool], time_limit_s: float) -> None:
        self._should_cancel = should_cancel
        now = time.monotonic()
        # The cap counts from the start of the turn, prompt processing included.
        self._deadline = now + time_limit_s
        self._next_cancel_check = now
        self.cancelled = _Flag(self._cancel_requested)
        self.timed_out = _Flag(lambda: time.monotonic() >= self._deadline)

    def _cancel_requested(self) -> bool:
        now = time.monotonic()
        if now < self._next_cancel_check:
            return False
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL_S
        return bool(self._should_cancel())


class Engine:
    """Runs generation on one loaded model; safe to call from several threads (one at a time)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        tokenizer = loaded.tokenizer
        # Any special token ends the reply, not only eos: a model that emits "<|user|>" has
        # started writing the next turn itself, and special tokens are dropped from the text
        # anyway. unk is the exception: it stands for ordinary text the vocabulary lacks.
        stop_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        configured = loaded.model.generation_config.eos_token_id
        stop_ids.update(configured if isinstance(configured, list) else [configured])
        stop_ids.discard(None)
        self._stop_ids: frozenset[int] = frozenset(stop_ids)
        # Without a chat template the prompt is the plain fallback transcript, and the model
        # marks the end of its turn only by starting another one ("\nUser:"). The criterion
        # precomputes tables over the vocabulary, so it is built once and shared.
        self._text_markers: tuple[str, ...] = ()
        self._stop_strings: StopStringCriteria | None = None
        if not getattr(tokenizer, "chat_template", None):
            self._text_markers = FALLBACK_ROLE_MARKERS
            self._stop_strings = StopStringCriteria(tokenizer, list(FALLBACK_ROLE_MARKERS))
        # Seeding touches the global RNG and the model is not meant for concurrent calls.
        self._lock = threading.Lock()

    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        should_cancel: Callable[[], bool] = lambda: False,
    ) -> GenerationResult:
        """Generate the reply to ``prompt``; ``should_cancel`` is polled between tokens."""
        prompt_tokens = len(prompt.input_ids)
        room = self.loaded.max_context_tokens - prompt_tokens
        if prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if room < 1:
            raise ValueError(f"a prompt of {prompt_tokens} tokens leaves no room for a reply")
        control = _TurnControl(should_cancel, params.time_limit_s)
        # A turn cancelled while it waited for the model costs nothing more.
        if control.cancelled.poll():
            return GenerationResult("", prompt_tokens, 0, "cancelled")

        max_new_tokens = min(params.max_new_tokens, room)
        with self._lock:
            new_ids = self._run(prompt, params, max_new_tokens, control)
        return self._finish(new_ids, prompt_tokens, max_new_tokens, control)

    def _run(
        self, prompt: Prompt, params: GenerationParams, max_new_tokens: int, control: _TurnControl
    ) -> list[int]:
        model = self.loaded.model
        input_ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=self.loaded.device)
        criteria = StoppingCriteriaList([control.cancelled, control.timed_out])
        if self._stop_strings is not None:
            criteria.append(self._stop_strings)
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": sorted(self._stop_ids),
            "pad_token_id": self.loaded.tokenizer.pad_token_id,
        }
        if params.temperature > 0:
            # top_k=0 switches off the library's default top-k of 50, which the API does not
            # expose: temperature and top_p alone shape the distribution.
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            options["top_k"] = 0
        else:
            options["do_sample"] = False

        with torch.inference_mode(), self._seeded(params):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                stopping_criteria=criteria,
                **options,
            )
        generated: list[int] = output[0, input_ids.shape[1] :].tolist()
        return generated

    @contextmanager
    def _seeded(self, params: GenerationParams) -> Iterator[None]:
        """Fix the RNG for a seeded sampled turn, restoring the global state afterwards."""
        if params.temperature <= 0 or params.seed is None:
            yield
            return
        device = torch.device(self.loaded.device)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            yield

    def _finish(
        self, new_ids: list[int], prompt_tokens: int, max_new_tokens: int, control: _TurnControl
    ) -> GenerationResult:
        text, stopped = decode_reply(
            self.loaded.tokenizer,
            new_ids,
            stop_ids=self._stop_ids,
            text_markers=self._text_markers,
        )
        reason: FinishReason
        if control.cancelled.fired:
            reason = "cancelled"
        elif stopped:
            reason = "stop"
        elif control.timed_out.fired and len(new_ids) < max_new_tokens:
            reason = "time"
        else:
            reason = "length"
        return GenerationResult(text, prompt_tokens, len(new_ids), reason)


def decode_reply(
    tokenizer: Any,
    new_ids: Sequence[int],
    *,
    stop_ids: Collection[int],
    text_markers: Sequence[str] = (),
) -> tuple[str, bool]:
    """Decode generated ids into storable reply text; also say whether the model ended its turn.

    The reply ends before the first stop token (eos or another special token such as a role
    marker) and before the first text role marker, whichever comes first.
    """
    stop_at = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if stop_at is None else new_ids[:stop_at]
    # The tokenizer's decoder replaces bytes that do not form valid UTF-8 (a character cut off
    # by max_new_tokens, or a random model's byte salad) with U+FFFD.
    text: str = tokenizer.decode(list(kept), skip_special_tokens=True)
    marker_at = min((i for i in map(text.find, text_markers) if i >= 0), default=None)
    if marker_at is not None:
        text = text[:marker_at]
    return _storable(text), stop_at is not None or marker_at is not None


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: no NUL, valid UTF-8 (lone surrogates become '?').

    Surrounding whitespace goes too: the fallback transcript cues "Assistant:", so a reply
    naturally starts with a space, and trailing newlines are the model drifting to a new turn.
    """
    text = text.replace("\x00", "")
    return text.encode("utf-8", errors="replace").decode("utf-8").strip()
