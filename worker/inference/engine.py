"""The engine of a worker process: turns in, replies out, many turns on one model at a time.

Each Celery task thread calls `generate`, which hands its turn to the engine's core as a
generation request and waits for it, watching for cancellation and streaming its text
meanwhile. The core runs the model for every request in flight together: the continuous
batching loop (worker/inference/engine_loop.py), in this process (`Engine.in_process`) or in a
process of its own that holds the model (worker/inference/engine_process.py), as a worker runs
it. The text side stays here either way: prompts in, token ids decoded into replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.inference.engine_loop import EngineLoop
from worker.inference.engine_types import (
    FinishReason,
    GenerationParams,
    GenerationResult,
    PrefixCacheCounts,
    StepStats,
)
from worker.inference.loader import LoadedModel
from worker.inference.prefix_cache import PrefixCache
from worker.inference.prompt import FALLBACK_ROLE_MARKERS, Prompt, Transcript
from worker.inference.reply_text import ReplyStream, decode_reply, decoded_reply
from worker.inference.request import GenerationRequest, RequestStatus
from worker.inference.stopping import StopRules, role_marker_check

__all__ = [
    "Engine",
    "EngineCore",
    "FinishReason",
    "GenerationParams",
    "GenerationResult",
    "ModelFacts",
    "StepStats",
    "decode_reply",
]

# should_cancel may be a network round trip (Redis): asking once per token would slow a fast
# model down to the speed of the network, so each waiting task asks at most this often.
CANCEL_CHECK_INTERVAL_S = 0.05


@dataclass(frozen=True)
class ModelFacts:
    """What both sides of an engine must agree on about its model: which tokens and texts end
    a reply, how long a prompt and its reply may be, and where the model runs."""

    stop_ids: frozenset[int]
    text_markers: tuple[str, ...]
    max_context_tokens: int
    device: str


def model_facts(loaded: LoadedModel) -> ModelFacts:
    tokenizer = loaded.tokenizer
    # Any special token ends the reply, not only eos: a model that emits "<|user|>" has
    # started writing the next turn itself, and special tokens are dropped from the text
    # anyway. unk is the exception: it stands for ordinary text the vocabulary lacks.
    stop_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    configured = loaded.model.generation_config.eos_token_id
    stop_ids.update(configured if isinstance(configured, list) else [configured])
    stop_ids.discard(None)
    # Without a chat template the prompt is the plain fallback transcript, and the model
    # marks the end of its turn only by starting another one ("\nUser:").
    markers = () if getattr(tokenizer, "chat_template", None) else FALLBACK_ROLE_MARKERS
    return ModelFacts(frozenset(stop_ids), markers, loaded.max_context_tokens, loaded.device)


class EngineCore(Protocol):
    """Where requests are generated, a token a step for all of them together."""

    @property
    def running(self) -> int:
        """How many requests are in the batch now (for the metrics)."""

    @property
    def prefix_cache(self) -> PrefixCacheCounts | None:
        """What the conversations' kept caches have done (None: none are kept)."""

    @property
    def alive(self) -> bool:
        """Whether requests submitted now can be generated (not stopped or lost)."""

    def submit(self, request: GenerationRequest) -> None: ...

    def cancel(self, request: GenerationRequest) -> None:
        """Ask for ``request`` to end at its next step."""

    def last_turn(self, prefix_key: str) -> Transcript | None:
        """The conversation's last turn, as generated, while its cache is kept."""

    def remember(self, prefix_key: str, transcript: Transcript) -> None:
        """Keep ``transcript`` beside the cache kept for its turn."""

    def stop(self) -> None:
        """End generation; requests still in flight fail."""


def make_loop(
    loaded: LoadedModel,
    facts: ModelFacts,
    *,
    max_batch: int = 16,
    prefill_tokens: int = 512,
    on_step: Callable[[StepStats], None] | None = None,
    prefix_cache_bytes: int = 0,
    on_iteration: Callable[[], None] | None = None,
) -> EngineLoop:
    """The batching loop over ``loaded``'s model (started: its thread runs)."""
    check = role_marker_check(loaded.tokenizer, facts.text_markers) if facts.text_markers else None
    return EngineLoop(
        loaded.model,
        device=loaded.device,
        pad_token_id=loaded.tokenizer.pad_token_id,
        stop_rules=StopRules(facts.stop_ids, check),
        max_batch=max_batch,
        capacity=facts.max_context_tokens,
        prefill_tokens=prefill_tokens,
        on_step=on_step,
        prefix_cache=PrefixCache(max_bytes=prefix_cache_bytes) if prefix_cache_bytes else None,
        on_iteration=on_iteration,
    )


class Engine:
    """Generates replies on a core; `generate` may be called from many threads."""

    def __init__(self, tokenizer: Any, facts: ModelFacts, core: EngineCore) -> None:
        self.tokenizer = tokenizer
        self.facts = facts
        self._core = core

    @classmethod
    def in_process(
        cls,
        loaded: LoadedModel,
        *,
        max_batch: int = 16,
        prefill_tokens: int = 512,
        on_step: Callable[[StepStats], None] | None = None,
        prefix_cache_bytes: int = 0,
    ) -> Engine:
        """An engine whose loop runs on a thread of this process, beside its callers."""
        facts = model_facts(loaded)
        loop = make_loop(
            loaded,
            facts,
            max_batch=max_batch,
            prefill_tokens=prefill_tokens,
            on_step=on_step,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        return cls(loaded.tokenizer, facts, loop)

    @property
    def max_context_tokens(self) -> int:
        """The most tokens a prompt and its reply may hold together."""
        return self.facts.max_context_tokens

    def close(self) -> None:
        """Stop the engine's core; turns still in flight fail."""
        self._core.stop()

    @property
    def running(self) -> int:
        """How many requests are in the batch now (for the metrics)."""
        return self._core.running

    @property
    def alive(self) -> bool:
        """Whether turns given to it now can be generated."""
        return self._core.alive

    @property
    def prefix_cache(self) -> PrefixCacheCounts | None:
        """What the conversations' kept caches have done (None when none are kept)."""
        return self._core.prefix_cache

    def last_turn(self, prefix_key: str) -> Transcript | None:
        """The conversation's last turn here, as generated (for its next prompt's ids)."""
        return self._core.last_turn(prefix_key)

    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        should_cancel: Callable[[], bool] = lambda: False,
        prefix_key: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate the reply to ``prompt``; ``should_cancel`` is polled while it runs.
        Turns of one conversation share ``prefix_key``: each reuses the cache of the last.
        ``on_text`` is given the reply in pieces as they are generated (on this thread, not
        the model's): together, exactly the returned text, unless the turn is cancelled."""
        prompt_tokens = len(prompt.input_ids)
        room = self.facts.max_context_tokens - prompt_tokens
        if prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if room < 1:
            raise ValueError(f"a prompt of {prompt_tokens} tokens leaves no room for a reply")
        # A turn cancelled while it waited for the model costs nothing more.
        if should_cancel():
            return GenerationResult("", prompt_tokens, 0, "cancelled")
        request = GenerationRequest(
            list(prompt.input_ids), params, min(params.max_new_tokens, room), prefix_key=prefix_key
        )
        self._core.submit(request)
        stream = None
        if on_text is not None:
            stream = ReplyStream(
                self.tokenizer,
                on_text,
                stop_ids=self.facts.stop_ids,
                text_markers=self.facts.text_markers,
            )
        self._follow(request, should_cancel, stream)
        if request.status is RequestStatus.FAILED:
            assert request.error is not None
            raise request.error
        assert request.finish_reason is not None
        text, stopped, reply_ids = decoded_reply(
            self.tokenizer,
            request.generated,
            stop_ids=self.facts.stop_ids,
            text_markers=self.facts.text_markers,
        )
        if stream is not None and request.finish_reason != "cancelled":
            stream.finish(text)
        reason = request.finish_reason
        if stopped and reason in ("length", "time"):
            reason = "stop"
        if reply_ids is not None and reason != "cancelled":
            self._remember(prefix_key, prompt, reply_ids, text)
        first = request.first_token_at
        return GenerationResult(
            text,
            prompt_tokens,
            len(request.generated),
            reason,
            None if first is None else first - request.submitted_at,
        )

    def _follow(
        self,
        request: GenerationRequest,
        should_cancel: Callable[[], bool],
        stream: ReplyStream | None,
    ) -> None:
        """Wait for ``request`` to end, asking ``should_cancel`` at most every
        CANCEL_CHECK_INTERVAL_S and, when streaming, passing on its text at each new token."""
        ask_at = time.monotonic() + CANCEL_CHECK_INTERVAL_S
        while True:
            if stream is None:
                ended = request.wait(CANCEL_CHECK_INTERVAL_S)
            else:
                ended = request.wait_for_progress(CANCEL_CHECK_INTERVAL_S)
                stream.advance(request.generated)
            if ended:
                return
            if time.monotonic() >= ask_at and not request.cancelled:
                ask_at = time.monotonic() + CANCEL_CHECK_INTERVAL_S
                if should_cancel():
                    self._core.cancel(request)

    def _remember(
        self, prefix_key: str | None, prompt: Prompt, reply_ids: list[int], text: str
    ) -> None:
        """Keep the turn's ids for the conversation's next (``reply_ids``: those the stored
        reply ``text`` stands for whole)."""
        if self.prefix_cache is None or prefix_key is None or not prompt.text:
            return
        transcript = Transcript(prompt.text, prompt.input_ids + reply_ids, text)
        self._core.remember(prefix_key, transcript)
