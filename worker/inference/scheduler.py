"""Admission: which waiting requests join the batch before the next step, and how they are
prefilled.

Requests wait in arrival order. Between two steps as many are admitted as the batch has room
for; those cancelled or past their time cap while they waited end there, never prefilled. What
a request prefills is its prompt after the cached prefix of its conversation (all of it when
none is cached); requests are grouped by how many tokens that is, so that padding them to a
common width wastes little, and each group is one forward pass, its rows' prefixes each of
their own length.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

from worker.inference.prefix_cache import PrefixCache, PrefixHit
from worker.inference.request import GenerationRequest


@dataclass(frozen=True)
class Admitted:
    """A request let into the batch, and the cached prefix of its prompt it starts from."""

    request: GenerationRequest
    hit: PrefixHit | None  # None: prefilled whole

    @property
    def new_tokens(self) -> int:
        """The prompt tokens its prefill runs through the model."""
        return len(self.request.input_ids) - (0 if self.hit is None else self.hit.shared)


@dataclass(frozen=True)
class PrefillGroup:
    """Requests prefilled together in one forward pass."""

    members: list[Admitted]

    @property
    def requests(self) -> list[GenerationRequest]:
        return [member.request for member in self.members]


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
        prefilled), grouped for prefill, fewest new tokens first; with none, wait for one
        (or a `wake`)."""
        admitted: list[Admitted] = []
        for request in self._take(running):
            if ended_before_start(request):
                continue
            request.start()
            admitted.append(Admitted(request, self._cached_prefix(request)))
        return [
            PrefillGroup(part)
            for group in similar_lengths(admitted)
            for part in within(group, self.prefill_tokens)
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


def similar_lengths(admitted: list[Admitted]) -> list[list[Admitted]]:
    """Requests grouped for prefill so that padding wastes little: 900 new tokens and 50 are
    prefilled apart, 40 and 50 together."""
    groups: list[list[Admitted]] = []
    for member in sorted(admitted, key=lambda m: m.new_tokens):
        if groups and member.new_tokens <= 1.25 * groups[-1][0].new_tokens + 16:
            groups[-1].append(member)
        else:
            groups.append([member])
    return groups


def within(group: list[Admitted], tokens: int) -> list[list[Admitted]]:
    """``group`` (fewest new tokens first) cut into parts of at most ``tokens`` padded new
    tokens each; a request with more than that is a part of its own."""
    parts: list[list[Admitted]] = []
    for member in group:
        width = member.new_tokens  # the most of its part so far
        if parts and (len(parts[-1]) + 1) * width <= tokens:
            parts[-1].append(member)
        else:
            parts.append([member])
    return parts
