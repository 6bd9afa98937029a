"""B2 Turn overhead: end to end with the tiny model.

20 conversations of 20 turns each, every conversation submitting its next turn when the
previous one has ended. Reports turns/s and p50/p95 end-to-end latency, and, in the same run
once the service is stopped, two baselines: the model's own time per turn on the same prompts
(one `generate` call each, one at a time), and the engine alone on the same conversations
(bench.engine_alone). Targets: turns/s at least 1.2x one-at-a-time `generate` and at least 60%
of the engine alone; a p50 at most 60 ms above the model's own time.

Run: python -m bench.b2_turn_overhead
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime

import torch

from app.schemas import ChatMessage
from bench.conversations import hold_conversations, transcript
from bench.cpu_budget import CpuBudget
from bench.engine_alone import StepTotals, in_fresh_process, run_engine_alone
from bench.report import percentile, say
from bench.stack import BenchStack
from worker.inference.loader import load_model
from worker.inference.prompt import build_prompt

CONVERSATIONS, TURNS, NEW_TOKENS = 20, 20, 16


def model_time_per_turn(model_path: str, messages: list[dict[str, str]]) -> float:
    """The model alone: one greedy `generate` per turn of a real transcript, one at a time."""
    loaded = load_model(model_path)
    times = []
    for turn in range(0, len(messages), 2):
        prompt = build_prompt(
            loaded.tokenizer,
            system_prompt=None,
            history=[ChatMessage(role=m["role"], content=m["content"]) for m in messages[:turn]],
            message=messages[turn]["content"],
            max_context_tokens=loaded.max_context_tokens,
            max_new_tokens=NEW_TOKENS,
        )
        ids = torch.tensor([prompt.input_ids], device=loaded.device)
        with torch.inference_mode():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)
            started = time.perf_counter()
            loaded.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
            times.append(time.perf_counter() - started)
    return statistics.mean(times)


def _worker_steps(stack: BenchStack, *, settled: bool = False) -> StepTotals:
    """The worker's decoding steps so far, from its metrics on the API's /metrics. A worker
    publishes them with its heartbeat (every 10 s): `settled` waits for the next one."""

    def read() -> StepTotals:
        return StepTotals(
            count=int(stack.worker_metric("parley_worker_step_seconds_count")),
            rows=int(stack.worker_metric("parley_worker_batch_size_sum")),
            seconds=stack.worker_metric("parley_worker_step_seconds_sum"),
        )

    totals = read()
    deadline = time.monotonic() + (12 if settled else 0)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        latest = read()
        if latest != totals:
            return latest
    return totals


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def main() -> None:
    with BenchStack("b2", model="tiny") as stack:
        key = stack.create_key("bench")
        say(f"B2: {CONVERSATIONS} conversations x {TURNS} turns of {NEW_TOKENS} tokens, tiny model")
        generation = {"max_new_tokens": NEW_TOKENS}
        hold_conversations(stack.base_url, key, conversations=4, turns=2, generation=generation)
        steps_before = _worker_steps(stack)
        with CpuBudget.of_stack(api=stack.api_pid, worker=stack.worker_pid) as budget:
            records, wall = hold_conversations(
                stack.base_url, key, conversations=CONVERSATIONS, turns=TURNS, generation=generation
            )
        steps = _worker_steps(stack, settled=True) - steps_before
        messages = transcript(stack.base_url, key, records[0][-1].job["conversation_id"])
        model = str(stack.model)
    # The baselines on a quiet machine: the service is stopped. Each runs in a process of its
    # own: the engine alone ran at half its speed (287 -> 161 turns/s) in a process that had
    # just timed transformers' generate.
    model_s = in_fresh_process(model_time_per_turn, model, messages)
    alone = in_fresh_process(run_engine_alone, "b2")
    latencies = [r.latency_s for conversation in records for r in conversation]
    turns_per_s = len(latencies) / wall
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    overhead = p50 - model_s
    say(f"  turns: {len(latencies)} in {wall:.1f} s = {turns_per_s:.1f} turns/s")
    say(f"  end-to-end latency: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    one_at_a_time = 1 / model_s
    say(f"  model alone, one generate per turn: {model_s * 1000:.1f} ms, {one_at_a_time:.1f}/s")
    say(
        f"  engine alone, same conversations: {alone.turns_per_s:.1f} turns/s,"
        f" p50 {percentile(alone.latencies, 0.5) * 1000:.1f} ms,"
        f" CPU {alone.cpu_s / alone.wall_s:.2f} cores, {1000 * alone.cpu_s / alone.turns:.2f} ms"
        " per turn (the worker's own, below, runs this engine)"
    )
    say(f"  p50 above the model's own time: {overhead * 1000:.1f} ms (target <= 60 ms)")
    say(f"  ratio turns/s / one-at-a-time generate: {turns_per_s / one_at_a_time:.2f}x (>= 1.2x)")
    say(f"  ratio turns/s / engine alone: {turns_per_s / alone.turns_per_s:.0%} (target >= 60%)")
    jobs = [r.job for conversation in records for r in conversation]
    for label, begin, end in (
        ("queued (accepted -> started)", "created_at", "started_at"),
        ("running (started -> ended)", "started_at", "finished_at"),
    ):
        spans = [_seconds(job[end]) - _seconds(job[begin]) for job in jobs]
        say(f"  {label}: p50 {percentile(spans, 0.5) * 1000:.1f} ms")
    say(f"  decoding in the service: {steps.describe(wall)}")
    say(f"  decoding in the engine alone: {alone.steps.describe(alone.wall_s)}")
    budget.report(len(latencies), "turn")


if __name__ == "__main__":
    main()
