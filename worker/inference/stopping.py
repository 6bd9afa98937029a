"""When a running request ends: after each token it is given, in this order of precedence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from worker.inference.engine_types import FinishReason
from worker.inference.request import GenerationRequest

# A rule on the generated text beyond stop tokens (the fallback transcript's role markers).
StopCheck = Callable[[GenerationRequest], bool]

# Enough generated text to hold any fallback role marker, decoded to look for one.
_MARKER_WINDOW_TOKENS = 8


def role_marker_check(tokenizer: Any, markers: Sequence[str]) -> StopCheck:
    """A rule that ends a reply once its text holds one of ``markers`` (the model has started
    writing the next turn of a fallback transcript itself)."""

    def wrote_role_marker(request: GenerationRequest) -> bool:
        tail = tokenizer.decode(request.generated[-_MARKER_WINDOW_TOKENS:])
        return any(marker in tail for marker in markers)

    return wrote_role_marker


@dataclass(frozen=True)
class StopRules:
    stop_ids: frozenset[int]
    check: StopCheck | None = None

    def finish_reason(
        self, request: GenerationRequest, token: int, now: float
    ) -> FinishReason | None:
        """Why ``request`` ends now that ``token`` was added to it; None: it goes on."""
        if request.cancelled:
            return "cancelled"
        if token in self.stop_ids or (self.check is not None and self.check(request)):
            return "stop"
        if len(request.generated) >= request.max_new_tokens:
            return "length"
        if request.expired(now):
            return "time"
        return None
