"""Continuous batching: every turn in flight on one model advances together, one token per step.

A single thread owns the model. Between two decoding steps it admits waiting turns (their
prompts are prefilled together and their key/value caches joined to the running batch, left
padded to a common length) and lets finished, cancelled or timed-out turns leave. Each turn
keeps its own limits and sampling settings inside the batch.

Measured on a 2-core CPU (docs/benchmarks.md): one padded batch of 16 makes about 6x the tokens
per second of 16 turns one at a time, and transformers' own continuous-batching API
(`generate_batch`, paged attention) made about 40% of a padded batch there, so the loop is
written here on the model's forward pass and its DynamicCache.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from worker.inference.engine_types import FinishReason, GenerationParams
from worker.inference.prefix_cache import PrefixCache, PrefixHit

log = logging.getLogger("parley.batcher")


@dataclass(eq=False)
class Turn:
    """One generation in flight: its prompt, limits and progress."""

    input_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    # The conversation: its key/value cache is kept for its next turn (prefix_cache.py).
    prefix_key: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        # The cap counts from submission: time spent waiting for a batch slot is the turn's too.
        self.deadline = self.submitted_at + self.params.time_limit_s


@dataclass(frozen=True)
class StepStats:
    """What one decoding step did, for the metrics."""

    batch_size: int  # also the tokens it generated: one per turn in the batch
    seconds: float


StopCheck = Callable[[Turn], bool]


class ContinuousBatcher:
    def __init__(
        self,
        model: Any,
        *,
        device: str,
        pad_token_id: int,
        stop_ids: frozenset[int],
        max_batch: int,
        stop_check: StopCheck | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self._model = model
        self._device = torch.device(device)
        self._pad = pad_token_id
        self._stop_ids = stop_ids
        self.max_batch = max_batch
        self._stop_check = stop_check
        self._on_step = on_step
        self.prefix_cache = prefix_cache
        # None wakes the loop to stop.
        self._waiting: queue.SimpleQueue[Turn | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        # The batch as it stands between steps.
        self._active: list[Turn] = []
        # A transformers DynamicCache (typed Any: its layer classes are partly annotated).
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name="parley-batcher", daemon=True)
        self._thread.start()
        # The loop must end before the interpreter does: a thread still inside torch at exit
        # aborts the process.
        atexit.register(self.stop)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, turn: Turn) -> None:
        self._waiting.put(turn)

    def stop(self) -> None:
        """End the loop; turns still in flight fail (their jobs are retried elsewhere)."""
        self._stopping.set()
        self._waiting.put(None)
        self._thread.join(timeout=10)

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit(block=not self._active)
                if self._active:
                    self._advance()
            except Exception as exc:  # a failed step fails the turns in it, not the worker
                log.exception("batch step failed; failing %d turns", len(self._active))
                for turn in self._active:
                    turn.error = exc
                    turn.done.set()
                self._reset()
        stopped = RuntimeError("the engine stopped")
        for turn in self._active:
            turn.error = stopped
            turn.done.set()
        self._reset()

    def _reset(self) -> None:
        self._active, self._cache, self._mask, self._logits = [], None, None, None

    def _admit(self, *, block: bool) -> None:
        new: list[Turn] = []
        waiting: Turn | None
        if block:
            waiting = self._waiting.get()
            if waiting is None:
                return
            new.append(waiting)
        while len(self._active) + len(new) < self.max_batch:
            try:
                waiting = self._waiting.get_nowait()
            except queue.Empty:
                break
            if waiting is None:
                break
            new.append(waiting)
        cold: list[Turn] = []
        for turn in new:
            if self._ends_before_start(turn):
                continue
            hit = self._cached_prefix(turn)
            if hit is None:
                cold.append(turn)
            else:
                self._join(*self._prefill_after(turn, hit), [turn])
        for group in _similar_lengths(cold):
            self._join(*self._prefill(group), group)

    def _cached_prefix(self, turn: Turn) -> PrefixHit | None:
        if self.prefix_cache is None or turn.prefix_key is None:
            return None
        return self.prefix_cache.lookup(turn.prefix_key, turn.input_ids)

    @torch.inference_mode()
    def _prefill_after(self, turn: Turn, hit: PrefixHit) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Prefill only the tokens that follow the cached prefix."""
        self._seed(turn)
        total = len(turn.input_ids)
        ids = torch.tensor([turn.input_ids[hit.shared :]], device=self._device)
        mask = torch.ones((1, total), dtype=torch.long, device=self._device)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(hit.shared, total, device=self._device)[None, :],
            past_key_values=DynamicCache(hit.layers),
            use_cache=True,
        )
        return out.past_key_values, mask, out.logits[:, -1, :].float()

    def _seed(self, turn: Turn) -> None:
        if turn.params.temperature > 0 and turn.params.seed is not None:
            turn.generator = torch.Generator(self._device).manual_seed(turn.params.seed)

    def _ends_before_start(self, turn: Turn) -> bool:
        reason: FinishReason | None = None
        if turn.cancel.is_set():
            reason = "cancelled"
        elif time.monotonic() >= turn.deadline:
            reason = "time"
        if reason is not None:
            turn.finish_reason = reason
            turn.done.set()
        return reason is not None

    @torch.inference_mode()
    def _prefill(self, turns: Sequence[Turn]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        width = max(len(t.input_ids) for t in turns)
        ids = torch.full((len(turns), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(turns), width), dtype=torch.long)
        for row, turn in enumerate(turns):
            ids[row, width - len(turn.input_ids) :] = torch.tensor(turn.input_ids)
            mask[row, width - len(turn.input_ids) :] = 1
            self._seed(turn)
        ids, mask = ids.to(self._device), mask.to(self._device)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            past_key_values=DynamicCache(),
            use_cache=True,
        )
        return out.past_key_values, mask, out.logits[:, -1, :].float()

    def _join(
        self, cache: Any, mask: torch.Tensor, logits: torch.Tensor, turns: list[Turn]
    ) -> None:
        """Add prefilled turns to the running batch, left-padding whichever side is shorter."""
        if self._cache is None or self._mask is None or self._logits is None:
            self._cache, self._mask, self._logits, self._active = cache, mask, logits, turns
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = DynamicCache(
            [
                (
                    torch.cat([_pad_left(old_k, width), _pad_left(new_k, width)]),
                    torch.cat([_pad_left(old_v, width), _pad_left(new_v, width)]),
                )
                for (old_k, old_v), (new_k, new_v) in zip(
                    _layers(self._cache), _layers(cache), strict=True
                )
            ]
        )
        self._mask = torch.cat([_pad_mask(self._mask, width), _pad_mask(mask, width)])
        self._logits = torch.cat([self._logits, logits])
        self._active = self._active + turns

    @torch.inference_mode()
    def _advance(self) -> None:
        """Sample one token for every turn, let the finished ones leave, run the model once."""
        assert self._logits is not None and self._mask is not None and self._cache is not None
        started = time.perf_counter()
        tokens = self._sample(self._logits)
        now = time.monotonic()
        keep: list[int] = []
        for row, (turn, token) in enumerate(zip(self._active, tokens.tolist(), strict=True)):
            if turn.first_token_at is None:
                turn.first_token_at = now
            turn.generated.append(token)
            reason = self._finish_reason(turn, token, now)
            if reason is None:
                keep.append(row)
            else:
                if reason != "cancelled":
                    self._keep_prefix(row, turn)
                turn.finish_reason = reason
                turn.done.set()
        stepped = len(self._active)
        if not keep:
            self._reset()
        else:
            if len(keep) < stepped:
                index = torch.tensor(keep, device=self._device)
                self._cache.batch_select_indices(index)
                self._mask = self._mask[index]
                tokens = tokens[index]
                self._active = [self._active[i] for i in keep]
                self._trim_common_padding()
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(keep), 1))], dim=1)
            out = self._model(
                input_ids=tokens[:, None],
                attention_mask=self._mask,
                position_ids=_positions(self._mask)[:, -1:],
                past_key_values=self._cache,
                use_cache=True,
            )
            self._cache, self._logits = out.past_key_values, out.logits[:, -1, :].float()
        if self._on_step is not None:
            self._on_step(StepStats(stepped, time.perf_counter() - started))

    def _keep_prefix(self, row: int, turn: Turn) -> None:
        """Store the row's keys and values (prompt and reply but the last token, which was
        sampled and never run through the model) for the conversation's next turn."""
        if self.prefix_cache is None or turn.prefix_key is None or self._mask is None:
            return
        length = int(self._mask[row].sum())
        layers = [
            (k[row : row + 1, :, -length:].clone(), v[row : row + 1, :, -length:].clone())
            for k, v in _layers(self._cache)
        ]
        ids = turn.input_ids + turn.generated[:-1]
        self.prefix_cache.store(turn.prefix_key, ids[:length], layers)

    def _finish_reason(self, turn: Turn, token: int, now: float) -> FinishReason | None:
        if turn.cancel.is_set():
            return "cancelled"
        if token in self._stop_ids or (self._stop_check is not None and self._stop_check(turn)):
            return "stop"
        if len(turn.generated) >= turn.max_new_tokens:
            return "length"
        if now >= turn.deadline:
            return "time"
        return None

    def _trim_common_padding(self) -> None:
        """Drop left columns that are padding in every row, so the cache does not only grow."""
        assert self._mask is not None and self._cache is not None
        first = int(self._mask.any(dim=0).int().argmax())
        if first == 0:
            return
        self._mask = self._mask[:, first:]
        self._cache = DynamicCache(
            [(k[:, :, first:], v[:, :, first:]) for k, v in _layers(self._cache)]
        )

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy rows by argmax together; sampled rows each with their own settings."""
        tokens = logits.argmax(dim=-1)
        for row, turn in enumerate(self._active):
            params = turn.params
            if params.temperature > 0:
                tokens[row] = _sample_row(logits[row], params, turn.generator)
        return tokens


def _sample_row(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None
) -> torch.Tensor:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the first always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _similar_lengths(turns: list[Turn]) -> list[list[Turn]]:
    """Turns grouped for prefill so that padding wastes little: a prompt of 900 tokens and
    one of 50 are prefilled apart, prompts of 40 and 50 together."""
    groups: list[list[Turn]] = []
    for turn in sorted(turns, key=lambda t: len(t.input_ids)):
        if groups and len(turn.input_ids) <= 1.25 * len(groups[-1][0].input_ids) + 16:
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's key and value states, [batch, heads, length, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Absolute positions count real tokens only, so a left-padded row sees the positions it
    # would see alone.
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    return states if missing == 0 else F.pad(states, (0, 0, missing, 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
