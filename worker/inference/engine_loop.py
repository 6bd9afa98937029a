"""Continuous batching: every request in flight on one model advances together, a token a step.

A single thread owns the model. Between two steps it admits waiting requests (scheduler.py) and
prefills them (model_runner.py) into free slots of the worker's key/value cache (kv_cache.py),
within a budget of prompt tokens per step: a prompt longer than the budget is prefilled a chunk
a step in the cache's staging slot, so a long new conversation does not stall everyone else's
next token. Each step samples a token for every row (sampler.py), lets the requests that end
leave (stopping.py), keeps their keys and values for their conversation's next turn
(prefix_cache.py) and runs the model once for the rest. Each request keeps its own limits and
sampling settings inside the batch.

Measured on a 2-core CPU (docs/benchmarks.md, bench/b3_model_throughput.py): transformers' own
continuous-batching API (`generate_batch`, paged attention) makes a fraction of what this loop
does there, so the loop is written on the model's forward pass and a cache of its own; B3
prints both, in the same run, for every machine it runs on.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.inference.engine_types import NumericalError, StepStats
from worker.inference.kv_cache import SlotCache
from worker.inference.model_runner import ModelRunner
from worker.inference.prefix_cache import PrefixCache, PrefixHit
from worker.inference.prompt import Transcript
from worker.inference.request import GenerationRequest
from worker.inference.sampler import NO_TOKEN, Sampler
from worker.inference.scheduler import Admitted, PrefillGroup, Scheduler, ended_before_start
from worker.inference.stopping import StopRules

log = logging.getLogger("parley.batcher")


@dataclass(eq=False)
class _Chunked:
    """The prompt being prefilled a chunk a step in the staging slot."""

    request: GenerationRequest
    done: int  # prompt tokens already in the slot


class EngineLoop:
    def __init__(
        self,
        model: Any,
        *,
        device: str,
        pad_token_id: int,
        stop_rules: StopRules,
        max_batch: int,
        capacity: int,
        prefill_tokens: int,
        on_step: Callable[[StepStats], None] | None = None,
        prefix_cache: PrefixCache | None = None,
        on_iteration: Callable[[], None] | None = None,
    ) -> None:
        self.prefix_cache = prefix_cache
        # Called on the loop's thread after each pass (admission, prefill, step) and once it
        # stops: what the requests did meanwhile can be passed on in one piece from there.
        self._on_iteration = on_iteration
        self._prefill_tokens = prefill_tokens
        self._scheduler = Scheduler(
            max_batch=max_batch, prefix_cache=prefix_cache, prefill_tokens=prefill_tokens
        )
        self._slots = SlotCache(slots=max_batch, capacity=capacity, device=torch.device(device))
        self._runner = ModelRunner(model, pad_token_id=pad_token_id, cache=self._slots)
        self._sampler = Sampler(self._slots.device)
        self._stop_rules = stop_rules
        self._on_step = on_step
        self._stopping = threading.Event()
        # The batch as it stands between steps: its requests in slot order and their last
        # logits (one part per forward pass since the last step); then the admitted requests
        # not prefilled yet, and the one being prefilled in chunks. Together they are at most
        # max_batch, so each has a slot to go to.
        self._running: list[GenerationRequest] = []
        self._logits: list[torch.Tensor] = []
        self._pending: deque[PrefillGroup] = deque()
        self._chunked: _Chunked | None = None
        self._thread = threading.Thread(target=self._run, name="parley-batcher", daemon=True)
        self._thread.start()
        # The loop must end before the interpreter does: a thread still inside torch at exit
        # aborts the process.
        atexit.register(self.stop)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return not self._stopping.is_set()

    def submit(self, request: GenerationRequest) -> None:
        self._scheduler.submit(request)

    def cancel(self, request: GenerationRequest) -> None:
        request.cancel()

    def last_turn(self, prefix_key: str) -> Transcript | None:
        return None if self.prefix_cache is None else self.prefix_cache.last_turn(prefix_key)

    def remember(self, prefix_key: str, transcript: Transcript) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.remember(prefix_key, transcript)

    def stop(self) -> None:
        """End the loop; requests still in flight fail (their jobs are retried elsewhere)."""
        self._stopping.set()
        self._scheduler.wake()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._pending.extend(self._scheduler.schedule(self._occupied()))
                    self._prefill()
                    if self._running:
                        self._step()
                except Exception as exc:  # a failed step fails its requests, not the worker
                    log.exception("batch step failed; failing %d turns", self._occupied())
                    self._fail_all(exc)
                if self._on_iteration is not None:
                    self._on_iteration()
        stopped = RuntimeError("the engine stopped")
        self._fail_all(stopped)
        for request in self._scheduler.drain():
            request.fail(stopped)
        if self._on_iteration is not None:
            self._on_iteration()

    def _occupied(self) -> int:
        pending = sum(len(group.requests) for group in self._pending)
        return len(self._running) + pending + (self._chunked is not None)

    def _fail_all(self, error: BaseException) -> None:
        for request in self._running:
            request.fail(error)
        for group in self._pending:
            for request in group.requests:
                request.fail(error)
        if self._chunked is not None:
            self._chunked.request.fail(error)
        self._running, self._logits, self._chunked = [], [], None
        self._pending.clear()

    # -- prefill ---------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Prefill admitted requests within this step's budget of prompt tokens: first the
        chunked prompt's next chunk, then groups in admission order while they fit."""
        budget = self._prefill_tokens
        if self._chunked is not None:
            budget -= self._advance_chunked(budget)
        while self._pending and budget > 0:
            group = self._pending[0]
            live = [m for m in group.members if not ended_before_start(m.request)]
            cost = _prefill_cost(live)
            if not live:
                self._pending.popleft()
            elif len(live) == 1 and cost > self._prefill_tokens:
                if self._chunked is not None:
                    return  # one prompt is chunked at a time; this one starts after it
                self._pending.popleft()
                self._start_chunked(live[0].request, live[0].hit)
                budget -= self._advance_chunked(budget)
            elif cost > budget:
                return  # the next step's budget takes it
            else:
                self._pending.popleft()
                self._join(live)
                budget -= cost

    def _join(self, members: list[Admitted]) -> None:
        """Prefill the members' prompts into the slots after the batch's, each after its own
        cached prefix, and add them to the batch."""
        first = len(self._running)
        requests = [member.request for member in members]
        try:
            starts = []
            for row, member in enumerate(members):
                self._sampler.prepare(member.request)
                hit = member.hit
                loaded = hit is not None and self._slots.load_prefix(
                    first + row, hit.layers, hit.shared
                )
                starts.append(hit.shared if hit is not None and loaded else 0)
            prompts = [r.input_ids[start:] for r, start in zip(requests, starts, strict=True)]
            if len(members) > 1 and max(starts) + max(map(len, prompts)) > self._slots.capacity:
                # Padded to the group's width, one row would run past its slot: one at a time.
                for member in members:
                    self._join([member])
                return
            logits = self._runner.prefill(first, prompts, starts)
        except Exception as exc:  # the batch is untouched: only these requests fail
            log.warning("a prefill failed: %s: %s", type(exc).__name__, exc)
            for request in requests:
                request.fail(exc)
            return
        self._running = self._running + requests
        self._logits.append(logits)

    def _start_chunked(self, request: GenerationRequest, hit: PrefixHit | None) -> None:
        self._sampler.prepare(request)
        staging = self._slots.staging
        done = 0
        if hit is not None and self._slots.load_prefix(staging, hit.layers, hit.shared):
            done = hit.shared
        self._chunked = _Chunked(request, done)

    def _advance_chunked(self, budget: int) -> int:
        """Prefill the chunked prompt's next chunk (at most ``budget`` tokens); when it is
        whole, move it into the batch. Returns the tokens prefilled."""
        chunked = self._chunked
        assert chunked is not None
        request, staging = chunked.request, self._slots.staging
        if budget <= 0:
            return 0
        if ended_before_start(request):
            self._chunked = None
            return 0
        take = min(budget, len(request.input_ids) - chunked.done)
        try:
            chunk = request.input_ids[chunked.done : chunked.done + take]
            logits = self._runner.prefill(staging, [chunk], [chunked.done])
        except Exception as exc:
            log.warning("a prefill failed: %s: %s", type(exc).__name__, exc)
            request.fail(exc)
            self._chunked = None
            return take
        chunked.done += take
        if chunked.done == len(request.input_ids):
            self._slots.move(staging, len(self._running))
            self._running = [*self._running, request]
            self._logits.append(logits)
            self._chunked = None
        return take

    # -- decoding --------------------------------------------------------------------------

    def _step(self) -> None:
        """Sample a token for every request, let those that end leave, run the model once."""
        started = time.perf_counter()
        tokens = self._sampler.sample(self._logits, self._running)
        now = time.monotonic()
        keep: list[int] = []
        for row, (request, token) in enumerate(zip(self._running, tokens, strict=True)):
            # What goes wrong with one request fails it alone; the batch goes on without it.
            try:
                if token == NO_TOKEN:
                    raise NumericalError("no valid distribution for the next token")
                request.add_token(token, now)
                reason = self._stop_rules.finish_reason(request, token, now)
                if reason is None:
                    keep.append(row)
                    continue
                if reason != "cancelled":
                    self._keep_prefix(row, request)
                request.finish(reason)
            except Exception as exc:
                log.warning("a generation failed alone: %s: %s", type(exc).__name__, exc)
                request.fail(exc)
        stepped = len(self._running)
        order = self._slots.compact(keep) if len(keep) < stepped else keep
        self._running = [self._running[row] for row in order]
        self._logits = [self._runner.decode([tokens[row] for row in order])] if order else []
        if self._on_step is not None:
            self._on_step(StepStats(stepped, time.perf_counter() - started))

    def _keep_prefix(self, row: int, request: GenerationRequest) -> None:
        """Store the row's keys and values (prompt and reply but the last token, which was
        sampled and never run through the model) for the conversation's next turn."""
        if self.prefix_cache is None or request.prefix_key is None:
            return
        kept = self.prefix_cache.kept(request.prefix_key)
        length, layers = self._slots.row_prefix(row, reuse=kept)
        ids = request.input_ids + request.generated[:-1]
        self.prefix_cache.store(request.prefix_key, ids[:length], layers)


def _prefill_cost(members: list[Admitted]) -> int:
    """Prompt tokens a group's prefill runs through the model (right padded to the most)."""
    if not members:
        return 0
    return len(members) * max(member.new_tokens for member in members)
