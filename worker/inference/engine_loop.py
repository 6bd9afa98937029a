"""Continuous batching: every request in flight on one model advances together, a token a step.

A single thread owns the model. Between two steps it admits waiting requests (scheduler.py),
prefills them (model_runner.py) and joins their keys and values to the running batch
(kv_cache.py); each step samples a token for every row (sampler.py), lets the requests that
end leave (stopping.py), keeps their keys and values for their conversation's next turn
(prefix_cache.py) and runs the model once for the rest. Each request keeps its own limits and
sampling settings inside the batch.

Measured on a 2-core CPU (docs/benchmarks.md): one padded batch of 16 makes about 6x the tokens
per second of 16 turns one at a time, and transformers' own continuous-batching API
(`generate_batch`, paged attention) made about 40% of a padded batch there, so the loop is
written here on the model's forward pass and a key/value cache of its own (kv_cache.py).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from worker.inference.engine_types import NumericalError, StepStats
from worker.inference.kv_cache import BatchCache
from worker.inference.model_runner import ModelRunner
from worker.inference.prefix_cache import PrefixCache
from worker.inference.request import GenerationRequest
from worker.inference.sampler import NO_TOKEN, Sampler
from worker.inference.scheduler import PrefillGroup, Scheduler
from worker.inference.stopping import StopRules

log = logging.getLogger("parley.batcher")


class EngineLoop:
    def __init__(
        self,
        model: Any,
        *,
        device: str,
        pad_token_id: int,
        stop_rules: StopRules,
        max_batch: int,
        on_step: Callable[[StepStats], None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.prefix_cache = prefix_cache
        self._scheduler = Scheduler(max_batch=max_batch, prefix_cache=prefix_cache)
        self._runner = ModelRunner(model, device=torch.device(device), pad_token_id=pad_token_id)
        self._sampler = Sampler(self._runner.device)
        self._stop_rules = stop_rules
        self._on_step = on_step
        self._stopping = threading.Event()
        # The batch as it stands between steps: its requests in row order, their keys and
        # values, and their last logits (one part per forward pass since the last step).
        self._running: list[GenerationRequest] = []
        self._cache: BatchCache | None = None
        self._logits: list[torch.Tensor] = []
        self._thread = threading.Thread(target=self._run, name="parley-batcher", daemon=True)
        self._thread.start()
        # The loop must end before the interpreter does: a thread still inside torch at exit
        # aborts the process.
        atexit.register(self.stop)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: GenerationRequest) -> None:
        self._scheduler.submit(request)

    def stop(self) -> None:
        """End the loop; requests still in flight fail (their jobs are retried elsewhere)."""
        self._stopping.set()
        self._scheduler.wake()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as exc:  # a failed step fails its requests, not the worker
                    log.exception("batch step failed; failing %d turns", len(self._running))
                    self._fail_all(exc)
        stopped = RuntimeError("the engine stopped")
        self._fail_all(stopped)
        for request in self._scheduler.drain():
            request.fail(stopped)

    def _fail_all(self, error: BaseException) -> None:
        for request in self._running:
            request.fail(error)
        self._reset()

    def _reset(self) -> None:
        self._running, self._cache, self._logits = [], None, []

    def _admit(self) -> None:
        groups = self._scheduler.schedule(len(self._running))
        try:
            for group in groups:
                self._join(group)
        except Exception as exc:
            # Those admitted but not yet in the batch would otherwise wait forever.
            for group in groups:
                for request in group.requests:
                    request.fail(exc)
            raise

    def _join(self, group: PrefillGroup) -> None:
        """Prefill the group and add its rows to the batch (after the rows already in it)."""
        for request in group.requests:
            self._sampler.prepare(request)
        if group.hit is None:
            cache, logits = self._runner.prefill([r.input_ids for r in group.requests])
        else:
            cache, logits = self._runner.prefill_after(group.requests[0].input_ids, group.hit)
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.join(cache)
        self._running = self._running + group.requests
        self._logits.append(logits)

    def _step(self) -> None:
        """Sample a token for every request, let those that end leave, run the model once."""
        assert self._cache is not None
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
        if not keep:
            self._reset()
        else:
            if len(keep) < stepped:
                self._cache.select(keep)
                self._running = [self._running[row] for row in keep]
            self._logits = [self._runner.decode([tokens[row] for row in keep], self._cache)]
        if self._on_step is not None:
            self._on_step(StepStats(stepped, time.perf_counter() - started))

    def _keep_prefix(self, row: int, request: GenerationRequest) -> None:
        """Store the row's keys and values (prompt and reply but the last token, which was
        sampled and never run through the model) for the conversation's next turn."""
        if self.prefix_cache is None or request.prefix_key is None or self._cache is None:
            return
        length, layers = self._cache.row_prefix(row)
        ids = request.input_ids + request.generated[:-1]
        self.prefix_cache.store(request.prefix_key, ids[:length], layers)
