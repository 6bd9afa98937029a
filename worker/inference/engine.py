"""The engine of a worker process: turns in, replies out, many turns on one model at a time.

Each Celery task thread calls `generate`, which hands its turn to the process's engine loop
(worker/inference/engine_loop.py) as a generation request and waits for it, watching for
cancellation meanwhile; the loop's single thread runs the model for every request in flight
together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.inference.engine_loop import EngineLoop
from worker.inference.engine_types import (
    FinishReason,
    GenerationParams,
    GenerationResult,
    StepStats,
)
from worker.inference.loader import LoadedModel
from worker.inference.prefix_cache import PrefixCache
from worker.inference.prompt import FALLBACK_ROLE_MARKERS, Prompt, Transcript
from worker.inference.reply_text import ReplyStream, decode_reply, decoded_reply
from worker.inference.request import GenerationRequest, RequestStatus
from worker.inference.stopping import StopRules

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationParams",
    "GenerationResult",
    "StepStats",
    "decode_reply",
]

# should_cancel may be a network round trip (Redis): asking once per token would slow a fast
# model down to the speed of the network, so each waiting task asks at most this often.
CANCEL_CHECK_INTERVAL_S = 0.05
# Enough generated text to hold any fallback role marker, decoded to look for one.
_MARKER_WINDOW_TOKENS = 8


class Engine:
    """Runs generation on one loaded model; `generate` may be called from many threads."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 16,
        prefill_tokens: int = 512,
        on_step: Callable[[StepStats], None] | None = None,
        prefix_cache_bytes: int = 0,
    ) -> None:
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
        # marks the end of its turn only by starting another one ("\nUser:").
        self._text_markers: tuple[str, ...] = ()
        if not getattr(tokenizer, "chat_template", None):
            self._text_markers = FALLBACK_ROLE_MARKERS
        self._loop = EngineLoop(
            loaded.model,
            device=loaded.device,
            pad_token_id=tokenizer.pad_token_id,
            stop_rules=StopRules(
                self._stop_ids, self._wrote_role_marker if self._text_markers else None
            ),
            max_batch=max_batch,
            capacity=loaded.max_context_tokens,
            prefill_tokens=prefill_tokens,
            on_step=on_step,
            prefix_cache=PrefixCache(max_bytes=prefix_cache_bytes) if prefix_cache_bytes else None,
        )

    def close(self) -> None:
        """Stop the engine's loop; turns still in flight fail."""
        self._loop.stop()

    @property
    def running(self) -> int:
        """How many requests are in the batch now (for the metrics)."""
        return self._loop.running

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The conversations' kept caches (None when prefix_cache_bytes is 0)."""
        return self._loop.prefix_cache

    def last_turn(self, prefix_key: str) -> Transcript | None:
        """The conversation's last turn here, as generated (for its next prompt's ids)."""
        return None if self.prefix_cache is None else self.prefix_cache.last_turn(prefix_key)

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
        room = self.loaded.max_context_tokens - prompt_tokens
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
        self._loop.submit(request)
        stream = None
        if on_text is not None:
            stream = ReplyStream(
                self.loaded.tokenizer,
                on_text,
                stop_ids=self._stop_ids,
                text_markers=self._text_markers,
            )
        self._follow(request, should_cancel, stream)
        if request.status is RequestStatus.FAILED:
            assert request.error is not None
            raise request.error
        assert request.finish_reason is not None
        text, stopped, reply_ids = decoded_reply(
            self.loaded.tokenizer,
            request.generated,
            stop_ids=self._stop_ids,
            text_markers=self._text_markers,
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
                    request.cancel()

    def _remember(
        self, prefix_key: str | None, prompt: Prompt, reply_ids: list[int], text: str
    ) -> None:
        """Keep the turn's ids for the conversation's next (``reply_ids``: those the stored
        reply ``text`` stands for whole)."""
        if self.prefix_cache is None or prefix_key is None or not prompt.text:
            return
        transcript = Transcript(prompt.text, prompt.input_ids + reply_ids, text)
        self.prefix_cache.remember(prefix_key, transcript)

    def _wrote_role_marker(self, request: GenerationRequest) -> bool:
        tail = self.loaded.tokenizer.decode(request.generated[-_MARKER_WINDOW_TOKENS:])
        return any(marker in tail for marker in self._text_markers)
