"""Admission: which waiting requests join the batch before the next step, and how they are
prefilled.

Requests wait in arrival order. Between two steps as many are admitted as the batch has room
for; those cancelled or past their time cap while they waited end there, never prefilled. A
request whose conversation has a cached prefix is prefilled alone after it; the others are
grouped by similar prompt length, so that left padding to a common width wastes little.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

from worker.inference.prefix_cache import PrefixCache, PrefixHit
from worker.inference.request import GenerationRequest


@dataclass(frozen=True)
class PrefillGroup:
    """Requests prefilled together in one forward pass."""

    requests: list[GenerationRequest]
    # The cached prefix of the prompt of the group's one request; None: prefilled whole.
    hit: PrefixHit | None = None


class Scheduler:
    def __init__(
        self, *, max_batch: int, prefill_tokens: int, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._prefix_cache = prefix_cache
        # None wakes a loop waiting in `schedule` (to stop).
        self._waiting: queue.SimpleQueue[GenerationRequest | None] = queue.SimpleQueue()

    def submit(self, request: GenerationRequest) -> None:
        self._waiting.put(request)

    def wake(self) -> None:
        self._waiting.put(None)

    def schedule(self, running: int) -> list[PrefillGroup]:
        """Admit waiting requests beside ``running`` ones (in the batch or still to be
        prefilled), grouped for prefill; with none, wait for one (or a `wake`). Requests
        with a cached prefix come first, in arrival order, then the groups of the others,
        shortest prompts first."""
        admitted = self._take(running)
        warm: list[PrefillGroup] = []
        cold: list[GenerationRequest] = []
        for request in admitted:
            if ended_before_start(request):
                continue
            request.start()
            hit = self._cached_prefix(request)
            if hit is None:
                cold.append(request)
            else:
                warm.append(PrefillGroup([request], hit))
        groups = similar_lengths(cold)
        return warm + [
            PrefillGroup(part) for group in groups for part in within(group, self.prefill_tokens)
        ]

    def drain(self) -> list[GenerationRequest]:
        """Take every waiting request off the queue (when the loop stops)."""
        taken: list[GenerationRequest] = []
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return taken
            if request is not None:
                taken.append(request)

    def _take(self, running: int) -> list[GenerationRequest]:
        taken: list[GenerationRequest] = []
        waiting: GenerationRequest | None
        if running == 0:
            waiting = self._waiting.get()
            if waiting is None:
                return taken
            taken.append(waiting)
        while running + len(taken) < self.max_batch:
            try:
                waiting = self._waiting.get_nowait()
            except queue.Empty:
                break
            if waiting is None:
                break
            taken.append(waiting)
        return taken

    def _cached_prefix(self, request: GenerationRequest) -> PrefixHit | None:
        if self._prefix_cache is None or request.prefix_key is None:
            return None
        return self._prefix_cache.lookup(request.prefix_key, request.input_ids)


def ended_before_start(request: GenerationRequest) -> bool:
    """End a request cancelled or past its time cap before it was prefilled; say whether it
    has ended."""
    if request.cancelled:
        request.finish("cancelled")
    elif request.expired(time.monotonic()):
        request.finish("time")
    return request.status.ended


def similar_lengths(requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
    """Requests grouped for prefill so that padding wastes little: a prompt of 900 tokens and
    one of 50 are prefilled apart, prompts of 40 and 50 together."""
    groups: list[list[GenerationRequest]] = []
    for request in sorted(requests, key=lambda r: len(r.input_ids)):
        if groups and len(request.input_ids) <= 1.25 * len(groups[-1][0].input_ids) + 16:
            groups[-1].append(request)
        else:
            groups.append([request])
    return groups


def within(group: list[GenerationRequest], tokens: int) -> list[list[GenerationRequest]]:
    """``group`` (shortest prompts first) cut into parts of at most ``tokens`` padded prompt
    tokens each; a prompt longer than that is a part of its own."""
    parts: list[list[GenerationRequest]] = []
    for request in group:
        width = len(request.input_ids)  # the longest of its part so far
        if parts and (len(parts[-1]) + 1) * width <= tokens:
            parts[-1].append(request)
        else:
            parts.append([request])
    return parts
