"""The engine's public data: the settings and the outcome of one generation, and what one
decoding step did (for the metrics). It imports no torch, so the metrics can import it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "time", "cancelled"]


class NumericalError(ArithmeticError):
    """The model gave a generation no valid distribution for its next token (NaN or infinite
    scores, or an all-zero distribution): that generation fails alone, its batch goes on."""


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
    # From reaching the engine to the first generated token; None when none was generated.
    # A measurement, not part of what was generated: equal results may differ in it.
    time_to_first_token_s: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StepStats:
    """What one decoding step did, for the metrics."""

    batch_size: int  # also the tokens it generated: one per request in the batch
    seconds: float


@dataclass(eq=False)
class PrefixCacheCounts:
    """What the prefix cache (prefix_cache.py) has done: lookups that found the conversation's
    last turn, those that did not, and the prompt tokens it saved prefilling."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
