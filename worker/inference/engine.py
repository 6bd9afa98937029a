"""The engine of a worker process: turns in, replies out, many turns on one model at a time.

Each Celery task thread calls `generate`, which hands its turn to the process's engine loop
(worker/inference/engine_loop.py) as a generation request and waits for it, watching for
cancellation meanwhile; the loop's single thread runs the model for every request in flight
together.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

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
    ) -> GenerationResult:
        """Generate the reply to ``prompt``; ``should_cancel`` is polled while it runs.
        Turns of one conversation share ``prefix_key``: each reuses the cache of the last."""
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
        while not request.wait(CANCEL_CHECK_INTERVAL_S):
            if not request.cancelled and should_cancel():
                request.cancel()
        if request.status is RequestStatus.FAILED:
            assert request.error is not None
            raise request.error
        assert request.finish_reason is not None
        text, stopped, reply_ids = _decoded_reply(
            self.loaded.tokenizer,
            request.generated,
            stop_ids=self._stop_ids,
            text_markers=self._text_markers,
        )
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
    text, stopped, _ = _decoded_reply(
        tokenizer, new_ids, stop_ids=stop_ids, text_markers=text_markers
    )
    return text, stopped


def _decoded_reply(
    tokenizer: Any,
    new_ids: Sequence[int],
    *,
    stop_ids: Collection[int],
    text_markers: Sequence[str],
) -> tuple[str, bool, list[int] | None]:
    """`decode_reply`, and the ids the text stands for: those before the first stop token,
    None where a text role marker cut the text short of them."""
    stop_at = next((i for i, token in enumerate(new_ids) if token in stop_ids), len(new_ids))
    kept = list(new_ids[:stop_at])
    # The tokenizer's decoder replaces bytes that do not form valid UTF-8 (a character cut off
    # by max_new_tokens, or a random model's byte salad) with U+FFFD.
    text: str = tokenizer.decode(kept, skip_special_tokens=True)
    marker_at = min((i for i in map(text.find, text_markers) if i >= 0), default=None)
    if marker_at is not None:
        text = text[:marker_at]
    stopped = stop_at < len(new_ids) or marker_at is not None
    return _storable(text), stopped, kept if marker_at is None else None


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: no NUL, valid UTF-8 (lone surrogates become '?').

    Surrounding whitespace goes too: the fallback transcript cues "Assistant:", so a reply
    naturally starts with a space, and trailing newlines are the model drifting to a new turn.
    """
    text = text.replace("\x00", "")
    return text.encode("utf-8", errors="replace").decode("utf-8").strip()
